"""The batched MMIL-Transformer against the naive per-sub-bag reference (tests/reference_mmil.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from reference_mmil import (  # noqa: E402
    init_released_weights,
    reference_forward,
    reference_instance_scores,
    subbags_from_ids,
    to_model_state,
)

from mmil.errors import MMILInputError  # noqa: E402
from mmil.models import create_model  # noqa: E402
from mmil.checkpoint import load_released_checkpoint  # noqa: E402
from mmil.models.mmil_released import released_checkpoint_filter  # noqa: E402
from mmil.models.mmil_transformer import MMILTransformer  # noqa: E402

C, D, K_CLASSES, HEADS, HEAD_DIM = 12, 16, 3, 2, 8
ATOL = 1e-8  # float64 on both sides; the issue asks for 1e-5



def make_pair(*, num_layers=2, num_msg=1, with_fc1=True, seed=0, **kw):
    """Reference weights (released layout) and a float64 model holding the same weights."""
    in_dim = C if with_fc1 else D
    weights = init_released_weights(in_dim, D, K_CLASSES, num_layers=num_layers, heads=HEADS, head_dim=HEAD_DIM, with_fc1=with_fc1, seed=seed)
    kw.setdefault("proj_dropout", 0.0)
    model = MMILTransformer(
        in_dim, K_CLASSES, embed_dim=D, num_layers=num_layers, heads=HEADS, head_dim=HEAD_DIM, num_msg=num_msg, use_input_proj=with_fc1, **kw
    ).double()
    model.load_state_dict(to_model_state(weights), strict=True)
    return weights, model.eval()


def padded(lengths, dim=C, seed=0, pad_value=float("nan")):
    """A padded batch with garbage (NaN by default) in the pads, and garbage coords/groups there too."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(lengths), max(lengths)
    x = torch.randn(B, N, dim, generator=g, dtype=torch.float64)
    coords = torch.rand(B, N, 2, generator=g, dtype=torch.float64) * 5000
    groups = torch.randint(0, 6, (B, N), generator=g) * 3 + 2  # gapped labels
    mask = torch.arange(N).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    x[~mask] = pad_value
    coords[~mask] = pad_value
    groups[~mask] = 10**6
    return x, mask, coords, groups


def check_against_reference(weights, model, x, mask, *, num_msg=1, atol=ATOL, **fwd):
    out = model(x, mask, **fwd)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    assert out.logits.shape == (x.shape[0], K_CLASSES)
    assert torch.isfinite(out.logits).all()
    ids, valid = out.subbag_ids, out.subbag_valid
    for b in range(x.shape[0]):
        real = mask[b]
        subbags = subbags_from_ids(ids[b][real], valid[b])
        ref = reference_forward(weights, x[b][real], subbags, heads=HEADS, head_dim=HEAD_DIM, num_msg=num_msg)
        torch.testing.assert_close(out.logits[b], ref, rtol=0, atol=atol)
    return out


@pytest.mark.parametrize("grouping", ["random", "sequential", "embedding", "coords", "index"])
def test_padded_batch_matches_reference_every_grouping(grouping):
    weights, model = make_pair(num_subbags=4, grouping=grouping)
    x, mask, coords, groups = padded([23, 9, 3, 1])  # uneven sub-bags, N < G, a one-instance bag
    out = check_against_reference(weights, model, x, mask, coords=coords, groups=groups, seed=3)
    ids = out.subbag_ids
    if grouping in ("random", "sequential"):
        assert torch.bincount(ids[0][mask[0]], minlength=4).tolist() == [6, 6, 6, 5]
        assert torch.bincount(ids[2][mask[2]], minlength=4).tolist() == [1, 1, 1, 0]  # an empty sub-bag
    if grouping == "index":
        assert out.subbag_valid.sum(1).tolist() == [len(set(groups[b][mask[b]].tolist())) for b in range(4)]


@pytest.mark.parametrize("grouping", ["random", "embedding", "coords"])
def test_pad_contents_do_not_change_outputs(grouping):
    _, model = make_pair(num_subbags=4, grouping=grouping)
    x1, mask, c1, g1 = padded([20, 7], pad_value=float("nan"))
    x2, _, c2, g2 = padded([20, 7], pad_value=1e4)
    a = model(x1, mask, coords=c1, groups=g1, seed=5, return_scores=True)
    b = model(x2, mask, coords=c2, groups=g2, seed=5, return_scores=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.instance_scores, b.instance_scores)
    assert bool((a.instance_scores[~mask] == 0).all())


