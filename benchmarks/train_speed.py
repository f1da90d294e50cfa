"""Training-step cost of every registered model, and ``mmil train --workers 1`` against ``--workers 2`` (issue 12).

Part 1, per model and bag size N (C = 64 features up to N = 800, C = 1024 at N = 10,000, default
model options, one torch thread unless ``--threads``): the time of one training step (train-mode
forward, cross-entropy via ``model.loss``, backward, the trainer's AdamW step: fused kernel) and of one inference
forward (eval mode, no autograd), the minimum over ``--repeats`` interleaved runs, and their ratio.
The FLOP-bound column: the step's floating-point operations as :class:`torch.utils.flop_counter.FlopCounterMode`
counts them (matmuls, convolutions, and attention on CUDA: torch 2.13's counter gives the CPU
flash-attention kernel 0; forward and backward; element-wise work and the optimizer are not counted) divided by the step time and by the machine's measured peak, the rate of one
2048 x 2048 fp32 matmul in the same process and thread count: the share of the peak the step reaches.
``--sizes 8 800 10000 50000`` adds the issue's largest bag (minutes per model on a CPU).
TransMIL is also timed through the implementation before issue 12 (the references copied in
``tests/test_transmil_speed_equivalence.py``: the pseudo-inverse as 24 products under autograd, PPEG
as three convolutions), same weights, same process: the speed-up is printed.

Part 2: ``--precision auto`` against fp32: one inference forward of ABMIL and TransMIL at N = 10,000
under each (auto picks fp32 on a CPU without AMX/AVX512-BF16, so the two should match there).

Part 3: :func:`mmil.crossval.cross_validate` (what ``mmil train`` runs) on synthetic bags with 4 folds,
after an untimed warm-up run: ``workers=1`` with ``--workers-threads`` threads, ``workers=1`` with one
thread, then ``workers=2`` (the threads split), wall time of each and whether ``metrics.json`` is
equal apart from the training times.

Ratios are measured in one process, so they hold on a busy machine; absolute times do not. The
machine's load average is printed with the results.

Usage::

    python benchmarks/train_speed.py                        # everything (several minutes on 2 cores)
    python benchmarks/train_speed.py --parts steps --models transmil,abmil --sizes 800
    python benchmarks/train_speed.py --parts workers --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from mmil.models import create_model, list_models  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _bag(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, c, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def step_fn(model, x: torch.Tensor):
    """One training step of ``model`` on bag ``x`` (as :mod:`mmil.train` takes it, fp32)."""
    from mmil.models import model_inputs
    from mmil.train import adamw

    opt = adamw([p for p in model.parameters() if p.requires_grad], 1e-4, 1e-4)
    kw = model_inputs(model, seed=0)
    y = torch.tensor([1], device=x.device)

    def step() -> None:
        model.train()
        loss = model.loss(model(x, None, **kw), y, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_fn(model, x: torch.Tensor):
    from mmil.models import model_inputs

    kw = model_inputs(model, seed=0)

    def fwd() -> None:
        model.eval()
        with torch.no_grad():
            model(x, None, **kw)

    return fwd


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fns: dict, repeats: int) -> dict:
    """Minimum seconds of each function over ``repeats`` interleaved rounds (after one warm-up call each)."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync()
            t0 = time.perf_counter()
            f()
            _sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def step_flops(step) -> int:
    """Floating-point operations of one call of ``step`` (matmul-like ops, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_flops(repeats: int, size: int = 2048) -> float:
    """FLOP/s of one ``size`` x ``size`` fp32 matmul on DEVICE (2 size^3 operations), the fastest of ``repeats`` runs."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(DEVICE) for _ in range(2))
    return 2 * size**3 / timed({"mm": lambda: a @ b}, max(3, repeats))["mm"]


def transmil_as_before(model):
    """``model`` with the pre-issue-12 pseudo-inverse and PPEG (same weights)."""
    from test_transmil_speed_equivalence import _as_before

    return _as_before(model)


