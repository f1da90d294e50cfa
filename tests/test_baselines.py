"""Baseline MIL models: padding/permutation invariance, gradients, learning, references.

Every check compares against an independent computation (the bag run alone, a
naive per-instance loop, exact dense attention, a sort), so each can fail.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mmil.models import create_model, list_models, model_inputs
from mmil.models.clam import topk_pseudo_labels
from mmil.models.layers import NystromAttention, dense_attention_reference, newton_schulz_pinv, segment_ids
from mmil.models.transmil import PPEG, square_sides, square_token_sources

IN_DIM = 12
N_CLASSES = 3
ALL_MODELS = list_models()
BASELINES = [m for m in ALL_MODELS if m != "mmil"]
# TransMIL's PPEG reads the instance order; MMIL's random grouping depends on it too.
PERMUTATION_INVARIANT = [m for m in BASELINES if m != "transmil"]

SMALL_KWARGS = {
    "mean": {"embed_dim": 24},
    "max": {"embed_dim": 24},
    "abmil": {"embed_dim": 24, "attn_dim": 16},
    "abmil-gated": {"embed_dim": 24, "attn_dim": 16},
    "dsmil": {"embed_dim": 24, "attn_dim": 16},
    "clam-sb": {"embed_dim": 24, "attn_dim": 16, "k_sample": 4},
    # 8 landmarks: the test bags have both fewer and more tokens than landmarks.
    "transmil": {"embed_dim": 24, "heads": 4, "num_landmarks": 8, "pinv_iterations": 12},
    # Sequential grouping: a random grouping of a batch is drawn for the whole batch, so
    # only a deterministic grouping can give a bag the same sub-bags alone and batched.
    "mmil": {"embed_dim": 24, "heads": 4, "head_dim": 6, "num_subbags": 4, "grouping": "sequential"},
}


def build(name: str, n_classes: int = N_CLASSES, in_dim: int = IN_DIM, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL_KWARGS.get(name, {}), **extra}
    return create_model(name, in_dim=in_dim, n_classes=n_classes, **kwargs)


def padded_with_garbage(bags: list[torch.Tensor], scatter: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags into (B, N, C) with huge random values in the pads.

    With ``scatter`` the real instances are spread over random positions (order kept),
    otherwise they sit at the front as ``pad_bags`` lays them out.
    """
    n_max = max(b.shape[0] for b in bags) + 5
    x = torch.randn(len(bags), n_max, bags[0].shape[1], generator=generator, dtype=bags[0].dtype) * 1e4
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        n = bag.shape[0]
        pos = torch.sort(torch.randperm(n_max, generator=generator)[:n]).values if scatter else torch.arange(n)
        x[i, pos] = bag
        mask[i, pos] = True
    return x, mask


def random_bags(sizes: list[int], seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, IN_DIM, generator=g, dtype=dtype) for n in sizes]


