"""Global magnitude pruning, R(p) against the actual pruned weights, and the threshold search."""
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from prunelimit.errors import PruneLimitError
from prunelimit.geometry import radius_curve
from prunelimit.params import prunable_modules, prunable_parameters
from prunelimit.prune import MagnitudeMasker, actual_threshold, prune_global, remove_masks




def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 7),
                         nn.ReLU(), nn.Linear(7, 4))


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_prunable_parameters_are_linear_and_conv_weights():
    net = _net()
    params = prunable_parameters(net)
    assert [p is m.weight for p, m in zip(params, [net[0], net[4], net[6]])] == [True] * 3
    assert len(prunable_modules(net)) == 3
    with pytest.raises(PruneLimitError, match="no Linear or Conv"):
        prunable_parameters(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.77, 0.9, 0.999])
def test_prune_global_removes_smallest_and_radius_matches(ratio):
    net = _net()
    before = _flat(prunable_parameters(net)).double().numpy()
    D = before.size
    prune_global(net, ratio)
    after = torch.cat([m.weight.detach().reshape(-1) for m, _ in prunable_modules(net)]).double().numpy()
    masks = torch.cat([m.weight_mask.reshape(-1) for m, _ in prunable_modules(net)]).numpy()
    kept = math.ceil(round((1 - ratio) * D, 9))
    assert int(masks.sum()) == kept
    # the removed weights are the smallest in magnitude
    removed_mag, kept_mag = np.abs(before[masks == 0]), np.abs(before[masks == 1])
    if removed_mag.size and kept_mag.size:
        assert removed_mag.max() <= kept_mag.min()
    # R(p) from the sorted cumulative sum equals the norm of the actual weight difference
    assert radius_curve(before)(ratio) == pytest.approx(np.linalg.norm(before - after), rel=1e-12, abs=1e-15)
    remove_masks(net)
    assert not hasattr(net[4], "weight_mask")
    np.testing.assert_array_equal(_flat(prunable_parameters(net)).double().numpy(), after)


def test_prune_global_with_explicit_params_and_bad_ratios():
    net = _net()
    prune_global(net, 0.5, params=[net[4].weight, net[6].weight])
    assert hasattr(net[4], "weight_mask") and not hasattr(net[0], "weight_mask")
    assert int(net[4].weight_mask.sum() + net[6].weight_mask.sum()) == math.ceil(0.5 * (108 * 7 + 28))
    with pytest.raises(PruneLimitError, match="already carries pruning masks"):
        prune_global(net, 0.2)
    for bad in (-0.1, 1.0, 1.5, float("nan"), "half"):
        with pytest.raises(PruneLimitError, match="pruning ratio"):
            prune_global(_net(), bad)
    with pytest.raises(PruneLimitError, match="no Linear or Conv"):
        prune_global(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(PruneLimitError, match="not a parameter of the model"):
        prune_global(_net(), 0.5, params=[torch.nn.Parameter(torch.ones(3))])


def test_magnitude_masker_matches_prune_global_and_restores():
    net = _net()
    original = _flat(prunable_parameters(net)).clone()
    with MagnitudeMasker(net) as masker:
        for ratio in (0.9, 0.25, 0.6):  # in any order: always relative to the original weights
            masker.apply(ratio)
            ref_net = _net()
            prune_global(ref_net, ratio)
            expected = torch.cat([m.weight.detach().reshape(-1) for m, _ in prunable_modules(ref_net)])
            assert torch.equal(_flat(prunable_parameters(net)), expected)
    assert torch.equal(_flat(prunable_parameters(net)), original)


@pytest.fixture(scope="module")
def digits_model():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):  # l1-regularized: most small weights end near zero (the LOMP regime)
        opt.zero_grad()
        l1 = sum(m.weight.abs().sum() for m in model if isinstance(m, nn.Linear))
        (nn.functional.cross_entropy(model(x[:1400]), y[:1400]) + 1e-3 * l1).backward()
        opt.step()
    xt, yt = x[1400:], y[1400:]

    def eval_fn(m):
        out = m(xt)
        return (out.argmax(1) == yt).float().mean().item(), nn.functional.cross_entropy(out, yt).item()

    return model, eval_fn


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.02])
def test_actual_threshold_equals_exhaustive_sweep(digits_model, tolerance):
    model, eval_fn = digits_model
    before = _flat(prunable_parameters(model)).clone()
    sweep = []
    with MagnitudeMasker(model) as masker:
        for i in range(1000):
            masker.apply(i / 1000)
            sweep.append(eval_fn(model)[0])
    sweep = np.array(sweep)
    failing = np.nonzero(sweep < sweep[0] - tolerance)[0]
    exhaustive = (failing[0] - 1) / 1000 if failing.size else 0.999
    assert 0.3 < exhaustive < 0.99  # a real knee

    res = actual_threshold(model, eval_fn, tolerance=tolerance)
    assert res.threshold == pytest.approx(exhaustive, abs=1e-12)
    assert res.kept_fraction == pytest.approx(1 - exhaustive)
    assert res.num_evaluations == len(res.ratios) < 120
    assert res.dense_accuracy == sweep[0]
    # every recorded point is what the sweep saw at that ratio
    np.testing.assert_array_equal(res.accuracies, sweep[np.round(np.array(res.ratios) * 1000).astype(int)])
    above = [r for r, a in zip(res.ratios, res.accuracies) if a > res.dense_accuracy]
    assert res.released_threshold == (max(above) if above else 0.0)
    assert torch.equal(_flat(prunable_parameters(model)), before)  # weights restored


def test_actual_threshold_on_a_known_step():
    # accuracy stays at 0.9 while fewer than 4321 of 10,000 weights are removed, then collapses
    model = nn.Linear(100, 100, bias=False)

    def eval_fn(m):
        removed = int((m.weight == 0).sum())
        return (0.9 if removed < 4321 else 0.2), float(removed)

    res = actual_threshold(model, eval_fn)
    assert res.threshold == pytest.approx(0.432)  # 0.432 removes 4320, 0.433 removes 4330
    assert res.num_evaluations < 40
    with pytest.raises(PruneLimitError, match="fraction"):
        actual_threshold(model, lambda m: (97.0, 0.1))
    with pytest.raises(PruneLimitError, match="tolerance"):
        actual_threshold(model, eval_fn, tolerance=-0.1)
