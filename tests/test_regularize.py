"""l1-regularized training: the update's math, its effect on sparsity, determinism, schedules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunelimit import train_l1
from prunelimit.errors import PruneLimitError
from prunelimit.regularize import evaluate, lr_factor




def _tiny_problem(n=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    return model, TensorDataset(x, y)


def test_one_step_equals_manual_update_with_l1_subgradient():
    model, data = _tiny_problem()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[0].weight[0, 0] = 0.0  # sign(0) = 0: the l1 term must not move an exact zero
        model[0].weight[0, 0] = 0.0
    lam, lr, wd = 0.03, 0.1, 0.01
    loss_fn = nn.CrossEntropyLoss()
    # one epoch with the whole set as one batch = exactly one SGD step (lr factor 1 in epoch 0)
    train_l1(model, loss_fn, data, lam, epochs=1, lr=lr, weight_decay=wd, batch_size=len(data), progress=False)

    x, y = data.tensors
    task = loss_fn(reference(x), y)
    grads = torch.autograd.grad(task, list(reference.parameters()))
    prunable = {id(reference[0].weight), id(reference[2].weight)}
    for (name, p_new), p_old, g in zip(model.named_parameters(), reference.parameters(), grads):
        expected = p_old - lr * (g + wd * p_old + (lam * torch.sign(p_old) if id(p_old) in prunable else 0))
        torch.testing.assert_close(p_new, expected, rtol=0, atol=1e-12, msg=name)
    # sanity: the l1 term really contributed (a run without it lands elsewhere)
    no_l1, _ = _tiny_problem()
    with torch.no_grad():
        no_l1[0].weight[0, 0] = 0.0
    train_l1(no_l1, loss_fn, data, 0.0, epochs=1, lr=lr, weight_decay=wd, batch_size=len(data), progress=False)
    assert not torch.allclose(no_l1[0].weight, model[0].weight)


def test_custom_params_restrict_the_l1_term():
    model, data = _tiny_problem()
    reference = copy.deepcopy(model)
    lam, lr = 0.05, 0.1
    loss_fn = nn.CrossEntropyLoss()
    train_l1(model, loss_fn, data, lam, epochs=1, lr=lr, batch_size=len(data), params=[model[2].weight], progress=False)
    x, y = data.tensors
    grads = torch.autograd.grad(loss_fn(reference(x), y), [reference[0].weight, reference[2].weight])
    torch.testing.assert_close(model[0].weight, reference[0].weight - lr * grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model[2].weight, reference[2].weight - lr * (grads[1] + lam * reference[2].weight.sign()), rtol=0, atol=1e-12)


def _near_zero_fraction(model, tol=1e-3):
    w = torch.cat([m.weight.detach().reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)])
    return (w.abs() < tol).double().mean().item()


def test_stronger_l1_gives_more_near_zero_weights():
    from prunelimit import load_dataset

    bundle = load_dataset("digits")
    fractions = []
    for lam in (0.0, 2e-3, 1e-2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        train_l1(model, nn.CrossEntropyLoss(), bundle.train, lam, epochs=4, lr=0.05, progress=False)
        fractions.append(_near_zero_fraction(model))
    assert fractions[0] < 0.02
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[2] > 0.2


def test_seeded_runs_are_identical_and_seeds_differ():
    def run(seed):
        model, data = _tiny_problem(n=40, dtype=torch.float32)
        model.insert(2, nn.Dropout(0.3))  # dropout randomness must be seeded as well
        history = train_l1(model, nn.CrossEntropyLoss(), data, 1e-3, epochs=3, batch_size=8, seed=seed, progress=False)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), history

    a, ha = run(0)
    b, hb = run(0)
    c, _ = run(1)
    assert torch.equal(a, b)
    assert ha.to_dict() == hb.to_dict()
    assert not torch.equal(a, c)
    state = torch.random.get_rng_state()
    run(0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_schedule_is_stepped_per_epoch():
    model, data = _tiny_problem(n=40)
    seen_lrs = []
    original_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen_lrs.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    torch.optim.SGD.step = spy
    try:
        history = train_l1(model, nn.CrossEntropyLoss(), data, 1e-3, epochs=4, lr=0.2, batch_size=10, progress=False)
    finally:
        torch.optim.SGD.step = original_step
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [r.lr for r in history.epochs] == pytest.approx(expected)
    assert seen_lrs == pytest.approx([lr for lr in expected for _ in range(4)])  # 4 batches per epoch, constant within
    assert lr_factor("step", 2, 4) == pytest.approx(0.1) and lr_factor("step", 3, 4) == pytest.approx(0.01)
    with pytest.raises(PruneLimitError, match="unknown schedule"):
        lr_factor("linear", 0, 3)


def test_history_records_objective_and_l1():
    model, data = _tiny_problem()
    history = train_l1(model, nn.CrossEntropyLoss(), data, 0.01, epochs=2, batch_size=len(data), progress=False)
    last = history.epochs[-1]
    l1 = sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, nn.Linear))
    assert last.l1_norm == pytest.approx(l1)
    assert last.objective == pytest.approx(last.task_loss + 0.01 * l1)


def test_nan_loss_and_bad_lam_are_one_line_errors():
    model, data = _tiny_problem()
    with pytest.raises(PruneLimitError, match="--lam"):
        train_l1(model, nn.CrossEntropyLoss(), data, -1.0, epochs=1, progress=False)
    data.tensors[0][0, 0] = float("nan")
    with pytest.raises(PruneLimitError, match="training loss became nan in epoch 1"):
        train_l1(model, nn.CrossEntropyLoss(), data, 0.0, epochs=1, batch_size=len(data), progress=False)


def test_evaluate_matches_direct_computation():
    model, data = _tiny_problem()
    x, y = data.tensors
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    acc, loss = evaluate(model, nn.CrossEntropyLoss(), batches)
    with torch.no_grad():
        out = model(x)
    assert acc == pytest.approx((out.argmax(1) == y).double().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(out, y).item())
