"""Hessian operator, SLQ, Hutchinson, Hessian rows, null mass and epsilon against exact dense Hessians.

The reference is torch.autograd.functional.hessian of a functional version of each model
(torch.func.functional_call over the flattened prunable weights), in float64.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn
from torch.func import functional_call

from prunelimit.epsilon import loss_epsilon
from prunelimit.errors import PruneLimitError
from prunelimit.estimators import (
    SpectrumEstimate,
    hessian_rows,
    hessian_rows_null_mass,
    hutchinson_trace,
    quantile_indices,
    rademacher,
    slq,
)
from prunelimit.hessian import HessianOperator, hessian_operator
from prunelimit.prediction import predict_threshold
from prunelimit.params import prunable_parameters

LOSS = nn.CrossEntropyLoss()




def dense_hessian(model, loss_fn, data, params):
    """Exact Hessian of the batch-size-weighted mean loss, eval mode, w.r.t. the flattened params."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names, shapes = [name_of[id(p)] for p in params], [p.shape for p in params]
    total = sum(len(t) for _, t in data)
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update(dict(model.named_buffers()))

    def mean_loss(flat):
        values, offset = dict(state), 0
        for n, s in zip(names, shapes):
            values[n] = flat[offset : offset + s.numel()].view(s)
            offset += s.numel()
        training = model.training
        model.eval()  # dropout off, batch-norm running statistics
        try:
            return sum(loss_fn(functional_call(model, values, (x,)), t) * len(t) for x, t in data) / total
        finally:
            model.train(training)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(mean_loss, flat0, vectorize=True)
    return H, mean_loss, flat0


def _mlp():
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def _conv():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 5, 3), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(45, 3))


def _tanh():
    return nn.Sequential(nn.Linear(8, 30), nn.Tanh(), nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 4))


def _make_case(kind):
    torch.manual_seed({"mlp": 0, "conv": 1, "tanh": 2}[kind])
    model, shape, classes = {"mlp": (_mlp(), (10,), 3), "conv": (_conv(), (1, 8, 8), 3),
                             "tanh": (_tanh(), (8,), 4)}[kind]
    model = model.double()
    x = torch.randn(110, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (110,))
    if kind != "tanh":  # train a little; the tanh net stays at its random init (not a minimum)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(150):
            opt.zero_grad()
            LOSS(model(x), y).backward()
            opt.step()
    if kind == "conv":  # non-trivial running statistics: eval mode must use them
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.2, 0.2)
            model[1].running_var.uniform_(0.5, 1.5)
    model.train()  # the operator must switch to eval mode itself
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 110, 32)]  # uneven last batch (14)
    params = prunable_parameters(model)
    H, mean_loss, flat0 = dense_hessian(model, LOSS, data, params)
    eig = torch.linalg.eigvalsh(H).numpy()
    return {"model": model, "data": data, "params": params, "H": H, "eig": eig, "mean_loss": mean_loss,
            "flat0": flat0, "kind": kind}


_SLQ_CACHE = {}


def _long_slq(case):
    """One long SLQ run per model (300 steps, 4 probes); shorter runs are its truncations."""
    if case["kind"] not in _SLQ_CACHE:
        _SLQ_CACHE[case["kind"]] = slq(hessian_operator(case["model"], LOSS, case["data"]), num_steps=300, num_probes=4, seed=1)
    return _SLQ_CACHE[case["kind"]]


@pytest.fixture(scope="module", params=["mlp", "conv", "tanh"])
def case(request):
    return _make_case(request.param)


@pytest.fixture(scope="module")
def tanh_case():
    return _make_case("tanh")


@pytest.mark.parametrize("cache_graph", [True, False])
def test_hvp_equals_dense_hessian_times_vector(case, cache_graph):
    op = HessianOperator(case["model"], LOSS, case["data"], cache_graph=cache_graph)
    assert op.cached is cache_graph
    assert op.shape == case["H"].shape
    assert case["model"].training  # training flag restored
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, dtype=torch.float64, generator=gen)
        assert (op @ v - case["H"] @ v).abs().max().item() < 1e-6 * max(1.0, case["H"].abs().max().item())
        assert (op @ v - case["H"] @ v).abs().max().item() < 1e-10
    assert op.num_products == 6
    v = np.random.default_rng(0).standard_normal(op.dim)
    out = op @ v
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, case["H"].numpy() @ v, atol=1e-10)
    mat = np.random.default_rng(1).standard_normal((op.dim, 2))
    np.testing.assert_allclose(op @ mat, case["H"].numpy() @ mat, atol=1e-10)


def test_gradient_and_loss_are_full_data_means(case):
    op = HessianOperator(case["model"], LOSS, case["data"])
    flat0 = case["flat0"].clone().requires_grad_(True)
    loss = case["mean_loss"](flat0)
    (grad,) = torch.autograd.grad(loss, flat0)
    assert op.loss() == pytest.approx(loss.item(), rel=1e-12)
    assert (op.gradient() - grad).abs().max().item() < 1e-12
    assert op.num_samples == 110


