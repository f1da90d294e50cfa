"""Negative mixing (``TrainConfig.negative_mix``): a training bag with a negative slide's instances inserted.

Checked by construction: instances are tagged with their index (feature 0) and their source (feature 1), so every
claim (the bag's own instances all stay, in order; the donor's are a subset of the donor, in order; the count; the
positions) is read off the mixed bag directly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmil.config import LEGACY_TRAIN_VALUES, TrainConfig
from mmil.data import BagDataset
from mmil.data.bags import Bag
from mmil.errors import MMILInputError
from mmil.recipe import mix_in_negative, negative_donors, pick_donor
from mmil.train import train_fold


def tagged_bag(n: int, source: float, label: int = 0, coords: bool = True) -> Bag:
    """``n`` instances whose features are (index, source, 0): order and origin readable after mixing."""
    x = torch.zeros(n, 3)
    x[:, 0], x[:, 1] = torch.arange(n, dtype=torch.float32), source
    xy = torch.stack([torch.arange(n), torch.full((n,), int(source))], 1) if coords else None
    return Bag(f"s{source:g}", x, label, xy)


@pytest.mark.parametrize("n, m, fraction", [(40, 30, 0.5), (10, 100, 1.0), (40, 7, 0.5), (9, 3, 2.0), (5, 5, 0.01)])
def test_mixed_bag_keeps_every_own_instance_and_adds_donor_instances(n, m, fraction):
    bag, donor = tagged_bag(n, 1.0, label=1), tagged_bag(m, 2.0)
    mixed = mix_in_negative(bag, donor, fraction, seed=3)
    k = round(fraction * n)
    x = mixed.features
    own, other = x[x[:, 1] == 1.0, 0], x[x[:, 1] == 2.0, 0]
    assert mixed.num_instances == n + k and mixed.label == 1 and mixed.slide_id == bag.slide_id
    assert torch.equal(own, torch.arange(n, dtype=torch.float32))  # all own instances, stored order
    assert len(other) == k and bool((other[1:] >= other[:-1]).all())  # donor instances in stored order
    assert set(other.tolist()) <= set(range(m))
    if k <= m:
        assert len(set(other.tolist())) == k  # without replacement while the donor has enough
    assert torch.equal(mixed.coords[:, 1].float(), x[:, 1])  # coords follow their instances
    assert torch.equal(mixed.coords[:, 0].float(), x[:, 0])
    assert bag.num_instances == n  # the input bag is not changed


def test_mixing_is_seeded_and_spreads_the_donor_over_the_bag():
    bag, donor = tagged_bag(200, 1.0), tagged_bag(200, 2.0)
    a, b = mix_in_negative(bag, donor, 0.5, seed=7), mix_in_negative(bag, donor, 0.5, seed=7)
    assert torch.equal(a.features, b.features)
    assert not torch.equal(a.features, mix_in_negative(bag, donor, 0.5, seed=8).features)
    slots = (a.features[:, 1] == 2.0).nonzero().flatten().float()
    # 100 insertion slots among 300, uniformly random: their mean position is 149.5 +- 8.2 (sd), far from a block at either end
    assert abs(float(slots.mean()) - 149.5) < 50


def test_nothing_to_mix_returns_the_bag_and_missing_coords_give_none():
    bag = tagged_bag(10, 1.0)
    assert mix_in_negative(bag, tagged_bag(10, 2.0), 0.0, seed=0) is bag
    assert mix_in_negative(bag, tagged_bag(0, 2.0), 0.5, seed=0) is bag
    mixed = mix_in_negative(bag, tagged_bag(10, 2.0, coords=False), 0.5, seed=0)
    assert mixed.coords is None and mixed.num_instances == 15


def test_donors_are_the_negative_bags_and_never_the_bag_itself():
    labels = np.array([0, 1, 0, 1, 0])
    donors = negative_donors(labels, 2)
    assert donors.tolist() == [0, 2, 4]
    picks = [pick_donor(donors, 2, seed) for seed in range(400)]
    assert set(picks) == {0, 4} and 150 < picks.count(0) < 250  # uniform over the others: 200 +- 10 expected
    assert {pick_donor(donors, 1, seed) for seed in range(200)} == {0, 2, 4}
    with pytest.raises(MMILInputError, match="two classes"):
        negative_donors(np.array([0, 1, 2, 0]), 3)
    with pytest.raises(MMILInputError, match="at least two negative"):
        negative_donors(np.array([0, 1, 1]), 2)


def test_option_range_and_old_runs_compare_at_zero():
    assert TrainConfig().negative_mix == 0.0 and LEGACY_TRAIN_VALUES["negative_mix"] == 0.0
    with pytest.raises(MMILInputError, match="negative_mix"):
        TrainConfig(negative_mix=-0.1)


def _dataset(n_bags: int, n_classes: int) -> BagDataset:
    g = torch.Generator().manual_seed(0)
    return BagDataset.from_bags([Bag(f"b{i}", torch.randn(12, 4, generator=g), i % n_classes) for i in range(n_bags)])


def test_training_with_negative_mix_differs_from_without_and_is_reproducible(tmp_path):
    data = _dataset(8, 2)
    cfg = dict(epochs=2, min_epochs=2, seed=0, progress=False, log_every=0)
    runs = {}
    for name, mix in (("a", 0.5), ("b", 0.5), ("off", 0.0)):
        res = train_fold(data, data.subset([0, 1, 2, 3]), "abmil", {"embed_dim": 8, "attn_dim": 4}, TrainConfig(negative_mix=mix, **cfg), tmp_path / name)
        runs[name] = [h["train_loss"] for h in res.history]
    assert runs["a"] == runs["b"] and runs["a"] != runs["off"]


def test_training_refuses_negative_mix_on_three_classes(tmp_path):
    with pytest.raises(MMILInputError, match="negative-mix needs two classes"):
        train_fold(_dataset(9, 3), None, "abmil", {}, TrainConfig(negative_mix=0.5, epochs=1, progress=False), tmp_path / "r")
