"""The prunelimit fidelity study: does the predicted threshold p* match the actual one, and where not?

    python benchmarks/fidelity.py --out DIR [--quick] [--threads 1] [--seeds 0 1] [--report-only]

Grid (issue 11): lambda in {0, 1e-5, 5e-5, 2e-4, 1e-3, auto} x seeds x {lenet300 on digits, lenet300 on
mnist5k, fc5 on digits, vgg_small on mnist5k}. Each run is a `prunelimit run` directory DIR/<name>, so a
rerun skips finished runs (and the pipeline itself resumes unfinished steps); a run that stops with exit 2
(e.g. a dense network near chance) leaves DIR/<name>.failed.json and is not retried. Then, without
retraining, the paper's variants are recomputed from each run's saved weights and spectrum.json
(:func:`variant_thresholds`: p0 on/off, negative eigenvalues as |lambda| or dropped, eps/2, eps, 2 eps) and
cached in DIR/variants/<name>.json; the only extra cost is p0 for the FC nets (99 Hessian rows).
Finally docs/fidelity.md and docs/img/fidelity.png are written from the JSON files alone
(:mod:`fidelity_report`), so ``--report-only`` regenerates them without running anything.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mmpl.fsio import check_output_dir, check_output_file
from mmpl.jsonio import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_report import write_report  # noqa: E402  (a sibling script, not a package)

LAMS = ("0", "1e-05", "5e-05", "0.0002", "0.001", "auto")
VARIANTS_VERSION = 2  # bump when variant_thresholds changes: cached variants are then recomputed


@dataclass(frozen=True)
class Setting:
    """One model/dataset pair of the grid and the flags it runs with (the scaled-down parts)."""

    model: str
    dataset: str
    flags: tuple[str, ...] = ()
    max_seeds: int = 99  # only the first max_seeds of the study's seeds

    @property
    def label(self) -> str:
        return f"{self.model}/{self.dataset}"


# Scaled to one CPU core and about 75 minutes (docs/fidelity.md says so): Lanczos gets 60 s per run (the
# default budget is 120 s); vgg_small trains 8 epochs instead of 20, takes its Hessian products on 500 of
# the 4000 training images and runs for the first seed only. Cheapest settings first.
COMMON_FLAGS = ("--lanczos-max-seconds", "60")
SETTINGS = (
    Setting("lenet300", "digits"),
    Setting("fc5", "digits"),
    Setting("lenet300", "mnist5k"),
    Setting("vgg_small", "mnist5k", ("--epochs", "8", "--hessian-samples", "500"), max_seeds=1),
)


@dataclass
class Plan:
    out: Path
    seeds: tuple[int, ...]
    lams: tuple[str, ...] = LAMS
    settings: tuple[Setting, ...] = SETTINGS
    threads: int = 1
    extra: tuple[str, ...] = field(default_factory=tuple)


def run_name(setting: Setting, lam: str, seed: int) -> str:
    return f"{setting.model}_{setting.dataset}_lam{lam}_s{seed}"


def run_command(plan: Plan, setting: Setting, lam: str, seed: int) -> list[str]:
    """The `prunelimit run` command line of one grid point."""
    return [sys.executable, "-m", "prunelimit", "run", "--out", str(plan.out / run_name(setting, lam, seed)),
            "--model", setting.model, "--dataset", setting.dataset, "--lam", lam, "--seed", str(seed),
            "--threads", str(plan.threads), "--no-progress", *COMMON_FLAGS, *setting.flags, *plan.extra]


def grid(plan: Plan):
    """(setting, lam, seed) in the order they run: all settings of one seed before the next seed."""
    for k, seed in enumerate(plan.seeds):
        for setting in plan.settings:
            if k < setting.max_seeds:
                for lam in plan.lams:
                    yield setting, lam, seed


def run_one(plan: Plan, setting: Setting, lam: str, seed: int) -> str:
    """Run (or resume) one grid point; 'done', 'failed' (exit != 0, recorded) or 'ran'."""
    name = run_name(setting, lam, seed)
    failed = plan.out / f"{name}.failed.json"
    if (plan.out / name / "report.json").is_file() or failed.is_file():
        return "failed" if failed.is_file() else "done"
    start = time.perf_counter()
    with open(plan.out / f"{name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(run_command(plan, setting, lam, seed), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (plan.out / f"{name}.log").read_text(encoding="utf-8").strip().splitlines()
        write_json(failed, {"setting": setting.label, "lam": lam, "seed": seed, "returncode": proc.returncode,
                            "message": lines[-1] if lines else "", "seconds": seconds})
        return "failed"
    return "ran"


# ---------------------------------------------------------------------------------------- variants

def variant_thresholds(weights: np.ndarray, record: dict, p0_rows: float | None) -> dict[str, float | None]:
    """p* of the paper's variants, recomputed from the weights and spectrum.json's record (no retraining).

    default: as the run (p0 as used, |theta|, eps); eps/2, 2eps: epsilon scaled; negatives dropped: the
    Ritz nodes theta < 0 get weight 0 (each probe renormalised) instead of counting as |theta|;
    p0 off / p0 on: the null-mass correction p0 forced to 0 / to the Hessian-row value (None if unknown).
    Also: negative_mass = mean over probes of the quadrature weight on theta < 0; removed_energy =
    R(p*)^2 / ||w||^2, the share of the squared weight norm that pruning at p* removes.
    """
    from prunelimit.geometry import num_removed, radius_curve, solve_threshold

    curve = radius_curve(weights)
    eps = float(record["epsilon"])
    nodes = np.atleast_2d(np.asarray(record["spectrum"]["nodes"], dtype=np.float64))
    tau = np.atleast_2d(np.asarray(record["spectrum"]["weights"], dtype=np.float64))
    p0 = float(record["p0"]) if record["p0_used"] else 0.0
    p0_on = float(record["p0"]) if record["p0_used"] else p0_rows
    positive = np.where(nodes >= 0, tau, 0.0)
    keep = positive.sum(axis=1) > 0

    def solve(measure, e=eps, q=p0):
        return solve_threshold(curve, measure, e, q)

    default = solve((nodes, tau))
    return {
        "default": default,
        "eps/2": solve((nodes, tau), 0.5 * eps),
        "2eps": solve((nodes, tau), 2.0 * eps),
        "negatives dropped": solve((nodes[keep], positive[keep])) if keep.any() else None,
        "p0 off": solve((nodes, tau), q=0.0),
        "p0 on": None if p0_on is None else solve((nodes, tau), q=p0_on),
        "p0_rows": p0_on,
        "negative_mass": float(np.mean(np.where(nodes < 0, tau, 0.0).sum(axis=1))),
        "removed_energy": float(curve.sq_cumsum[num_removed(default, curve.dim)] / curve.sq_cumsum[-1]),
    }


def _context(run_dir: Path, threads: int):
    from prunelimit.context import Context
    from prunelimit.rundir import open_run

    torch.set_num_threads(threads)
    run, config = open_run(run_dir, None, must_exist=True)
    return Context(run, config, progress=False, log=lambda _m: None)


def null_mass_of(ctx) -> float:
    """p0 from Hessian rows for a run whose pipeline did not compute it (FC nets: p0 auto = off)."""
    from prunelimit.context import loss_fn
    from prunelimit.data import BatchIterable, subset_indices
    from prunelimit.estimators import hessian_rows_null_mass
    from prunelimit.hessian import hessian_operator

    cfg, model = ctx.config, ctx.load_model()
    indices = subset_indices(len(ctx.bundle.train), cfg.hessian_samples, cfg.seed)
    batches = BatchIterable(ctx.bundle.train, cfg.hessian_batch_size, indices=indices, device=ctx.device)
    op = hessian_operator(model, loss_fn(), batches)
    return hessian_rows_null_mass(op, threshold=cfg.p0_threshold).p0


def compute_variants(out: Path, name: str, threads: int, with_p0: bool = True) -> dict | None:
    """DIR/variants/<name>.json: the variants of a finished run, recomputed when its spectrum changed."""
    from prunelimit.params import weights_vector

    run_dir, path = out / name, out / "variants" / f"{name}.json"
    spectrum = read_json(run_dir / "spectrum.json") if (run_dir / "report.json").is_file() else None
    if spectrum is None:
        return None
    cached = read_json(path) if path.is_file() else None
    fresh = cached and cached.get("spectrum_stamp") == spectrum.get("stamp") and cached.get("version") == VARIANTS_VERSION
    if fresh and (cached.get("p0_rows") is not None or not with_p0):
        return cached
    ctx = _context(run_dir, threads)
    p0_rows = None if spectrum["p0_used"] or not with_p0 else null_mass_of(ctx)
    variants = variant_thresholds(weights_vector(ctx.load_model()), spectrum, p0_rows)
    variants.update(spectrum_stamp=spectrum.get("stamp"), version=VARIANTS_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, variants)
    return variants


# ---------------------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder of the study's run directories")
    parser.add_argument("--quick", action="store_true", help="smoke size: lenet300/digits, lambda 0, 2e-4 and auto, seed 0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the doc and the PNG from DIR")
    parser.add_argument("--p0-rows-seeds", type=int, nargs="*", default=None, metavar="S",
                        help="seeds whose FC runs get the Hessian-row p0 of the variant 'p0 on' (default: all; none: skip)")
    parser.add_argument("--no-p0-rows", action="store_true", help="skip the Hessian-row p0 of FC runs (variant 'p0 on')")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "fidelity.md", help="Markdown file to write")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "fidelity.png", help="PNG to write")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(args.out, (0,), ("0", "0.0002", "auto"), SETTINGS[:1], args.threads)
    return Plan(args.out, tuple(args.seeds), threads=args.threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out)
    check_output_file(args.doc, "--doc")
    check_output_file(args.png, "--png")
    plan = make_plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    points = list(grid(plan))
    if not args.report_only:
        for k, (setting, lam, seed) in enumerate(points, 1):
            start = time.perf_counter()
            status = run_one(plan, setting, lam, seed)
            print(f"[{k}/{len(points)}] {run_name(setting, lam, seed)}: {status} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        p0_seeds = plan.seeds if args.p0_rows_seeds is None else tuple(args.p0_rows_seeds)
        for setting, lam, seed in points:
            with_p0 = not args.no_p0_rows and seed in p0_seeds
            compute_variants(plan.out, run_name(setting, lam, seed), plan.threads, with_p0=with_p0)
    runs = [(setting, lam, seed, run_name(setting, lam, seed)) for setting, lam, seed in points]
    write_report(plan.out, runs, args.doc, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