@pytest.mark.parametrize("grouping", ["sequential", "index"])
def test_bag_in_a_batch_equals_bag_alone(grouping):
    _, model = make_pair(num_subbags=3, grouping=grouping)
    x, mask, coords, groups = padded([17, 5, 11])
    batch = model(x, mask, groups=groups).logits
    for b in range(3):
        n = int(mask[b].sum())
        alone = model(x[b, :n], groups=groups[b, :n]).logits[0]
        torch.testing.assert_close(batch[b], alone, rtol=0, atol=1e-12)


def test_one_instance_subbag_and_fewer_instances_than_groups():
    weights, model = make_pair(num_subbags=6, grouping="index")
    x = torch.randn(1, 8, C, dtype=torch.float64)
    groups = torch.tensor([[0, 0, 0, 5, 9, 9, 9, 9]])  # sub-bag {3} has one instance
    check_against_reference(weights, model, x, None, groups=groups)
    weights, model = make_pair(num_subbags=10, grouping="random")
    check_against_reference(weights, model, torch.randn(3, C, dtype=torch.float64), None, seed=0)  # 7 empty sub-bags
    check_against_reference(weights, model, torch.randn(1, C, dtype=torch.float64), None, seed=0)


@pytest.mark.parametrize("num_layers,num_msg,with_fc1", [(1, 1, True), (3, 1, True), (2, 3, True), (2, 1, False)])
def test_other_configurations_match_reference(num_layers, num_msg, with_fc1):
    weights, model = make_pair(num_layers=num_layers, num_msg=num_msg, with_fc1=with_fc1, num_subbags=4)
    x, mask, _, _ = padded([14, 3], dim=C if with_fc1 else D)
    check_against_reference(weights, model, x, mask, num_msg=num_msg, seed=1)


def test_subbag_masking_matches_reference_and_keeps_int_g_times_one_minus_ratio():
    weights, model = make_pair(num_subbags=10, mask_ratio=0.6, attn_dropout=0.0, proj_dropout=0.0)
    model.train()
    x, mask, _, _ = padded([40, 25, 4])
    out = check_against_reference(weights, model, x, mask, seed=11)
    valid = out.subbag_valid
    assert valid.sum(1).tolist() == [4, 4, 4]  # int(10 * 0.4)
    ids = out.subbag_ids
    for b in range(3):
        used = set(ids[b][ids[b] >= 0].tolist())
        assert used <= set(torch.nonzero(valid[b]).flatten().tolist())
    # Same seed -> same kept sub-bags; masking is off in eval mode.
    assert torch.equal(model(x, mask, seed=11).logits, out.logits)
    model.eval()
    assert bool(model(x, mask, seed=11).subbag_valid.all())


def test_size_cap_matches_reference_and_is_reported():
    weights, model = make_pair(num_subbags=3, max_subbag_size=4, grouping="sequential")
    x, mask, _, _ = padded([18, 6])
    out = check_against_reference(weights, model, x, mask, seed=2)
    ids = out.subbag_ids
    assert torch.bincount(ids[0][ids[0] >= 0], minlength=3).tolist() == [4, 4, 4]
    assert out.num_capped == 6
    _, uncapped = make_pair(num_subbags=3, grouping="sequential")
    assert uncapped(x, mask).num_capped == 0