def test_hessian_rows_equal_dense_rows(case):
    op = HessianOperator(case["model"], LOSS, case["data"])
    idx = [0, 5, op.dim // 2, op.dim - 1]
    np.testing.assert_allclose(hessian_rows(op, idx), case["H"].numpy()[idx], atol=1e-10)
    rows = hessian_rows(hessian_operator(case["model"], LOSS, case["data"]), [3])
    np.testing.assert_allclose(rows[0], case["H"].numpy()[3], atol=1e-10)


def test_slq_spectral_measure_matches_eigvalsh(case):
    eig = case["eig"]
    spread = eig.max() - eig.min()
    full = _long_slq(case)
    width = min(300, len(eig))
    assert full.nodes.shape == full.weights.shape == (4, width)
    assert full.num_products == sum(full.steps) and max(full.steps) <= width
    est = full.truncated(100)
    assert est.nodes.shape == est.weights.shape == (4, 100)
    np.testing.assert_allclose(est.weights.sum(axis=1), 1.0, atol=1e-12)
    w1 = scipy.stats.wasserstein_distance(eig, est.nodes.ravel(), v_weights=est.weights.ravel())
    assert w1 < 0.01 * spread
    # extreme Ritz values converge to the extreme eigenvalues
    assert est.nodes.max() == pytest.approx(eig.max(), rel=1e-6)
    assert est.nodes[est.weights > 0].min() == pytest.approx(eig.min(), rel=1e-3)


def test_predicted_threshold_exact_vs_slq(case):
    w = case["flat0"].numpy()
    eps = 0.02
    exact = predict_threshold(w, eps, case["eig"])
    approx = predict_threshold(w, eps, _long_slq(case))
    assert abs(approx.predicted_ratio - exact.predicted_ratio) < 0.02
    assert 0.05 < exact.predicted_ratio < 0.95  # a non-trivial threshold


def test_hutchinson_trace_within_three_standard_errors(case):
    exact = float(np.trace(case["H"].numpy()))
    est = hutchinson_trace(hessian_operator(case["model"], LOSS, case["data"]), num_samples=30, seed=0)
    assert est.samples.shape == (30,)
    assert est.stderr == pytest.approx(est.samples.std(ddof=1) / math.sqrt(30))
    assert abs(est.mean - exact) < 3 * est.stderr
    assert est.stderr < 0.5 * abs(exact)  # informative, not a vacuous interval


def test_non_positive_definite_hessian_is_handled(tanh_case):
    eig = tanh_case["eig"]
    assert eig.min() < -1e-3 * eig.max()  # genuinely indefinite
    est = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=150, num_probes=2, seed=0)
    assert est.nodes.min() == pytest.approx(eig.min(), rel=1e-6)
    # Per probe, the Gauss quadrature of the negative part and of |lambda| (what G uses) matches
    # v^T f(H) v computed from the dense eigendecomposition, with the probes slq drew from its seed.
    lam, vecs = np.linalg.eigh(tanh_case["H"].numpy())
    gen = torch.Generator().manual_seed(0)
    for k in range(2):
        v = rademacher(len(lam), gen).numpy() / math.sqrt(len(lam))
        mass = (vecs.T @ v) ** 2
        for f in (lambda t: np.minimum(t, 0.0), np.abs):
            assert (est.weights[k] * f(est.nodes[k])).sum() == pytest.approx(mass @ f(lam), rel=0.01)


def test_null_mass_counts_rows_of_dead_inputs():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x = torch.randn(64, 12, dtype=torch.float64)
    x[:, :5] = 0.0  # weights reading these inputs have zero Hessian rows
    y = torch.randint(0, 3, (64,))
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    params = prunable_parameters(model)
    H = dense_hessian(model, LOSS, data, params)[0].numpy()
    res = hessian_rows_null_mass(hessian_operator(model, LOSS, data))
    w = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    idx = quantile_indices(w, np.arange(1, 100) / 100)
    np.testing.assert_array_equal(res.indices, idx)
    np.testing.assert_allclose(res.row_l1_norms, np.abs(H[idx]).sum(axis=1), atol=1e-12)
    expected = np.mean(np.abs(H[idx]).sum(axis=1) < 1e-7)
    assert 0.1 < expected < 0.6
    assert res.p0 == pytest.approx(expected)


def test_quantile_indices_definition():
    w = np.array([0.5, -0.1, 0.3, 0.0, -0.9, 0.2, 0.7, 0.05, -0.4, 0.6])
    order = np.argsort(np.abs(w), kind="stable")
    assert quantile_indices(w, [0.0, 0.25, 0.5, 0.99]).tolist() == [order[0], order[2], order[5], order[9]]


