"""prunelimit on a MIL model: the adapter gives an exact, deterministic Hessian of the mean bag loss.

Sequential grouping keeps each bag's sub-bags independent of how bags are batched, so the
padded batches can be held against bags run one by one."""
import pytest
import torch

from mmil.data.synth import synthetic_bags
from mmil.data.dataset import BagDataset
from mmil.models import create_model
from mmil.pruning import FixedGroupingLogits, bag_batches, prune_limit


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bags = synthetic_bags(n_slides=8, seed=0, in_dim=6, min_instances=5, max_instances=12)
    ds = BagDataset.from_bags(bags)
    model = create_model("mmil", in_dim=6, n_classes=2, embed_dim=8, heads=2, head_dim=4, num_subbags=3, grouping="sequential", proj_dropout=0.0).double()
    return ds, model


def _mean_loss(model, ds, seed):
    losses = [torch.nn.functional.cross_entropy(model(ds[i].features.double()[None], seed=seed).logits, torch.tensor([ds[i].label])) for i in range(len(ds))]
    return torch.stack(losses).mean()


def test_padded_batches_give_the_mean_loss_over_bags(tiny):
    ds, model = tiny
    net = FixedGroupingLogits(model, seed=3).eval()
    batches = bag_batches(ds, bags_per_batch=3)
    total = sum(torch.nn.functional.cross_entropy(net(x.double(), m), y) * len(y) for (x, m), y in batches)
    assert torch.allclose(total / len(ds), _mean_loss(model.eval(), ds, seed=3), atol=1e-10)


def test_hvp_through_the_adapter_matches_the_dense_hessian(tiny):
    import prunelimit as pl
    from torch.func import functional_call

    ds, _ = tiny
    torch.manual_seed(1)  # a smaller net keeps the dense Hessian cheap (about 150 weights)
    model = create_model("mmil", in_dim=6, n_classes=2, embed_dim=4, heads=2, head_dim=2, num_layers=1, num_subbags=3, grouping="sequential", proj_dropout=0.0).double()
    net = FixedGroupingLogits(model, seed=1).eval()
    params = pl.prunable_parameters(net)
    names = {id(p): n for n, p in net.named_parameters()}
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    w0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        override = {names[id(p)]: c.view(s) for p, c, s in zip(params, chunks, shapes)}
        losses = []
        for i in range(len(ds)):
            logits = functional_call(net, override, (ds[i].features.double()[None], torch.ones(1, ds[i].num_instances, dtype=torch.bool)))
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([ds[i].label])))
        return torch.stack(losses).mean()

    dense = torch.autograd.functional.hessian(loss_of, w0)
    op = pl.HessianOperator(net, torch.nn.CrossEntropyLoss(), [((x.double(), m), y) for (x, m), y in bag_batches(ds, 2)])
    v = torch.randn(w0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = torch.as_tensor(op @ v)
    assert torch.allclose(hv, dense @ v, atol=1e-8, rtol=1e-6)


def test_prune_limit_restores_weights_and_reports_consistent_ratios(tiny):
    ds, model = tiny
    model = model.float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune_limit(model, ds, ds, lanczos_steps=20, num_probes=2, bags_per_batch=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert 0.0 <= res.predicted_ratio < 1.0 and 0.0 <= res.actual_ratio < 1.0
    ratios = [r for r, _, _ in res.curve]
    assert ratios == sorted(ratios) and res.curve[0][0] == 0.0
    assert res.curve[0][1] == pytest.approx(res.dense_accuracy)
    # first-drop criterion: every evaluated ratio up to the threshold keeps the dense accuracy
    assert all(acc >= res.dense_accuracy - 1e-12 for r, acc, _ in res.curve if r <= res.actual_ratio)
    assert res.num_prunable == sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)


def test_cli_prune_limit_on_a_trained_checkpoint(tmp_path, capsys):
    import json

    from mmil.checkpoint import save_checkpoint
    from mmil.cli import main
    from mmil.data.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_slides=6, seed=0, in_dim=8, min_instances=20, max_instances=40)
    kwargs = dict(in_dim=8, n_classes=2, embed_dim=8, heads=2, head_dim=4, num_subbags=2)
    model = create_model("mmil", **kwargs)
    save_checkpoint(tmp_path / "ckpt", model, "mmil", kwargs, extra={"class_names": ["0", "1"]})
    out = tmp_path / "limit.json"
    code = main(["prune-limit", "--checkpoint", str(tmp_path / "ckpt"), "--features", str(data / "features"),
                 "--labels", str(data / "labels.csv"), "--out", str(out), "--lanczos-steps", "10", "--probes", "1"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["num_prunable"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert report["predicted_kept_fraction"] == pytest.approx(1 - report["predicted_ratio"])
    printed = capsys.readouterr().out
    assert "predicted threshold" in printed
    # an untrained model has almost no weights near zero: the report says it is outside the LOMP regime
    assert report["near_zero_fraction"] < 0.5 and "outside the LOMP regime" in report["regime"] and "outside" in printed
    # a directory without labels is refused with one line naming the fix
    assert main(["prune-limit", "--checkpoint", str(tmp_path / "ckpt"), "--features", str(data / "features"), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