def part_steps(models: list[str], sizes: list[int], repeats: int) -> None:
    peak = peak_flops(repeats)
    print(f"\n## Training step vs inference forward (1 bag, fp32, {torch.get_num_threads()} thread(s); load {load()}; "
          f"peak {peak / 1e9:.1f} GFLOP/s by a 2048^2 matmul)")
    print(f"{'model':<14} {'N':>6} {'C':>5} {'step ms':>9} {'fwd ms':>9} {'step/fwd':>8} {'GFLOP/step':>10} {'% of peak':>9}")
    for n in sizes:
        c = 64 if n <= 800 else 1024
        x = _bag(n, c)
        for name in models:
            torch.manual_seed(0)
            model = create_model(name, in_dim=c, n_classes=2).to(DEVICE)
            fns = {"step": step_fn(model, x), "fwd": forward_fn(model, x)}
            if name == "transmil":
                torch.manual_seed(0)
                old = transmil_as_before(create_model(name, in_dim=c, n_classes=2).to(DEVICE))
                fns.update(old_step=step_fn(old, x), old_fwd=forward_fn(old, x))
            t = timed(fns, repeats if n < 10_000 else max(1, repeats // 2))
            flops = step_flops(fns["step"])
            print(f"{name:<14} {n:>6} {c:>5} {t['step'] * 1e3:>9.1f} {t['fwd'] * 1e3:>9.1f} {t['step'] / t['fwd']:>8.2f} "
                  f"{flops / 1e9:>10.3f} {100 * flops / t['step'] / peak:>8.1f}%", flush=True)
            if "old_step" in t:
                print(f"{'  (before)':<14} {n:>6} {c:>5} {t['old_step'] * 1e3:>9.1f} {t['old_fwd'] * 1e3:>9.1f} {t['old_step'] / t['old_fwd']:>8.2f}"
                      f"   step speed-up {t['old_step'] / t['step']:.2f}x, forward {t['old_fwd'] / t['fwd']:.2f}x", flush=True)


def part_precision(repeats: int) -> None:
    from mmil.evaluate import autocast
    from mmil.precision import resolve_precision

    cpu = DEVICE
    print(f"\n## --precision auto (-> {resolve_precision('auto', cpu)} on {cpu}) vs fp32, inference forward, N=10,000, C=1024 (load {load()})")
    x = _bag(10_000, 1024)
    for name in ("abmil", "transmil"):
        torch.manual_seed(0)
        model = create_model(name, in_dim=1024, n_classes=2).to(DEVICE).eval()
        fns = {}
        for prec in ("fp32", "auto"):
            def f(prec=prec):
                with torch.no_grad(), autocast(cpu, prec):
                    model(x)
            fns[prec] = f
        t = timed(fns, repeats)
        print(f"{name:<10} fp32 {t['fp32'] * 1e3:8.1f} ms   auto {t['auto'] * 1e3:8.1f} ms   auto/fp32 {t['auto'] / t['fp32']:.2f}")


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m.pop("train_seconds")
    for f in m["folds"]:
        f.pop("train_seconds")
    return m


def part_workers(model: str, epochs: int, threads: int) -> None:
    from mmil.config import TrainConfig
    from mmil.crossval import cross_validate
    from mmil.data import BagDataset
    from mmil.data.synth import synthetic_bags

    ds = BagDataset.from_bags(synthetic_bags(40, seed=0, in_dim=64, min_instances=200, max_instances=1500))
    cfg = TrainConfig(epochs=epochs, min_epochs=epochs, progress=False)
    print(f"\n## cross_validate ({model}, 40 bags of 200-1,500 x 64, 4 folds, {epochs} epochs; load {load()})")
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up, untimed: the first run in a process pays torch's and matplotlib's lazy imports
        cross_validate(ds.subset(list(range(12))), model, {}, TrainConfig(epochs=1, progress=False), Path(tmp) / "warm", folds=2, repeats=1)
        for label, workers, n_threads in (("workers 1", 1, threads), ("workers 1, 1 thread", 1, 1), ("workers 2", 2, threads)):
            torch.set_num_threads(n_threads)
            t0 = time.perf_counter()
            cross_validate(ds, model, {}, TrainConfig(**{**cfg.to_dict(), "workers": workers}), Path(tmp) / label, folds=4, repeats=1)
            walls[label] = time.perf_counter() - t0
            print(f"{label:<20} ({n_threads} thread(s) in the parent): {walls[label]:7.1f} s wall (load {load()})", flush=True)
        same = [_metrics(Path(tmp) / label) == _metrics(Path(tmp) / "workers 2") for label in ("workers 1", "workers 1, 1 thread")]
    print(f"speed-up of workers 2 over workers 1 ({threads} threads): {walls['workers 1'] / walls['workers 2']:.2f}x, "
          f"over workers 1 (1 thread): {walls['workers 1, 1 thread'] / walls['workers 2']:.2f}x; "
          f"metrics.json equal to workers 2 (bar train_seconds): {same[0]} ({threads} threads), {same[1]} (1 thread)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="steps,precision,workers", help="comma-separated: steps, precision, workers")
    p.add_argument("--models", default="all", help="comma-separated registry names for the steps (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 800, 10_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the step timings; the workers part uses --workers-threads")
    p.add_argument("--workers-model", default="abmil")
    p.add_argument("--workers-threads", type=int, default=2, help="threads of the workers=1 run (split between 2 workers)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cpu", help="device of the steps and precision parts (cpu, cuda, cuda:N)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    models = list_models() if args.models == "all" else args.models.split(",")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, load {load()}")
    if "steps" in parts:
        part_steps(models, args.sizes, args.repeats)
    if "precision" in parts:
        part_precision(args.repeats)
    if "workers" in parts:
        part_workers(args.workers_model, args.epochs, args.workers_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
