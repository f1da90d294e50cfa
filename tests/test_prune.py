"""Global magnitude pruning, R(p) against the actual pruned weights, and the threshold search."""
import math

import numpy as np
import pytest
import torch
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


N_PROBES = 128  # probe inputs e_0 .. e_127 (one-hot), one hidden unit each
N_HELP, N_HARM, N_ALWAYS_RIGHT = 40, 8, 60  # the other 20 probes are always wrong
BIAS_CLASS0 = 0.3
D_KNOWN = N_PROBES * N_PROBES + 2 * N_PROBES  # prunable weights: W1 (128 x 128) + W2 (2 x 128)
# Rank (position in ascending |w|) of the weight whose removal breaks each path: the 8 harmful
# paths between 15% and 25% of the weights, the 40 helpful ones between 55% and 95%.
HARM_BREAKS = [round(D_KNOWN * (0.15 + 0.10 * k / (N_HARM - 1))) for k in range(N_HARM)]
HELP_BREAKS = [round(D_KNOWN * (0.55 + 0.40 * k / (N_HELP - 1))) for k in range(N_HELP)]


def _magnitude(rank):
    """|w| of the weight at `rank`: the first 128 (the tiny W2[0, :]) below 0.002, the rest
    evenly spaced in [0.3, 3): distinct, at least 1.6e-4 apart (far above float32 rounding)."""
    if rank < N_PROBES:
        return 1e-3 * (1 + rank / N_PROBES)
    return 0.3 + 2.7 * (rank - N_PROBES) / (D_KNOWN - N_PROBES)


def _known_accuracy(removed):
    """Accuracy (in 128ths) when the `removed` smallest weights are zeroed."""
    helpful_intact = sum(r >= removed for r in HELP_BREAKS)
    harmful_broken = sum(r < removed for r in HARM_BREAKS)
    return N_ALWAYS_RIGHT + helpful_intact + harmful_broken


@pytest.fixture(scope="module")
def known_knee_model():
    """A 128-128-2 ReLU network whose accuracy under global magnitude pruning is known exactly.

    Probe j is the one-hot input e_j, so every logit is exact in any BLAS (one nonzero product
    plus a bias). Off-diagonal W1 weights are negative: ReLU zeroes them with or without pruning,
    so their magnitudes (spread over the whole range) only place the knee. Path j (48 of the 128
    hidden units) is W1[j, j] > 0 and W2[1, j] > 0 with a product >= 2, which beats the class-0
    bias 0.3 (W2[0, j] moves class 0 by < 0.01): probe j is class 1 while both weights remain and
    class 0 once either is removed. Helpful paths (label 1) are right until broken, harmful ones
    (label 0) right once broken; 60 probes without a path are always right (label 0), 20 always
    wrong (label 1). Dense accuracy 100/128; 108/128 once the harmful paths are broken at 15-25%;
    then it falls by 1/128 at each helpful break from 55% on.
    """
    model = nn.Sequential(nn.Linear(N_PROBES, N_PROBES), nn.ReLU(), nn.Linear(N_PROBES, 2))
    w1 = np.full((N_PROBES, N_PROBES), np.nan)
    w2 = np.full((2, N_PROBES), np.nan)
    labels = np.zeros(N_PROBES, dtype=np.int64)
    labels[:N_HELP] = 1  # helpful paths
    labels[N_HELP + N_HARM + N_ALWAYS_RIGHT:] = 1  # always wrong
    w2[0, :] = [(-1) ** k * _magnitude(k) for k in range(N_PROBES)]  # ranks 0..127
    breaks = HELP_BREAKS + HARM_BREAKS  # path j breaks at breaks[j]
    for j, rank in enumerate(breaks):
        partner = D_KNOWN - 1 - j  # the other weight of the path: among the largest
        a, b = (rank, partner) if j % 2 == 0 else (partner, rank)  # break in W1 or in W2, alternately
        w1[j, j], w2[1, j] = _magnitude(a), _magnitude(b)
    used = set(range(N_PROBES)) | set(breaks) | {D_KNOWN - 1 - j for j in range(len(breaks))}
    free = iter(r for r in range(D_KNOWN) if r not in used)
    for i in range(N_PROBES):  # no effect on any probe: negative W1 (ReLU), W2[1, j] of units never active
        for j in range(N_PROBES):
            if np.isnan(w1[i, j]):
                w1[i, j] = -_magnitude(next(free))
    for j in range(N_PROBES):
        if np.isnan(w2[1, j]):
            w2[1, j] = (-1) ** j * _magnitude(next(free))
    assert next(free, None) is None
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w1))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor(w2))
        model[2].bias.copy_(torch.tensor([BIAS_CLASS0, 0.0]))
    x, y = torch.eye(N_PROBES), torch.tensor(labels)

    def eval_fn(m):
        out = m(x)
        return (out.argmax(1) == y).float().mean().item(), nn.functional.cross_entropy(out, y).item()

    return model, eval_fn


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.02])
def test_actual_threshold_equals_exhaustive_sweep(known_knee_model, tolerance):
    model, eval_fn = known_knee_model
    before = _flat(prunable_parameters(model)).clone()
    assert before.numel() == D_KNOWN and torch.unique(before.abs()).numel() == D_KNOWN  # no ties
    sweep, removed = [], []
    with MagnitudeMasker(model) as masker:
        for i in range(1000):
            removed.append(masker.apply(i / 1000))
            sweep.append(eval_fn(model)[0])
    sweep = np.array(sweep)
    # the network behaves as constructed at every ratio (exact: k/128 is a float32)
    assert sweep.tolist() == [_known_accuracy(r) / N_PROBES for r in removed]
    failing = np.nonzero(sweep < sweep[0] - tolerance)[0]
    exhaustive = (failing[0] - 1) / 1000 if failing.size else 0.999
    # 1/128 = 0.0078: tolerance 0.01 allows one probe lost, 0.02 two; the sweep fails at the next helpful break
    knee_rank = HELP_BREAKS[N_HARM + int(tolerance * N_PROBES)]
    assert exhaustive == (min(i for i, r in enumerate(removed) if r > knee_rank) - 1) / 1000
    assert 0.3 < exhaustive < 0.99  # a real knee

    res = actual_threshold(model, eval_fn, tolerance=tolerance)
    assert res.threshold == pytest.approx(exhaustive, abs=1e-12)
    assert res.kept_fraction == pytest.approx(1 - exhaustive)
    assert res.num_evaluations == len(res.ratios) < 120
    assert res.dense_accuracy == sweep[0] == 100 / 128
    # every recorded point is what the sweep saw at that ratio
    np.testing.assert_array_equal(res.accuracies, sweep[np.round(np.array(res.ratios) * 1000).astype(int)])
    above = [r for r, a in zip(res.ratios, res.accuracies) if a > res.dense_accuracy]
    assert above  # the harmful paths are broken at 15-25%: accuracy above the dense one
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
