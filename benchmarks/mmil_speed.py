"""Speed and memory of the batched MMIL-Transformer against the naive per-sub-bag reference.

Same weights, same process, same sub-bags: the model's grouping is computed once
and handed to the reference (``tests/reference_mmil.py``: a Python loop over
sub-bags and message tokens with explicit softmax attention, the structure of the
released code). For each N the script times

* an inference forward pass (eval mode, no autograd), and
* a training step (forward + cross-entropy + backward) in the default training
  configuration (``attn_dropout=0``, ``proj_dropout=0.1``, no sub-bag masking),

interleaving the two implementations so that both see the same machine load,
and prints the median times, the speed-up, the peak memory and the achieved
matmul throughput (FLOPs the implementation executes / time) as a fraction of
what ``torch.mm`` reaches here.

Memory (CPU): the rise of the process's peak resident set size during the call
(``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs``
before each call), with glibc's mmap threshold pinned at 64 KiB so freed
buffers go back to the system instead of hiding in the heap. This is what the
operating system must provide, including allocator overhead. On CUDA:
``torch.cuda.max_memory_allocated``.

``--precision bf16`` runs OUR model under ``torch.autocast(bfloat16)``; the
reference always runs in float32 (the ratio is against the fp32 reference), and
the largest difference of the bf16 probabilities from our fp32 ones is printed.

Usage::

    python benchmarks/mmil_speed.py                       # fp32, N = 2000, 10000, 40000 + N = 100000 training
    python benchmarks/mmil_speed.py --precision bf16
    python benchmarks/mmil_speed.py --sizes 2000 --big-n 0 --repeats 1   # quick look
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from reference_mmil import reference_forward, subbags_from_ids  # noqa: E402

from mmil.models.mmil_transformer import MMILTransformer  # noqa: E402

# ------------------------------------------------------------------ memory

def _pin_malloc_thresholds() -> bool:
    """Make glibc return freed large buffers to the OS (so peak RSS tracks live memory)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    except OSError:
        return False


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class PeakMemory:
    """Peak extra memory (MiB) used inside the ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _status_kib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self.mib = (_status_kib("VmHWM") - self._base) / 1024


# ------------------------------------------------------------------- FLOPs

def forward_flops(N: int, sizes: list[int], *, C: int, D: int, inner: int, heads: int, layers: int, k: int, ours: bool) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass of one bag.

    ``sizes`` are the sub-bag lengths. The reference projects queries, keys and
    values of every token in every layer and attends over ``sum_s (k + n_s)^2``
    pairs per head. Ours does the same in all but the last layer, but over the
    padded layout (``S (k + max n_s)^2``); in the last layer it only queries the
    message tokens, in feature space (see ``SubbagAttention``).
    """
    S = len(sizes)
    T = N + S * k  # tokens in the sub-bag step
    M = 1 + S * k  # tokens in the message step
    proj = 2.0 * N * C * D

    def full_layer(pairs: float) -> float:
        sub = 2.0 * T * D * 3 * inner + 4.0 * inner * pairs + 2.0 * T * inner * D
        msg = 2.0 * M * D * 3 * inner + 4.0 * inner * M * M + 2.0 * M * inner * D
        return sub + msg

    exact_pairs = float(sum((k + n) ** 2 for n in sizes))
    if not ours:
        return proj + layers * full_layer(exact_pairs)
    padded_pairs = float(S * (k + max(sizes)) ** 2)
    Lmax = k + max(sizes)
    last_sub = S * k * (2.0 * D * inner * 3 + 4.0 * heads * Lmax * D + 2.0 * inner * D)  # q, fold, attention, v-unfold, out
    last_msg = 2.0 * D * inner * 3 + 4.0 * heads * M * D + 2.0 * inner * D
    return proj + (layers - 1) * full_layer(padded_pairs) + last_sub + last_msg


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of ``torch.mm`` on square ``n x n`` matrices."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(reps + 1):
        t = _timed(lambda: torch.mm(a, b), device)
        best = max(best, 2.0 * n**3 / t / 1e9)
    return best


# ------------------------------------------------------------------ timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    return _timed2(fn, device)[0]