def test_one_sdpa_call_per_attention_step(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    _, model = make_pair(num_layers=3, num_subbags=5)
    x, mask, _, _ = padded([30, 12, 7])
    model(x, mask, seed=0)
    assert len(calls) == 2 * 3
    assert calls[0][0] == 3 * 5  # every sub-bag of every bag in one call


def test_instance_scores_match_reference_attention():
    weights, model = make_pair(num_subbags=4, num_msg=2)
    x, mask, _, _ = padded([21, 6])
    out = model(x, mask, seed=4, return_scores=True)
    ids, valid = out.subbag_ids, out.subbag_valid
    for b in range(2):
        real = mask[b]
        subbags = subbags_from_ids(ids[b][real], valid[b])
        ref, self_w, expected_sum = reference_instance_scores(weights, x[b][real], subbags, heads=HEADS, head_dim=HEAD_DIM, num_msg=2)
        torch.testing.assert_close(out.instance_scores[b][real], ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.bag_self_weight[b], self_w, rtol=0, atol=1e-10)
        total = out.instance_scores[b].sum()
        torch.testing.assert_close(total, expected_sum, rtol=0, atol=1e-10)
        assert 0 < float(total.detach()) <= 1 - float(self_w.detach()) + 1e-12
    assert out.instance_scores.dtype == torch.float64 and bool((out.instance_scores[~mask] == 0).all())
    assert model(x, mask, seed=4).instance_scores is None


def test_released_layout_state_dict_gives_reference_logits(tmp_path):
    weights32 = {k: v.float() for k, v in init_released_weights(C, D, K_CLASSES, heads=HEADS, head_dim=HEAD_DIM, seed=9).items()}
    original = {k: v.clone() for k, v in weights32.items()}
    x = torch.randn(1, 19, C, dtype=torch.float64)
    path = tmp_path / "released.pth"
    torch.save({"model": {f"module.{k}": v for k, v in weights32.items()}}, path)
    model = load_released_checkpoint(path, heads=HEADS, num_subbags=4, grouping="sequential")
    assert not model.training and model.init_kwargs["in_dim"] == C and model.init_kwargs["num_layers"] == 2
    ref_w = {k: v.double() for k, v in weights32.items()}
    subbags = subbags_from_ids(model(x.float()).subbag_ids[0], torch.ones(4, dtype=torch.bool))
    ref = reference_forward(ref_w, x[0], subbags, heads=HEADS, head_dim=HEAD_DIM)
    # float32 against float64: errors are ~1e-6 here; 5e-5 leaves room for any kernel's summation order
    torch.testing.assert_close(model(x.float()).logits[0].double(), ref, rtol=0, atol=5e-5)
    torch.testing.assert_close(model.double()(x).logits[0], ref, rtol=0, atol=ATOL)

    # The filter alone: never mutates its input, names every mapping, reports leftovers.
    weights32["some.extra"] = torch.zeros(2)
    new, report = released_checkpoint_filter(weights32)
    assert report.unexpected == ["some.extra"] and not report.missing
    assert new["bag_token"].shape == (D,) and new["layers.1.msg_attn.out.bias"].shape == (D,)
    new["bag_token"].add_(1.0)
    assert all(torch.equal(weights32[k], original[k]) for k in original)
    del weights32["layers.1.GroupsMSGAttenLayer.AttenLayer.attn.to_out.0.bias"]
    _, report = released_checkpoint_filter(weights32)
    assert report.missing == ["layers.1.msg_attn.out.bias"]


def test_released_checkpoint_without_fc1_builds_model_without_projection(tmp_path):
    weights = {k: v.float() for k, v in init_released_weights(D, D, 2, heads=HEADS, head_dim=HEAD_DIM, with_fc1=False).items()}
    path = tmp_path / "tcga.pt"
    torch.save(weights, path)
    model = load_released_checkpoint(path, head_dim=HEAD_DIM, grouping="sequential", num_subbags=2)
    assert model.init_kwargs["use_input_proj"] is False and model.in_dim == D and model.n_classes == 2
    x = torch.randn(9, D)
    subbags = [torch.arange(0, 5), torch.arange(5, 9)]
    ref = reference_forward({k: v.double() for k, v in weights.items()}, x.double(), subbags, heads=HEADS, head_dim=HEAD_DIM)
    torch.testing.assert_close(model(x).logits[0].double(), ref, rtol=0, atol=5e-5)  # float32 model
    with pytest.raises(MMILInputError, match="tcga.pt.*in_dim=1024"):
        load_released_checkpoint(path, in_dim=1024, heads=HEADS)


def test_released_checkpoint_bad_files_raise_input_error_naming_the_file(tmp_path):
    with pytest.raises(MMILInputError, match="missing.pth"):
        load_released_checkpoint(tmp_path / "missing.pth")
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module: refused by weights_only
    with pytest.raises(MMILInputError, match="module.pth.*weights-only"):
        load_released_checkpoint(pickled)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(MMILInputError, match="corrupt.pth"):
        load_released_checkpoint(corrupt)
    weights = {k: v.float() for k, v in init_released_weights(C, D, K_CLASSES, heads=HEADS, head_dim=HEAD_DIM).items()}
    good = tmp_path / "good.pth"
    torch.save(weights, good)
    with pytest.raises(MMILInputError, match="good.pth.*in_dim"):
        load_released_checkpoint(good, in_dim=C + 1, heads=HEADS)
    with pytest.raises(MMILInputError, match="good.pth.*heads"):
        load_released_checkpoint(good, heads=3)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(MMILInputError, match="other.pth.*not a released"):
        load_released_checkpoint(other)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MMILTransformer(C, 2, embed_dim=D, heads=HEADS, head_dim=HEAD_DIM, num_subbags=3, proj_dropout=0.0)
    x, mask, _, _ = padded([15, 8], pad_value=0.0)
    out = model(x.float(), mask, seed=0)
    model.loss(out, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def _synthetic_bags(n_bags, seed, shift=4.0):
    """Positive bags hide 3 instances shifted by ``shift`` along a fixed direction among 20-40 normal ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 41, (n_bags,), generator=g).tolist()
    labels = torch.arange(n_bags) % 2
    x = torch.randn(n_bags, 40, 8, generator=g)
    mask = torch.arange(40).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    for b in range(n_bags):
        if labels[b]:
            x[b, :3, :2] += shift
    return x, mask, labels


def test_training_on_synthetic_task_lowers_loss_and_separates_classes():
    torch.manual_seed(0)
    model = MMILTransformer(8, 2, embed_dim=32, heads=2, head_dim=16, num_subbags=4, mask_ratio=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, mask, y = _synthetic_bags(32, seed=0)
    model.eval()
    with torch.no_grad():
        initial = float(model.loss(model(x, mask, seed=0), y))
    model.train()
    for step in range(150):
        idx = torch.arange(step * 8, step * 8 + 8) % 32
        loss = model.loss(model(x[idx], mask[idx], seed=step), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, mt, yt = _synthetic_bags(40, seed=1)
    with torch.no_grad():
        final = float(model.loss(model(x, mask, seed=0), y))
        probs = model.predict_proba(xt, mt, seed=0, repeats=3)[:, 1]
    # A training outcome, so wide margins: over 16 seeds and 1e-4 weight perturbations (stand-ins
    # for another CPU's rounding) the loss fell to at most 0.07x, AUC was 1.0 and accuracy >= 0.95.
    assert final < 0.5 * initial
    # Held-out bags: AUC as the fraction of (positive, negative) pairs ranked right.
    auc = float((probs[yt == 1].view(-1, 1) > probs[yt == 0].view(1, -1)).double().mean())
    accuracy = float(((probs > 0.5).long() == yt).double().mean())
    assert auc > 0.9 and accuracy > 0.8, (auc, accuracy)


def test_seeds_give_identical_or_different_outputs_and_leave_global_rng_alone():
    _, model = make_pair(num_subbags=5)
    x = torch.randn(1, 50, C, dtype=torch.float64)
    state = torch.get_rng_state()
    a, b, c = model(x, seed=1).logits, model(x, seed=1).logits, model(x, seed=2).logits
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-6)
    for grouping in ("embedding", "coords"):
        model.grouping = grouping
        coords = torch.rand(1, 50, 2) * 1000
        assert torch.equal(model(x, coords=coords, seed=3).logits, model(x, coords=coords, seed=3).logits)


def test_predict_proba_averages_reference_probabilities_over_seeds():
    weights, model = make_pair(num_subbags=4)
    x = torch.randn(1, 30, C, dtype=torch.float64)
    ens = model.predict_proba(x, seed=10, repeats=3)
    ref = 0
    for s in (10, 11, 12):
        ids = model(x, seed=s).subbag_ids[0]
        subbags = subbags_from_ids(ids, torch.ones(4, dtype=torch.bool))
        ref = ref + torch.softmax(reference_forward(weights, x[0], subbags, heads=HEADS, head_dim=HEAD_DIM), -1) / 3
    torch.testing.assert_close(ens[0], ref.float(), rtol=0, atol=1e-6)
    assert not torch.allclose(ens, model.predict_proba(x, seed=10, repeats=1), atol=1e-8)


@pytest.mark.parametrize("grouping", ["random", "embedding"])
def test_bf16_autocast_close_to_fp32(grouping, monkeypatch):
    torch.manual_seed(0)
    model = MMILTransformer(64, 2, embed_dim=64, heads=4, head_dim=16, num_subbags=4, grouping=grouping).eval()
    x, mask, _, _ = padded([120, 70], dim=64, pad_value=0.0)
    x = x.float()
    real_assign = model.assign_subbags
    seen = []

    def recording(*args, **kwargs):
        seen.append(real_assign(*args, **kwargs))
        return seen[-1]

    with torch.no_grad():
        monkeypatch.setattr(model, "assign_subbags", recording)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, mask, seed=0, return_scores=True)
        own32 = model(x, mask, seed=0)
        # k-means on bf16 embeddings may move a borderline instance to another sub-bag, on one CPU
        # and not another; so the fp32 pass reuses the bf16 pass's sub-bags (drawing its own first,
        # to consume the generator alike) and only the arithmetic is compared.
        monkeypatch.setattr(model, "assign_subbags", lambda *a, **k: (real_assign(*a, **k), seen[0])[1])
        fp32 = model(x, mask, seed=0, return_scores=True)
    if grouping == "random":  # drawn from the seed alone: the same sub-bags whatever the precision
        assert torch.equal(own32.subbag_ids, bf16.subbag_ids)
    assert torch.equal(fp32.subbag_ids, bf16.subbag_ids)
    assert bf16.logits.dtype == torch.bfloat16 or bf16.logits.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the differences here are ~1e-3 (probabilities) and ~1e-5
    # (instance scores, at most ~0.1): bounds 10-100x larger hold for any bf16 kernel.
    assert float((bf16.probs.float() - fp32.probs).abs().max()) < 2e-2
    assert float((bf16.instance_scores.float() - fp32.instance_scores).abs().max()) < 2e-3


def test_bad_options_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown grouping 'kmeans'.*random, sequential, embedding, coords, index"):
        MMILTransformer(C, 2, grouping="kmeans")
    with pytest.raises(ValueError, match="mask_ratio"):
        MMILTransformer(C, 2, mask_ratio=1.0)
    with pytest.raises(ValueError, match="use_input_proj"):
        MMILTransformer(C, 2, embed_dim=D, use_input_proj=False)
    with pytest.raises(ValueError, match="max_subbag_size"):
        MMILTransformer(C, 2, max_subbag_size=0)
    model = MMILTransformer(C, 2, embed_dim=D, heads=HEADS, head_dim=HEAD_DIM, grouping="coords")
    with pytest.raises(ValueError, match="needs patch coordinates"):
        model(torch.randn(5, C))
    model.grouping = "index"
    with pytest.raises(ValueError, match="needs precomputed group labels"):
        model(torch.randn(5, C))
    with pytest.raises(ValueError, match="in_dim=12"):
        model(torch.randn(5, C + 1), groups=torch.zeros(5))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(2, 5, C), torch.tensor([[True] * 5, [False] * 5]), groups=torch.zeros(2, 5))


def test_registry_builds_the_model_with_spec_defaults():
    model = create_model("mmil", in_dim=1024, n_classes=2)
    assert isinstance(model, MMILTransformer)
    cfg = model.init_kwargs
    assert (cfg["embed_dim"], cfg["num_subbags"], cfg["num_layers"], cfg["heads"], cfg["head_dim"]) == (512, 10, 2, 8, 64)
    assert model.layers[0].subbag_attn.qkv.weight.shape == (3 * 512, 512) and model.layers[0].subbag_attn.qkv.bias is None
    with torch.no_grad():
        assert float(model.msg_token.abs().sum()) == 0 and float(model.instance_bias.abs().sum()) == 0
        assert math.isclose(float(model.bag_token.std()), 1.0, abs_tol=0.15)
