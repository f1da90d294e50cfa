"""Pruning criteria: exact global sparsity, SNIP and SynFlow scores against finite differences and closed forms, rewinding."""
import math

import pytest
import torch
from torch import nn

from prunelimit.methods import (apply_masks, global_masks, magnitude_scores, random_scores, rewind, snip_scores, sparsity_by_layer,
                                synflow_masks, synflow_scores)
from prunelimit.params import prunable_modules


def _mlp(seed=0, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.ReLU(), nn.Linear(4, 3, bias=bias)).to(dtype)


def _count_kept(masks):
    return int(sum(m.sum() for m in masks))


@pytest.mark.parametrize("sparsity", [0.0, 0.13, 0.5, 0.9, 0.97])
def test_global_masks_keep_exactly_ceil_of_the_kept_fraction_even_with_ties(sparsity):
    scores = [torch.ones(4, 5), torch.full((3, 4), 1.0), torch.zeros(7)]  # all tied within and across tensors
    masks = global_masks(scores, sparsity)
    assert _count_kept(masks) == math.ceil(round((1 - sparsity) * 39, 9))
    assert [m.shape for m in masks] == [s.shape for s in scores]


def test_global_masks_rank_by_score_and_keep_removed_weights_removed():
    scores = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 2.0])]
    masks = global_masks(scores, 0.4)
    assert [m.tolist() for m in masks] == [[1, 0, 1], [1, 0]]
    again = global_masks([torch.tensor([0.0, 9.0, 0.0]), torch.tensor([9.0, 9.0])], 0.4, previous=masks)
    assert again[0][1] == 0 and again[1][1] == 0  # a removed weight never comes back
    with pytest.raises(ValueError, match="sparsity"):
        global_masks(scores, 1.0)


def test_apply_masks_gives_the_requested_sparsity_and_replaces_earlier_masks():
    model = _mlp()
    apply_masks(model, global_masks(magnitude_scores(model), 0.5))
    apply_masks(model, global_masks(random_scores(model, seed=1), 0.75))
    removed = sum(int((m.weight == 0).sum()) for m, _ in prunable_modules(model))
    assert removed == 32 - math.ceil(0.25 * 32)
    per_layer = sparsity_by_layer(model)
    assert set(per_layer) == {"0", "2"} and all(0 <= v <= 1 for v in per_layer.values())


def test_random_scores_depend_on_the_seed_only():
    model = _mlp()
    assert all(torch.equal(a, b) for a, b in zip(random_scores(model, 3), random_scores(_mlp(seed=9), 3)))
    assert not torch.equal(random_scores(model, 3)[0], random_scores(model, 4)[0])


def test_snip_scores_equal_w_times_finite_difference_gradient():
    model = _mlp(dtype=torch.float64)
    x, y = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    scores = snip_scores(model, loss_fn, x, y)
    h = 1e-6
    for (module, _), score in zip(prunable_modules(model), scores):
        w = module.weight
        for idx in [(0, 0), (1, 2), (w.shape[0] - 1, w.shape[1] - 1)]:
            with torch.no_grad():
                w[idx] += h
                up = loss_fn(model(x), y).item()
                w[idx] -= 2 * h
                down = loss_fn(model(x), y).item()
                w[idx] += h
            assert score[idx].item() == pytest.approx(abs(w[idx].item() * (up - down) / (2 * h)), rel=1e-6, abs=1e-12)


def test_synflow_scores_match_the_closed_form_and_restore_the_weights():
    # no bias, ReLU: with |W| and an all-ones input R = 1'|W2||W1|1, so dR/dW1_ij = sum_k |W2_ki| and dR/dW2_ki = sum_j |W1_ij|
    model = _mlp(bias=False)
    before = [p.detach().clone() for p in model.parameters()]
    s1, s2 = synflow_scores(model, (5,))
    w1, w2 = before[0].double().abs(), before[1].double().abs()
    torch.testing.assert_close(s1, w1 * w2.sum(0)[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(s2, w2 * w1.sum(1)[None, :], rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert next(model.parameters()).dtype == torch.float32 and model.training


def test_synflow_masks_reach_the_sparsity_and_leave_no_masks_behind():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    masks = synflow_masks(model, (1, 8, 8), 0.9, rounds=10)
    total = sum(m.numel() for m in masks)
    assert _count_kept(masks) == math.ceil(round(0.1 * total, 9))
    assert all(m.sum() > 0 for m in masks)  # iterative scoring does not wipe out a layer
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    assert all((m.weight != 0).all() for m, _ in prunable_modules(model))  # scoring prunes nothing for real


def test_rewind_restores_early_weights_on_kept_positions():
    model = _mlp()
    early = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training"
    masks = global_masks(magnitude_scores(model), 0.6)
    rewind(model, early, masks)
    for (module, _), mask, key in zip(prunable_modules(model), masks, ("0.weight", "2.weight")):
        torch.testing.assert_close(module.weight, early[key] * mask, rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, early["0.bias"], rtol=0, atol=0)