# ---------------------------------------------------------------- generic: every model
@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("scatter", [False, True], ids=["front", "scattered"])
def test_padding_invariance(name, scatter):
    """A bag alone gives the same logits and instance scores as inside a padded batch."""
    model = build(name).double().eval()
    # 3 < 8 landmarks, 17 and 40 > 8; square sides 2, 5, 7 for TransMIL.
    bags = random_bags([3, 17, 40], seed=1)
    x, mask = padded_with_garbage(bags, scatter, torch.Generator().manual_seed(2))
    batched = model(x, mask, return_scores=True, **model_inputs(model, seed=0))
    assert torch.isfinite(batched.logits).all()
    for i, bag in enumerate(bags):
        alone = model(bag, return_scores=True, **model_inputs(model, seed=0))
        torch.testing.assert_close(batched.logits[i], alone.logits[0], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(batched.instance_scores[i][mask[i]], alone.instance_scores[0], rtol=1e-7, atol=1e-8)
        assert torch.all(batched.instance_scores[i][~mask[i]] == 0)


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariance(name):
    model = build(name).double().eval()
    bag = random_bags([29], seed=3)[0]
    perm = torch.randperm(29, generator=torch.Generator().manual_seed(4))
    out = model(bag, return_scores=True)
    out_perm = model(bag[perm], return_scores=True)
    torch.testing.assert_close(out_perm.logits, out.logits, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out_perm.instance_scores[0], out.instance_scores[0][perm], rtol=1e-7, atol=1e-9)


def test_transmil_is_order_dependent():
    """The reason TransMIL is left out of the permutation test (PPEG sees the grid)."""
    model = build("transmil").double().eval()
    bag = random_bags([29], seed=3)[0]
    perm = torch.randperm(29, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(model(bag).logits, model(bag[perm]).logits, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_reach_every_parameter(name):
    model = build(name, dropout=0.0).train()
    bags = random_bags([5, 12, 9, 20, 7, 15], seed=5, dtype=torch.float32)
    x, mask = padded_with_garbage(bags, scatter=False, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1, 2, 0, 1, 2])  # every class, so every in-class instance classifier is used
    out = model(x, mask, **model_inputs(model, seed=0))
    loss = model.loss(out, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shapes_multiclass(name):
    model = build(name).eval()
    bags = random_bags([4, 11], seed=7, dtype=torch.float32)
    x, mask = padded_with_garbage(bags, scatter=False, generator=torch.Generator().manual_seed(8))
    out = model(x, mask, **model_inputs(model, seed=0))
    assert out.logits.shape == (2, N_CLASSES) and out.instance_scores is None
    assert out.probs.shape == (2, N_CLASSES) and out.preds.shape == (2,)
    single = model(bags[0], return_scores=True, **model_inputs(model, seed=0))
    assert single.logits.shape == (1, N_CLASSES) and single.instance_scores.shape == (1, 4)
    with pytest.raises(ValueError, match="empty bag"):
        model(x, torch.zeros_like(mask))


def easy_task(n_bags: int, seed: int, in_dim: int = 8, shift: float = 6.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Positive bags hide 1-3 instances shifted by +``shift`` in every feature among 10-30 noise ones."""
    g = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n_bags):
        n = int(torch.randint(10, 31, (1,), generator=g))
        bag = torch.randn(n, in_dim, generator=g)
        label = i % 2
        if label:
            k = int(torch.randint(1, 4, (1,), generator=g))
            bag[torch.randperm(n, generator=g)[:k]] += shift
        bags.append(bag)
        labels.append(label)
    return bags, torch.tensor(labels)


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_training_run_separates_easy_task(name):
    torch.manual_seed(0)
    train_bags, train_y = easy_task(64, seed=10)
    test_bags, test_y = easy_task(40, seed=11)
    model = build(name, n_classes=2, in_dim=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(12)
    model.train()
    for _ in range(120):
        idx = torch.randperm(64, generator=g)[:8]
        x, mask = padded_with_garbage([train_bags[i] for i in idx], scatter=False, generator=g)
        loss = model.loss(model(x, mask), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, mask = padded_with_garbage(test_bags, scatter=False, generator=g)
        probs = model(x, mask).probs[:, 1]
    auc = roc_auc_score(test_y.numpy(), probs.numpy())
    acc = float(((probs > 0.5).long() == test_y).float().mean())
    # A training outcome, so a wide margin: over 16 seeds and 1e-4 weight perturbations (stand-ins
    # for another CPU's rounding) every model reached AUC >= 0.99 and accuracy >= 0.875 (mean
    # pooling; the others >= 0.95). Chance is 0.5 for both.
    assert auc >= 0.9 and acc >= 0.75, f"{name}: auc={auc:.3f} acc={acc:.3f}"


# ---------------------------------------------------------------- ABMIL
@pytest.mark.parametrize("name", ["abmil", "abmil-gated"])
def test_abmil_attention_matches_naive_loop(name):
    model = build(name).double().eval().requires_grad_(False)
    bags = random_bags([6, 13], seed=20)
    x, mask = padded_with_garbage(bags, scatter=True, generator=torch.Generator().manual_seed(21))
    out = model(x, mask, return_scores=True)
    emb, att = model.embed[0], model.attention
    for i, bag in enumerate(bags):
        scores, hs = [], []
        for inst in bag:  # one instance at a time, formula written out
            h = torch.relu(emb.weight @ inst + emb.bias)
            hidden = torch.tanh(att.V.weight @ h + att.V.bias)
            if att.U is not None:
                hidden = hidden * torch.sigmoid(att.U.weight @ h + att.U.bias)
            scores.append(float(att.w.weight[0] @ hidden))
            hs.append(h)
        total = sum(math.exp(s) for s in scores)
        weights = torch.tensor([math.exp(s) / total for s in scores], dtype=torch.float64)
        torch.testing.assert_close(out.instance_scores[i][mask[i]], weights, rtol=1e-9, atol=1e-12)
        z = sum(w * h for w, h in zip(weights, hs))
        torch.testing.assert_close(out.logits[i], model.head.weight @ z + model.head.bias, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- DSMIL
def test_dsmil_critical_instance_and_streams_match_reference():
    model = build("dsmil").double().eval().requires_grad_(False)
    bags = random_bags([9, 21], seed=30)
    x, mask = padded_with_garbage(bags, scatter=True, generator=torch.Generator().manual_seed(31))
    out = model(x, mask, return_scores=True)
    target = torch.tensor([2, 0])
    for i, bag in enumerate(bags):
        h = torch.relu(model.embed[0](bag))
        inst = model.instance_classifier(h)  # (n, K)
        real_pos = torch.nonzero(mask[i]).squeeze(1)
        crit = [int(torch.argmax(inst[:, k])) for k in range(N_CLASSES)]
        assert [int(real_pos[c]) for c in crit] == out.critical_index[i].tolist()
        max_logits = torch.stack([inst[crit[k], k] for k in range(N_CLASSES)])
        torch.testing.assert_close(out.max_logits[i], max_logits)
        q, v = model.query(h), model.value(h)
        bag_emb = []
        for k in range(N_CLASSES):
            s = torch.tensor([float(q[j] @ q[crit[k]]) / math.sqrt(q.shape[1]) for j in range(len(bag))], dtype=torch.float64)
            u = torch.softmax(s, 0)
            bag_emb.append((u[:, None] * v).sum(0))
        bag_logits = model.bag_classifier(torch.cat(bag_emb))
        torch.testing.assert_close(out.bag_logits[i], bag_logits)
        probs = 0.5 * torch.softmax(bag_logits, 0) + 0.5 * torch.softmax(max_logits, 0)
        torch.testing.assert_close(out.probs[i].double(), probs)
    expected = 0.5 * F.cross_entropy(out.bag_logits, target) + 0.5 * F.cross_entropy(out.max_logits, target)
    torch.testing.assert_close(model.loss(out, target).double(), expected)


# ---------------------------------------------------------------- CLAM-SB
def test_clam_topk_picks_highest_and_lowest_attention():
    g = torch.Generator().manual_seed(40)
    attention = torch.randn(4, 30, generator=g)
    mask = torch.zeros(4, 30, dtype=torch.bool)
    for b, n in enumerate([30, 9, 1, 4]):
        mask[b, torch.randperm(30, generator=g)[:n]] = True
    attention[~mask] = 1e6  # pads must never be chosen, even with huge attention
    top, bottom, valid = topk_pseudo_labels(attention, mask, k=8)
    for b, n in enumerate([30, 9, 1, 4]):
        kb = min(8, n // 2)
        assert int(valid[b].sum()) == kb
        real = torch.nonzero(mask[b]).squeeze(1)
        order = real[torch.argsort(attention[b, real], descending=True)]
        assert set(top[b, :kb].tolist()) == set(order[:kb].tolist())
        assert set(bottom[b, :kb].tolist()) == set(order[len(order) - kb:].tolist())


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_loss_matches_reference(subtyping):
    model = build("clam-sb", subtyping=subtyping, k_sample=3).double().eval()
    bags = random_bags([10, 5, 1], seed=41)
    x, mask = padded_with_garbage(bags, scatter=False, generator=torch.Generator().manual_seed(42))
    target = torch.tensor([1, 2, 0])
    out = model(x, mask)
    inst_losses = []
    for i, bag in enumerate(bags):
        h = torch.relu(model.embed[0](bag))
        a = model.attention(h)
        kb = min(3, len(bag) // 2)
        if kb == 0:
            continue
        order = torch.argsort(a, descending=True)
        pos, neg = h[order[:kb]], h[order[-kb:]]
        y = int(target[i])
        clf = model.instance_classifiers[y]
        loss = F.cross_entropy(clf(torch.cat([pos, neg])), torch.tensor([1] * kb + [0] * kb))
        if subtyping:
            for c in range(N_CLASSES):
                if c != y:
                    loss = loss + F.cross_entropy(model.instance_classifiers[c](pos), torch.zeros(kb, dtype=torch.long))
            loss = loss / N_CLASSES
        inst_losses.append(loss)
    expected = 0.7 * F.cross_entropy(out.logits, target) + 0.3 * torch.stack(inst_losses).mean()
    # the loss is computed in float32 whatever the model's dtype (as the base class does)
    torch.testing.assert_close(model.loss(out, target).double(), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- TransMIL blocks
def test_newton_schulz_pinv_matches_linalg_pinv():
    g = torch.Generator().manual_seed(50)
    a = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(newton_schulz_pinv(a, iterations=40), torch.linalg.pinv(a), rtol=1e-6, atol=1e-8)


def test_nystrom_equals_exact_attention_when_landmarks_cover_sequence():
    torch.manual_seed(51)
    block = NystromAttention(16, heads=2, num_landmarks=32, pinv_iterations=40).double().eval()
    with torch.no_grad():  # moderate logits keep the softmax matrix well conditioned
        block.to_qkv.weight.mul_(0.5)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    out, row = block(x, mask, return_first_row=True)
    torch.testing.assert_close(out, dense_attention_reference(x, block.to_qkv, block.to_out, heads=2), rtol=1e-6, atol=1e-7)
    q, k, _ = block.to_qkv(x).chunk(3, dim=-1)
    q, k = (t.view(2, 20, 2, 8).transpose(1, 2) for t in (q, k))
    dense_row = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(8), dim=-1).squeeze(2)
    torch.testing.assert_close(row, dense_row, rtol=1e-6, atol=1e-7)


def test_nystrom_with_few_landmarks_is_only_an_approximation():
    """Guards the previous test: the landmark path is really taken when m < n."""
    torch.manual_seed(52)
    block = NystromAttention(16, heads=2, num_landmarks=4, pinv_iterations=40).double().eval()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    out, _ = block(x, torch.ones(1, 20, dtype=torch.bool))
    assert not torch.allclose(out, dense_attention_reference(x, block.to_qkv, block.to_out, heads=2), atol=1e-4)


def test_segment_ids_are_near_equal_consecutive_splits_of_real_tokens():
    mask = torch.tensor([[True] * 10 + [False] * 2, [False, True] * 6, [True] * 3 + [False] * 9])
    ids, seg_mask = segment_ids(mask, 4)
    assert ids[0, :10].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3] and ids[0, 10:].tolist() == [4, 4]
    assert ids[1, 1::2].tolist() == [0, 0, 1, 2, 2, 3] and ids[1, 0::2].tolist() == [4] * 6
    assert ids[2, :3].tolist() == [0, 1, 2] and seg_mask[2].tolist() == [True, True, True, False]


def test_square_completion_repeats_first_instances():
    assert square_sides([1, 2, 4, 5, 10, 16, 17]) == [1, 2, 2, 3, 4, 4, 5]
    source, token_mask = square_token_sources([5, 2], [3, 2], torch.device("cpu"))
    assert source[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert source[1, :4].tolist() == [0, 1, 0, 1] and token_mask[1].tolist() == [True] * 4 + [False] * 5


def test_ppeg_on_common_grid_equals_each_bag_on_its_own_grid():
    torch.manual_seed(53)
    ppeg = PPEG(6).double()
    sides = [2, 5, 3]
    tokens = torch.randn(3, 25, 6, dtype=torch.float64) * 100  # garbage beyond each bag's H^2 tokens
    token_mask = torch.arange(25).unsqueeze(0) < torch.tensor([s * s for s in sides]).unsqueeze(1)
    out = ppeg(tokens, token_mask, sides)
    for b, h in enumerate(sides):
        grid = tokens[b, : h * h].T.reshape(1, 6, h, h)  # the bag's own H x H grid, row-major
        ref = grid + sum(conv(grid) for conv in ppeg.convs)
        torch.testing.assert_close(out[b, : h * h], ref.reshape(6, h * h).T[None][0])
        assert torch.all(out[b, h * h:] == 0)