def _timed2(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one call."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def model_to_released(model: MMILTransformer) -> dict[str, torch.Tensor]:
    """Our parameters under the released names (for the reference)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = {
        "fc2.weight": sd["head.weight"],
        "fc2.bias": sd["head.bias"],
        "absolute_pos_embed": sd["instance_bias"].view(1, 1, -1),
        "msg_tokens": sd["msg_token"].view(1, 1, 1, -1),
        "msgcls_token": sd["bag_token"].view(1, 1, 1, -1),
    }
    if "input_proj.weight" in sd:
        w["fc1.weight"], w["fc1.bias"] = sd["input_proj.weight"], sd["input_proj.bias"]
    for i in range(len(model.layers)):
        for released, ours in (("GroupsAttenLayer", "subbag_attn"), ("GroupsMSGAttenLayer", "msg_attn")):
            prefix = f"layers.{i}.{released}.AttenLayer.attn."
            w[prefix + "to_qkv.weight"] = sd[f"layers.{i}.{ours}.qkv.weight"]
            w[prefix + "to_out.0.weight"] = sd[f"layers.{i}.{ours}.out.weight"]
            w[prefix + "to_out.0.bias"] = sd[f"layers.{i}.{ours}.out.bias"]
    return w


@dataclass
class Row:
    n: int
    step: str  # "eval" or "train"
    ours_s: float
    ref_s: float | None
    ours_mib: float
    ref_mib: float | None
    ours_gflops: float
    ref_gflops: float | None
    note: str = ""
    ours_runs: list[float] = field(default_factory=list)
    ref_runs: list[float] = field(default_factory=list)
    ours_cpu_s: float | None = None
    ref_cpu_s: float | None = None

    @property
    def speedup(self) -> float | None:
        return None if self.ref_s is None else self.ref_s / self.ours_s

    @property
    def cpu_speedup(self) -> float | None:
        """Ratio of CPU seconds: less sensitive to other processes when running 1 thread."""
        return None if self.ref_cpu_s is None or not self.ours_cpu_s else self.ref_cpu_s / self.ours_cpu_s


def _estimate_reference_train_gib(sizes: list[int], heads: int, layers: int, k: int) -> float:
    """Softmax outputs the naive reference keeps for backward (float32), plus one
    transient score matrix of the largest sub-bag."""
    kept = layers * sum(heads * (k + n) ** 2 * 4 for n in sizes)
    return (kept + heads * (k + max(sizes)) ** 2 * 4) / 2**30


def bench_size(N: int, args, device: torch.device, precision: str) -> list[Row]:
    torch.manual_seed(0)
    C, G = args.in_dim, args.num_subbags
    model = MMILTransformer(C, 2, num_subbags=G, attn_dropout=0.0, proj_dropout=0.1).to(device)
    weights = model_to_released(model)
    x = torch.randn(N, C, device=device)
    y = torch.tensor([1], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.eval()
    with torch.no_grad():
        ids = model(x, seed=0).subbag_ids[0]
    subbags = subbags_from_ids(ids, torch.ones(G, dtype=torch.bool, device=device))
    sizes = [len(s) for s in subbags]
    cfg = dict(C=C, D=model.embed_dim, inner=8 * 64, heads=8, layers=2, k=1)
    f_ours, f_ref = forward_flops(N, sizes, ours=True, **cfg), forward_flops(N, sizes, ours=False, **cfg)
    rows: list[Row] = []

    # ---- inference
    def ours_eval():
        with torch.no_grad(), autocast:
            return model(x, seed=0).logits

    def ref_eval():
        with torch.no_grad():
            return reference_forward(weights, x, subbags, heads=8, head_dim=64)

    rows.append(_compare(N, "eval", ours_eval, ref_eval, args.repeats, device, f_ours, f_ref))
    with torch.no_grad():
        out32 = model(x, seed=0)
        p32, l32 = out32.probs, out32.logits[0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            p16 = model(x, seed=0).probs
        ref_logits = reference_forward(weights, x, subbags, heads=8, head_dim=64)
    rows[-1].note = f"max|logit ours - ref| = {float((l32 - ref_logits).abs().max()):.1e}"
    if precision == "bf16":
        rows[-1].note += f", |p_bf16 - p_fp32| = {float((p16 - p32).abs().max()):.1e}"

    # ---- training step
    model.train()
    ref_params = {k: v.clone().requires_grad_(True) for k, v in weights.items()}

    def ours_train():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x, seed=0)
        model.loss(out, y).backward()

    def ref_train():
        for p in ref_params.values():
            p.grad = None
        logits = reference_forward(ref_params, x, subbags, heads=8, head_dim=64, proj_dropout=0.1, training=True)
        F.cross_entropy(logits.unsqueeze(0), y).backward()

    est = _estimate_reference_train_gib(sizes, 8, 2, 1)
    run_ref = N <= args.reference_train_max
    row = _compare(N, "train", ours_train, ref_train if run_ref else None, args.repeats, device, 3 * f_ours, 3 * f_ref)
    if not run_ref:
        row.note = f"reference skipped (would keep ~{est:.1f} GiB of attention matrices; raise --reference-train-max)"
    rows.append(row)
    return rows


def _compare(N, step, ours_fn, ref_fn, repeats, device, flops_ours, flops_ref) -> Row:
    """Warm-up + memory run of each, then ``repeats`` interleaved timed runs; medians."""
    with PeakMemory(device) as m_ours:
        ours_fn()
    ref_mib = None
    if ref_fn is not None:
        with PeakMemory(device) as m_ref:
            ref_fn()
        ref_mib = m_ref.mib
    ours_runs, ref_runs, ours_cpu, ref_cpu = [], [], [], []
    for _ in range(repeats):
        wall, cpu = _timed2(ours_fn, device)
        ours_runs.append(wall)
        ours_cpu.append(cpu)
        if ref_fn is not None:
            wall, cpu = _timed2(ref_fn, device)
            ref_runs.append(wall)
            ref_cpu.append(cpu)
    t_ours = statistics.median(ours_runs)
    t_ref = statistics.median(ref_runs) if ref_runs else None
    return Row(
        N, step, t_ours, t_ref, m_ours.mib, ref_mib, flops_ours / t_ours / 1e9, None if t_ref is None else flops_ref / t_ref / 1e9,
        ours_runs=ours_runs, ref_runs=ref_runs, ours_cpu_s=statistics.median(ours_cpu),
        ref_cpu_s=statistics.median(ref_cpu) if ref_cpu else None,
    )


def bench_big_train(N: int, args, device: torch.device, precision: str) -> Row:
    """One training step of our model alone on a large bag (no cap): time and peak memory."""
    torch.manual_seed(0)
    model = MMILTransformer(args.in_dim, 2, num_subbags=args.num_subbags).to(device).train()
    x = torch.randn(N, args.in_dim, device=device)
    y = torch.tensor([1], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x, seed=0)
        model.loss(out, y).backward()

    with PeakMemory(device) as mem:
        t = _timed(step, device)
    sizes = [N // args.num_subbags + (1 if g < N % args.num_subbags else 0) for g in range(args.num_subbags)]
    f = 3 * forward_flops(N, sizes, C=args.in_dim, D=512, inner=512, heads=8, layers=2, k=1, ours=True)
    return Row(N, "train", t, None, mem.mib, None, f / t / 1e9, None, note="our model only, no cap", ours_runs=[t])


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], peak: float, peak32: float, precision: str) -> None:
    """Ours' throughput is a fraction of the mm peak in its precision, the reference's of the fp32 peak."""
    print(f"\n{'N':>7} {'step':>5} | {'ours s':>8} {'ref s':>8} {'speedup':>7} {'cpu-time':>8} | {'ours MiB':>9} {'ref MiB':>9} {'KiB/inst':>8} | "
          f"{'ours GF/s':>9} {'%mm':>5} {'ref GF/s':>8} {'%mm':>5} | note")
    for r in rows:
        print(
            f"{r.n:>7} {r.step:>5} | {r.ours_s:>8.3f} {_fmt(r.ref_s, '8.3f')} {_fmt(r.speedup, '6.2f') + 'x' if r.speedup else '-':>7} "
            f"{_fmt(r.cpu_speedup, '7.2f') + 'x' if r.cpu_speedup else '-':>8} | "
            f"{r.ours_mib:>9.0f} {_fmt(r.ref_mib, '9.0f')} {r.ours_mib * 1024 / r.n:>8.1f} | "
            f"{r.ours_gflops:>9.0f} {100 * r.ours_gflops / peak:>4.0f}% {_fmt(r.ref_gflops, '8.0f')} "
            f"{_fmt(None if r.ref_gflops is None else 100 * r.ref_gflops / peak32, '4.0f')}{'%' if r.ref_gflops else ''} | {r.note}"
        )
    print(f"(ours: {precision}, %mm against the torch.mm peak {peak:.0f} GFLOP/s; reference: fp32, against {peak32:.0f} GFLOP/s; "
          "FLOPs = what each implementation executes, training = 3x forward)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Batched MMIL-Transformer vs the naive per-sub-bag reference: time, memory, throughput.")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000], help="bag sizes N to compare (default: 2000 10000 40000)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="our model's precision (bf16 = autocast); the reference is always fp32")
    p.add_argument("--in-dim", type=int, default=1024, help="feature dimension C (default 1024)")
    p.add_argument("--num-subbags", type=int, default=10, help="sub-bags G (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation after one warm-up (median reported; default 3)")
    p.add_argument("--big-n", type=int, default=100_000, help="also time one training step of our model at this N without cap (0 = skip; default 100000)")
    p.add_argument("--reference-train-max", type=int, default=20_000,
                   help="largest N for which the reference training step is run (it stores every attention matrix; default 20000)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    pinned = _pin_malloc_thresholds() if device.type == "cpu" else False
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"malloc pinned: {pinned}")
    peak = matmul_peak_gflops(dtype, device)
    peak32 = peak if dtype == torch.float32 else matmul_peak_gflops(torch.float32, device)
    print(f"torch.mm peak: {peak:.0f} GFLOP/s ({args.precision}), {peak32:.0f} GFLOP/s (fp32)")
    rows: list[Row] = []
    for N in args.sizes:
        t = time.perf_counter()
        rows += bench_size(N, args, device, args.precision)
        print(f"  N={N}: done in {time.perf_counter() - t:.0f} s", flush=True)
    if args.big_n:
        rows.append(bench_big_train(args.big_n, args, device, args.precision))
    print_table(rows, peak, peak32, args.precision)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine distort timings)")
    if args.json:
        from mmpl.jsonio import write_json

        write_json(args.json, {"precision": args.precision, "mm_peak_gflops": peak, "mm_peak_fp32_gflops": peak32,
                               "rows": [dict(asdict(r), speedup=r.speedup) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
