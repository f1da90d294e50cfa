"""Training-recipe parts (mmil.recipe) and adaptive sub-bags (mmil.grouping_adaptive): closed-form cases."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from mmil.data.bags import Bag
from mmil.grouping_adaptive import adaptive_counts
from mmil.models import create_model
from mmil.models.mmil_transformer import MMILTransformer
from mmil.recipe import ModelSelector, augment_bag, epoch_criterion, kept_instances, lr_factor


def test_lr_factor_closed_form():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(7, 10, 0, "constant") == 1.0
    m = 0.01
    assert lr_factor(2, 10, 2, "cosine", m) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine", m) == pytest.approx(m + (1 - m) * 0.5)  # half way: cos(pi/2) = 0
    assert lr_factor(10, 10, 2, "cosine", m) == pytest.approx(m)
    values = [lr_factor(s, 10, 2, "cosine") for s in range(2, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        lr_factor(0, 10, 0, "step")


def _run(selector: ModelSelector, criteria: list[float], tiebreaks: list[float] | None = None) -> list[int]:
    """The best epoch after each epoch."""
    out = []
    for e, c in enumerate(criteria, start=1):
        selector.update(e, c, -math.inf if tiebreaks is None else tiebreaks[e - 1])
        out.append(selector.best_epoch)
    return out


def test_selection_keeps_an_early_epoch_only_when_it_wins_by_the_margin():
    # epoch 1 best by 0.1 > margin 0.05: kept; epoch 1 best by 0.04 < margin: replaced at min_epoch
    assert _run(ModelSelector(50, 0, min_epoch=3, margin=0.05), [0.9, 0.7, 0.8, 0.75]) == [1, 1, 1, 1]
    assert _run(ModelSelector(50, 0, min_epoch=3, margin=0.05), [0.9, 0.7, 0.86, 0.85]) == [1, 1, 3, 3]
    # after the early best is replaced, the plain rule applies (strictly better)
    assert _run(ModelSelector(50, 0, min_epoch=3, margin=0.05), [0.9, 0.7, 0.86, 0.86, 0.87]) == [1, 1, 3, 3, 5]


def test_selection_ties_go_to_the_lower_loss_and_loss_rule_is_the_old_one():
    s = ModelSelector(50, 0, min_epoch=1, tol=1e-9)
    assert _run(s, [1.0, 1.0, 1.0], [-0.5, -0.3, -0.4]) == [1, 2, 2]
    losses = [0.7, 0.6, 0.65, 0.5, 0.5]
    old = ModelSelector(50, 0)
    assert _run(old, [-v for v in losses]) == [1, 2, 2, 4, 4]


def test_selection_stops_after_patience_once_past_min_epochs():
    s = ModelSelector(patience=2, min_epochs=5)
    _run(s, [0.5, 0.4, 0.3])
    assert s.counter == 2 and not s.should_stop(3) and s.should_stop(5)
    restored = ModelSelector(2, 5, **s.to_dict())
    assert restored.best_epoch == 1 and restored.counter == 2


def test_epoch_criterion_smooths_the_auc_and_breaks_ties_by_loss():
    hist = [{"val_loss": 0.6, "val_auc": 0.5}, {"val_loss": 0.5, "val_auc": 0.9}, {"val_loss": 0.4, "val_auc": 1.0}]
    assert epoch_criterion("auc", hist, "val_loss", 2) == (pytest.approx(0.95), -0.4, 0.4)
    assert epoch_criterion("loss", hist, "val_loss", 2) == (-0.4, -math.inf, 0.4)
    assert epoch_criterion("auc", [{"train_loss": 0.3}], "train_loss", 3)[0] == -0.3


def test_augment_bag_keeps_order_and_scales_noise():
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    bag = Bag("s", x, 1, coords=x.clone(), groups=torch.arange(20))
    out = augment_bag(bag, seed=3, instance_dropout=0.25)
    assert out.features.shape[0] == kept_instances(20, 0.25) == 15
    assert torch.equal(out.features, out.coords) and bool((out.groups.diff() > 0).all())
    assert augment_bag(bag, 0) is bag and torch.equal(bag.features, x)  # the bag itself untouched
    noisy = augment_bag(Bag("s", torch.randn(4000, 2) * torch.tensor([1.0, 10.0]), 0), seed=1, feature_noise=0.5)
    assert kept_instances(1, 0.9) == 1 and kept_instances(3, 0.5) == 2
    assert noisy.features.shape == (4000, 2)
    ratio = (noisy.features.std(0) / torch.tensor([1.0, 10.0])).tolist()
    assert all(1.05 < r < 1.2 for r in ratio)  # sqrt(1 + 0.25) = 1.118 in both units


def test_adaptive_counts_and_subbag_sizes_by_construction():
    n = torch.tensor([3, 16, 40, 159, 160, 5000])
    assert adaptive_counts(n, 10, 16).tolist() == [1, 1, 2, 9, 10, 10]
    model = MMILTransformer(4, 2, embed_dim=8, heads=1, head_dim=8, min_subbag_size=16)
    for size in (1, 5, 17, 40, 100, 163, 400):
        mask = torch.ones(1, size, dtype=torch.bool)
        g = model.assign_subbags(None, mask, generator=torch.Generator().manual_seed(0))
        counts = torch.bincount(g.ids[0], minlength=int(g.counts[0]))
        assert int(g.counts[0]) == max(1, min(10, size // 16))
        assert int(counts.min()) >= min(size, 16) and int(counts.sum()) == size


def test_adaptive_batch_and_released_mode():
    torch.manual_seed(0)
    released = MMILTransformer(4, 2, embed_dim=8, heads=1, head_dim=8).eval()
    adaptive = MMILTransformer(4, 2, embed_dim=8, heads=1, head_dim=8, min_subbag_size=16).eval()
    adaptive.load_state_dict(released.state_dict())
    big = torch.randn(1, 300, 4)  # >= G * 16: the same grouping and logits as released
    assert torch.equal(released(big, seed=5).logits, adaptive(big, seed=5).logits)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, :20], mask[1] = True, True
    out = adaptive(torch.randn(2, 300, 4), mask, seed=1)
    assert out.subbag_valid.sum(1).tolist() == [1, 10] and torch.isfinite(out.logits).all()
    small = torch.randn(1, 5, 4)
    assert released(small, seed=0).subbag_valid.sum().item() == 10
    registered = create_model("mmil", in_dim=4, n_classes=2, embed_dim=8, heads=1, head_dim=8)
    assert registered.min_subbag_size == 16 and registered.mask_ratio == 0.6


@pytest.mark.parametrize("n, k", [(10, 3), (7, 7), (3, 5), (1, 4), (9, 1)])
def test_pseudo_bags_partition_the_bag(n, k):
    from mmil.recipe import pseudo_bags

    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * torch.ones(1, 3)
    coords = torch.stack([torch.arange(n), -torch.arange(n)], 1)
    bag = Bag("s", x, 1, coords=coords, groups=torch.arange(n) % 2)
    parts = pseudo_bags(bag, k, seed=11)
    assert len(parts) == (min(k, n) if n > 1 else 1) and all(p.label == 1 and p.slide_id == "s" for p in parts)
    rows = [p.features[:, 0].long() for p in parts]
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(n))  # disjoint and complete
    assert max(map(len, rows)) - min(map(len, rows)) <= 1  # near-equal sizes
    for p, r in zip(parts, rows):
        assert torch.equal(r, r.sort().values)  # stored order kept
        assert torch.equal(p.coords[:, 0], r) and torch.equal(p.groups, r % 2)  # coords and groups follow
    again = pseudo_bags(bag, k, seed=11)
    assert all(torch.equal(a.features, b.features) for a, b in zip(parts, again))
    if 2 < k < n:  # another seed, another split
        assert any(not torch.equal(a.features, b.features) for a, b in zip(parts, pseudo_bags(bag, k, seed=12)))


def test_average_weights_closed_form_and_swap_restores():
    from mmil.recipe import average_weights, weights_swapped

    w = [{"w": torch.full((3,), float(e)), "n": torch.tensor(e)} for e in (1, 2, 4)]
    a = None
    for state in w:
        a = average_weights(a, state, decay=0.75)
    # a_3 = 0.75 (0.75 * 1 + 0.25 * 2) + 0.25 * 4 = 1.9375; the integer counter takes the last value
    assert torch.allclose(a["w"], torch.full((3,), 1.9375)) and int(a["n"]) == 4
    assert torch.equal(w[0]["w"], torch.ones(3))  # inputs untouched
    model = torch.nn.Linear(2, 1)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: torch.zeros_like(v) for k, v in own.items()}
    with weights_swapped(model, other):
        assert all(float(v.abs().sum()) == 0 for v in model.state_dict().values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    with weights_swapped(model, None):
        assert torch.equal(model.weight, own["weight"])


def test_epoch_order_shuffles_or_balances_the_classes():
    from scipy.stats import binomtest

    from mmil.recipe import epoch_order

    labels = np.array([0] * 90 + [1] * 10)
    perm = epoch_order(labels, np.random.default_rng(0))
    assert sorted(perm.tolist()) == list(range(100))
    draws = np.concatenate([epoch_order(labels, np.random.default_rng(s), balanced=True) for s in range(40)])
    assert len(draws) == 4000 and draws.min() >= 0 and draws.max() < 100
    minority = int((labels[draws] == 1).sum())
    assert binomtest(minority, len(draws), 0.5).pvalue > 1e-4  # about half the draws, not a tenth
    within = np.bincount(draws[labels[draws] == 1] - 90, minlength=10)
    assert within.min() > 0.5 * within.mean()  # uniform within the class
    same = epoch_order(labels, np.random.default_rng(7), balanced=True)
    np.testing.assert_array_equal(same, epoch_order(labels, np.random.default_rng(7), balanced=True))  # a function of the seed