def test_loss_epsilon_is_std_of_batch_losses(case):
    model = case["model"]
    model.eval()
    with torch.no_grad():
        losses = np.array([LOSS(model(x), t).item() for x, t in case["data"]])
    model.train()
    assert loss_epsilon(model, LOSS, case["data"]) == pytest.approx(losses.std(), rel=1e-12)
    assert loss_epsilon(model, LOSS, case["data"], ddof=1) == pytest.approx(losses.std(ddof=1), rel=1e-12)
    assert model.training


def test_cache_budget_falls_back_to_double_backprop(tanh_case):
    op = HessianOperator(tanh_case["model"], LOSS, tanh_case["data"], cache_max_bytes=1)
    assert not op.cached
    auto = HessianOperator(tanh_case["model"], LOSS, tanh_case["data"])
    assert auto.cached and auto.cache_bytes > 0
    v = torch.randn(op.dim, dtype=torch.float64)
    assert (op @ v - tanh_case["H"] @ v).abs().max().item() < 1e-10


def test_float32_model_gets_float64_lanczos(tanh_case):
    model = _tanh()
    model.load_state_dict({k: v.float() for k, v in tanh_case["model"].state_dict().items()})
    data = [(x.float(), t) for x, t in tanh_case["data"]]
    op = HessianOperator(model, LOSS, data)
    v = torch.randn(op.dim, dtype=torch.float64)
    ref = tanh_case["H"] @ v
    assert (op @ v).dtype == torch.float64
    assert (op @ v - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_spectrum_round_trip_density_and_truncation(tanh_case):
    est = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=40, num_probes=2, seed=5)
    again = SpectrumEstimate.from_dict(est.to_dict())
    np.testing.assert_array_equal(again.nodes, est.nodes)
    np.testing.assert_array_equal(again.weights, est.weights)
    grid = np.linspace(-1, 1, 2001)
    dens = est.density(grid, 0.01)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    short = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=15, num_probes=2, seed=5)
    trunc = est.truncated(15)
    np.testing.assert_allclose(trunc.nodes, short.nodes, atol=1e-10)
    np.testing.assert_allclose(trunc.weights, short.weights, atol=1e-10)


def test_same_seed_same_spectrum_different_seed_differs(tanh_case):
    a = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=20, seed=7)
    b = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=20, seed=7)
    c = slq(hessian_operator(tanh_case["model"], LOSS, tanh_case["data"]), num_steps=20, seed=8)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    assert not np.allclose(a.weights, c.weights)


def test_nan_loss_is_a_clear_error(tanh_case):
    model = _tanh().double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(PruneLimitError, match="training loss on batch 0 is not finite"):
        HessianOperator(model, LOSS, tanh_case["data"])
    with pytest.raises(PruneLimitError, match="not finite"):
        loss_epsilon(model, LOSS, tanh_case["data"])


def test_non_finite_hessian_product_is_a_clear_error():
    # |out|^1.5 has a finite value and gradient at 0 but an infinite second derivative.
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))]

    def loss_fn(out, target):
        return (out - target).abs().pow(1.5).mean()

    op = HessianOperator(model, loss_fn, data)
    with pytest.raises(PruneLimitError, match="Hessian-vector product is not finite"):
        op @ torch.ones(op.dim, dtype=torch.float64)


def test_bad_data_and_loss_are_clear_errors(tanh_case):
    model = tanh_case["model"]
    with pytest.raises(PruneLimitError, match="empty"):
        HessianOperator(model, LOSS, [])
    with pytest.raises(PruneLimitError, match="reduction"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), tanh_case["data"])
    x = torch.cat([x for x, _ in tanh_case["data"]])
    y = torch.cat([t for _, t in tanh_case["data"]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.raises(PruneLimitError, match="shuffle=False"):
        HessianOperator(model, LOSS, loader)
    op = HessianOperator(model, LOSS, iter(tanh_case["data"]))  # one-shot iterator is listed once
    v = torch.randn(op.dim, dtype=torch.float64)
    assert (op @ v - tanh_case["H"] @ v).abs().max().item() < 1e-10
    assert (op @ v - tanh_case["H"] @ v).abs().max().item() < 1e-10  # second pass sees the same data
    with pytest.raises(PruneLimitError, match="shape"):
        op @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(PruneLimitError, match="no Linear or Conv"):
        HessianOperator(nn.Sequential(nn.ReLU()), LOSS, tanh_case["data"])


def test_estimators_take_an_operator_and_say_how_to_build_one(tanh_case):
    calls = [(slq, ()), (hutchinson_trace, (3,)), (hessian_rows, ([0],)), (hessian_rows_null_mass, ())]
    for estimator, args in calls:
        with pytest.raises(PruneLimitError, match=r"takes a HessianOperator.*hessian_operator\(model, loss_fn, batches\)"):
            estimator(tanh_case["model"], *args)
