"""What a model costs at inference: time per bag and peak memory, for ``mmil bench``.

Peak memory is the largest amount of tensor memory allocated *during* one
``no_grad`` forward pass, above what was allocated before it (weights and the
input bag are not counted). On CUDA it is ``torch.cuda.max_memory_allocated``
after a reset; on the CPU every allocation and free made by PyTorch's CPU
allocator during the pass is recorded by ``torch.profiler`` (``profile_memory``)
and the peak of the running sum is taken (:func:`peak_of_running_sum`). Memory
allocated outside PyTorch's allocator (e.g. by a BLAS library's own workspace)
is not seen on the CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .models import create_model, model_inputs
from .rng import private_rng


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def peak_of_running_sum(events: Iterable[tuple[int, int]]) -> int:
    """Peak memory from allocation events ``(time, nbytes)`` (frees have ``nbytes < 0``).

    ``peak = max(0, max_t sum_{s <= t} nbytes_s)`` with the events ordered by time:
    memory held before the first event counts as 0.
    """
    running, peak = 0, 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence the C++ profiler's start/stop lines on file descriptor 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_memory_bytes(fn: Callable[[], Any]) -> float:
    """Peak CPU tensor memory allocated while ``fn()`` runs (see the module docstring);
    NaN when this torch version does not expose the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    cpu = torch.autograd.DeviceType.CPU
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # the profiler's raw event list moved (another torch version): report unknown
        return float("nan")
    events = [(e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and e.device_type() == cpu]
    return peak_of_running_sum(events)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak tensor memory allocated by ``fn()`` above the memory held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return cpu_peak_memory_bytes(fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` in milliseconds (device synchronised)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _forward_fn(model: nn.Module, x: torch.Tensor, coords: torch.Tensor, groups: torch.Tensor, seed: int, precision: str) -> Callable[[], Any]:
    from .evaluate import autocast

    def run():
        with torch.no_grad(), autocast(x.device, precision):
            return model(x, None, **model_inputs(model, coords=coords, groups=groups, seed=seed))

    return run


def synthetic_cost_bag(n: int, in_dim: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features ``(1, n, in_dim)``, square-grid patch coordinates ``(1, n, 2)``
    and 10 interleaved precomputed groups ``(1, n)`` (for models that use them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, in_dim, generator=g)
    side = math.isqrt(n - 1) + 1
    idx = torch.arange(n)
    coords = torch.stack([idx % side, idx // side], dim=1).float() * 256
    return x.to(device), coords.unsqueeze(0).to(device), (idx % 10).unsqueeze(0).to(device)


def measure_cost(
    model_name: str,
    model_kwargs: dict[str, Any],
    in_dim: int,
    n_classes: int,
    sizes: Sequence[int],
    *,
    device: torch.device,
    seed: int = 0,
    repeats: int = 3,
    budget_s: float = 60.0,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Inference time (median of ``repeats`` passes, after one warm-up) and peak
    memory of ``model_name`` on random bags of each size in ``sizes`` (ascending).

    A size whose warm-up pass exceeds ``budget_s`` is still reported; larger sizes
    are skipped with status ``"over budget"`` (and NaN values).
    """
    with private_rng(seed):
        model = create_model(model_name, in_dim=in_dim, n_classes=n_classes, **model_kwargs).to(device).eval()
    rows, over = [], False
    for n in sorted(int(s) for s in sizes):
        row = {"model": model_name, "n_instances": n, "device": str(device)}
        if over:
            rows.append({**row, "inference_ms": float("nan"), "peak_memory_mb": float("nan"), "status": "over budget"})
            continue
        x, coords, groups = synthetic_cost_bag(n, in_dim, seed, device)
        fn = _forward_fn(model, x, coords, groups, seed, precision)
        try:
            warm = timed_ms(fn, device)
            times = [warm] if warm > budget_s * 1e3 else [timed_ms(fn, device) for _ in range(repeats)]
            peak = peak_memory_bytes(fn, device) / 2**20
            status = "ok"
        except (RuntimeError, MemoryError) as err:  # out of memory: record it, keep the other models going
            if device.type == "cuda":
                torch.cuda.empty_cache()
            times, peak, status = [float("nan")], float("nan"), f"failed: {str(err).splitlines()[0][:80]}"
            over = True
        rows.append({**row, "inference_ms": float(statistics.median(times)), "peak_memory_mb": float(peak), "status": status})
        if times[0] > budget_s * 1e3:
            over = True
        del x, coords, groups, fn
    return rows


def fold_inference_cost(checkpoint_dir: Path, test_dataset, *, device: torch.device, seed: int, precision: str) -> tuple[float, float]:
    """``(mean forward ms per test bag, peak MB of a forward over the largest test bag)``
    for the checkpoint of one fold (bags are read before the clock starts)."""
    from .evaluate import forward_bag, load_for_inference

    model, ds, _ = load_for_inference(checkpoint_dir, test_dataset, device=device)
    model.eval()
    with torch.no_grad():  # warm-up: one-off allocations and kernel selection stay out of the timing
        forward_bag(model, ds[0], device=device, seed=seed, precision=precision)
    total_ms, largest, largest_n = 0.0, 0, -1
    for i in range(len(ds)):
        bag = ds[i]
        if bag.num_instances > largest_n:
            largest, largest_n = i, bag.num_instances
        with torch.no_grad():
            total_ms += timed_ms(lambda: forward_bag(model, bag, device=device, seed=seed, precision=precision), device)
    bag = ds[largest]

    def run():
        with torch.no_grad():
            forward_bag(model, bag, device=device, seed=seed, precision=precision)

    peak = peak_memory_bytes(run, device) / 2**20
    return total_ms / max(len(ds), 1), peak
