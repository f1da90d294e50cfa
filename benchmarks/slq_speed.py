"""SLQ speed and accuracy benchmark for prunelimit (run: python benchmarks/slq_speed.py).

Part 1, speed (same process, ratios not seconds): an MLP 64-320-240-10 (99,680 prunable weights)
over the 1,797 standardised `digits` samples. The unit is one full-data gradient pass (forward +
backward over all batches). Printed per Lanczos step (HVP + full reorthogonalization):
  - prunelimit: HessianOperator (cached first-order graph) + lanczos();
  - reference: a plain double-backprop Lanczos in the style of PyHessian, written here (per step:
    forward, gradient with create_graph, backward of g.v for every batch; vectors as lists of
    per-parameter tensors; reorthogonalization by a Python loop over the stored vectors).
  Also the cost of one HVP alone for each exact method (cached graph, double backprop,
  torch.func forward-over-reverse).

Part 2, accuracy: an MLP 64-32-10 (2,368 weights, float64) trained without and with l1, with its exact Hessian
(torch.autograd.functional.hessian): Wasserstein-1 distance of the SLQ measure to the exact
eigenvalues (relative to the spectral range) and the error of the predicted threshold p* for
(m, probes) in {(50,1), (50,8), (100,4), (300,4)} (and a few more), over several probe seeds, plus
the adaptive rule (geometry.ThresholdConvergence: double m until p* moves < 0.005); with --conv
also for a small conv net on digits images.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import scipy.stats
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, jvp

from prunelimit.epsilon import loss_epsilon
from prunelimit.estimators import rademacher, slq
from prunelimit.geometry import ThresholdConvergence
from prunelimit.hessian import HessianOperator, hessian_operator
from prunelimit.lanczos import lanczos
from prunelimit.params import prunable_parameters
from prunelimit.prediction import predict_threshold

LOSS = nn.CrossEntropyLoss()


def digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return torch.tensor(x, dtype=dtype), torch.tensor(y)


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- references
def gradient_pass(model, params, data, total):
    """One full-data gradient: forward + backward over every batch (the time unit)."""
    acc = [torch.zeros_like(p) for p in params]
    for x, t in data:
        g = torch.autograd.grad(LOSS(model(x), t) * (len(t) / total), params)
        for a, b in zip(acc, g):
            a.add_(b)
    return acc


def pyhessian_style_lanczos(model, params, data, total, num_steps, seed, callback=None):
    """Plain double-backprop Lanczos with full reorthogonalization, PyHessian-like (our own code)."""
    gen = torch.Generator().manual_seed(seed)
    v = [rademacher(p.numel(), gen, p.dtype).view_as(p) for p in params]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    basis, alphas, betas = [], [], []
    w_prev, beta = None, 0.0
    for step in range(num_steps):
        basis.append(v)
        hv = [torch.zeros_like(p) for p in params]
        for x, t in data:  # HVP by double backprop, batch by batch
            loss = LOSS(model(x), t) * (len(t) / total)
            g = torch.autograd.grad(loss, params, create_graph=True)
            gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
            for a, b in zip(hv, torch.autograd.grad(gv, params)):
                a.add_(b)
        alpha = float(sum((a * b).sum() for a, b in zip(hv, v)))
        alphas.append(alpha)
        w = [h - alpha * x for h, x in zip(hv, v)]
        if w_prev is not None:
            w = [a - beta * b for a, b in zip(w, w_prev)]
        for q in basis:  # one modified Gram-Schmidt pass over the stored vectors
            c = float(sum((a * b).sum() for a, b in zip(w, q)))
            w = [a - c * b for a, b in zip(w, q)]
        beta = math.sqrt(sum(float((a * a).sum()) for a in w))
        if callback is not None:
            callback()
        if step < num_steps - 1:
            betas.append(beta)
            w_prev, v = v, [a / beta for a in w]
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.linalg.eigh(t)  # torch.eig is gone in PyTorch 2; PyHessian's density() no longer runs


def func_hvp(model, params, data, total, v):
    """Forward-over-reverse HVP with torch.func (jvp of grad), batch by batch."""
    names = {id(p): n for n, p in model.named_parameters()}
    names = [names[id(p)] for p in params]
    base = {n: p.detach() for n, p in model.named_parameters()}
    out = [torch.zeros_like(p) for p in params]
    for x, t in data:
        def f(*ps, x=x, t=t):
            state = dict(base)
            state.update(zip(names, ps))
            return LOSS(functional_call(model, state, (x,)), t) * (len(t) / total)

        _, h = jvp(grad(f, argnums=tuple(range(len(names)))), tuple(base[n] for n in names), tuple(v))
        for a, b in zip(out, h):
            a.add_(b)
    return out


CLOCK = time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


class Interleaved:
    """Times each Lanczos step and, right after it, one full-data gradient pass, so both see the
    same machine load; the step time excludes the gradient pass."""

    def __init__(self, grad_fn):
        self.grad_fn, self.steps, self.grads = grad_fn, [], []
        self.mark = CLOCK()

    def __call__(self, *_) -> bool:
        self.steps.append(CLOCK() - self.mark)
        self.grads.append(timed(self.grad_fn))
        self.mark = CLOCK()
        return False

    def ratio(self) -> float:
        return float(np.median(np.array(self.steps) / np.array(self.grads)))


# ----------------------------------------------------------------------------- part 1
def speed(batch_size: int, num_steps: int, rounds: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = digits(torch.float32)
    data = batches(x, y, batch_size)
    model = nn.Sequential(nn.Linear(64, 320), nn.ReLU(), nn.Linear(320, 240), nn.ReLU(), nn.Linear(240, 10)).eval()
    params = prunable_parameters(model)
    dim = sum(p.numel() for p in params)
    total = len(x)
    print(f"\n== speed: MLP 64-320-240-10, D={dim:,} prunable weights, N={total}, batch {batch_size}, "
          f"{len(data)} batches, {num_steps} Lanczos steps, {torch.get_num_threads()} threads, "
          f"clock {CLOCK.__name__}")

    def grad_fn():
        return gradient_pass(model, params, data, total)

    for _ in range(3):
        grad_fn()  # warm-up
    ours, ref, build = [], [], []
    hvp = {"cached graph": [], "double backprop": [], "torch.func fwd-over-rev": []}
    for r in range(rounds):
        g = statistics.median(timed(grad_fn) for _ in range(3))
        t0 = CLOCK()
        op = HessianOperator(model, LOSS, data, cache_graph=True)
        build.append((CLOCK() - t0) / g)
        v0 = rademacher(dim, torch.Generator().manual_seed(r)) / math.sqrt(dim)
        clock = Interleaved(grad_fn)
        lanczos(op.matvec, dim, num_steps, v0, callback=clock)
        ours.append(clock.ratio())
        clock = Interleaved(grad_fn)
        pyhessian_style_lanczos(model, params, data, total, num_steps, r, callback=clock)
        ref.append(clock.ratio())
        vec = torch.randn(dim)
        chunks = list(op._split(vec))
        plain = HessianOperator(model, LOSS, data, cache_graph=False)
        for name, fn in (("cached graph", lambda: op @ vec), ("double backprop", lambda: plain @ vec),
                         ("torch.func fwd-over-rev", lambda: func_hvp(model, params, data, total, chunks))):
            hvp[name].append(statistics.median(timed(fn) / timed(grad_fn) for _ in range(5)))
        del op, plain

    o, f, b = statistics.median(ours), statistics.median(ref), statistics.median(build)
    print(f"prunelimit Lanczos step (cached-graph HVP + reorth.): {o:5.2f}x a gradient pass  "
          f"(rounds {[round(v, 2) for v in ours]}; + one-off graph build {b:4.2f}x -> "
          f"{o + b / num_steps:5.2f}x amortised over {num_steps} steps)   target <= 2.5x")
    print(f"PyHessian-style Lanczos step (reference)           : {f:5.2f}x  (rounds {[round(v, 2) for v in ref]})")
    print(f"speed-up over the reference                        : {f / o:5.2f}x")
    for name, ts in hvp.items():
        print(f"  one HVP alone, {name:24s}: {statistics.median(ts):5.2f}x")


# ----------------------------------------------------------------------------- part 2
def l1_train(model, x, y, lam, steps=300, lr=1e-2):
    """Full-batch Adam on task loss + lam * ||w||_1 (prunable weights), as a quick LOMP-style model."""
    opt = torch.optim.Adam(model.parameters(), lr)
    params = prunable_parameters(model)
    for _ in range(steps):
        opt.zero_grad()
        (LOSS(model(x), y) + lam * sum(p.abs().sum() for p in params)).backward()
        opt.step()
    return model.eval()


def exact_hessian(model, data, total):
    params = prunable_parameters(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names, shapes = [name_of[id(p)] for p in params], [p.shape for p in params]
    state = {n: p.detach() for n, p in model.named_parameters()}

    def mean_loss(flat):
        values, off = dict(state), 0
        for n, s in zip(names, shapes):
            values[n] = flat[off : off + s.numel()].view(s)
            off += s.numel()
        return sum(LOSS(functional_call(model, values, (xb,)), tb) * len(tb) for xb, tb in data) / total

    w = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(mean_loss, w), w.numpy()


def accuracy_case(title, model, x, y, seeds):
    data = batches(x, y, 128)
    t0 = time.perf_counter()
    H, w = exact_hessian(model, data, len(x))
    eig = torch.linalg.eigvalsh(H).numpy()
    t_dense = time.perf_counter() - t0
    eps = loss_epsilon(model, LOSS, data)
    exact = predict_threshold(w, eps, eig)
    spread = eig.max() - eig.min()
    print(f"\n== accuracy: {title}, D={len(w):,}, N={len(x)}, exact Hessian in {t_dense:.1f} s")
    print(f"eps = {eps:.4g} (std of batch-128 losses); eigenvalues in [{eig.min():.3g}, {eig.max():.3g}], "
          f"{np.mean(np.abs(eig) < 1e-6 * eig.max()):.1%} with |lambda| < 1e-6 max; "
          f"{np.mean(np.abs(w) < 1e-3):.1%} of |w| < 1e-3")
    print(f"exact p* = {exact.predicted_ratio:.4f} (kept {exact.kept_fraction:.4f}); "
          f"eps/2 -> {exact.sensitivity['eps*0.5']:.4f}, 2eps -> {exact.sensitivity['eps*2']:.4f}")
    op = hessian_operator(model, LOSS, data)
    longest = min(300, len(w))
    runs = [slq(op, num_steps=longest, num_probes=8, seed=s) for s in range(seeds)]
    print(f"{'m':>5} {'probes':>6} {'HVPs':>6} {'W1/range mean':>14} {'max':>8} {'p* err mean':>12} {'max':>8}"
          f"   (signed p* err per seed)")
    for m, probes in [(50, 1), (50, 8), (100, 4), (200, 4), (300, 4), (300, 8)]:
        m = min(m, longest)
        w1s, errs = [], []
        for run in runs:
            sub = run.truncated(m)
            nodes, weights = sub.nodes[:probes], sub.weights[:probes]
            w1s.append(scipy.stats.wasserstein_distance(eig, nodes.ravel(), v_weights=weights.ravel()) / spread)
            errs.append(predict_threshold(w, eps, (nodes, weights)).predicted_ratio - exact.predicted_ratio)
        print(f"{m:5d} {probes:6d} {m * probes:6d} {np.mean(w1s):14.5f} {np.max(w1s):8.5f} "
              f"{np.mean(np.abs(errs)):12.4f} {np.max(np.abs(errs)):8.4f}   {np.round(errs, 4).tolist()}")
    steps_used, errs = [], []
    for s in range(seeds):
        rule = ThresholdConvergence(w, eps, tol=0.005, min_steps=50, growth=2.0)
        est = slq(op, num_steps=400, num_probes=4, seed=s, stop_when=rule)
        steps_used.append(max(est.steps))
        errs.append(predict_threshold(w, eps, est).predicted_ratio - exact.predicted_ratio)
    print(f"adaptive m (ThresholdConvergence: 50, 100, 200, 400 until p* moves < 0.005; 4 probes): "
          f"steps {steps_used}, signed p* err {np.round(errs, 4).tolist()}")


def accuracy(seeds: int, conv: bool) -> None:
    x, y = digits(torch.float64)
    for lam in (0.0, 1e-3):  # without l1 (many small but non-zero curvatures) and with l1 (LOMP regime)
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
        accuracy_case(f"MLP 64-32-10 on digits, l1 lambda {lam:g}", l1_train(mlp, x, y, lam), x, y, seeds)
    if conv:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AvgPool2d(2),
                            nn.Flatten(), nn.Linear(72, 10)).double()
        xi, yi = x[:512].view(-1, 1, 8, 8), y[:512]
        accuracy_case("conv net 1-4-8 on 512 digits images, l1 lambda 1e-3", l1_train(net, xi, yi, 1e-3), xi, yi,
                      seeds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps timed per run (speed part)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1797],
                        help="batch sizes for the speed part (1797 = one full batch)")
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds for the accuracy part")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--conv", action="store_true", help="also run the accuracy part on a small conv net")
    parser.add_argument("--skip-speed", action="store_true", help="only run the accuracy part")
    parser.add_argument("--skip-accuracy", action="store_true", help="only run the speed part")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time  # CPU time of this process: robust to other load on a shared machine
    if not args.skip_speed:
        for bs in args.batch_sizes:
            speed(bs, args.steps, args.rounds)
    if not args.skip_accuracy:
        accuracy(args.seeds, args.conv)


if __name__ == "__main__":
    main()
