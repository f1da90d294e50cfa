"""The run pipeline: train -> spectrum -> predict -> prune -> report, on one run directory.

Each step reads what the earlier ones wrote and writes its own result file atomically:

    DIR/config.yaml        the resolved RunConfig (reproduces the run)
    DIR/model.safetensors  trained weights       DIR/model.json  how to rebuild the model
    DIR/train.json         history, dense test accuracy/loss          (step "train")
    DIR/spectrum.json      epsilon, SLQ spectrum, trace, p0, m chosen (step "spectrum")
    DIR/prediction.json    p*, kept fraction, trace bound, curves     (step "predict")
    DIR/actual.json        threshold search, both criteria           (step "prune")
    DIR/report.json + PNGs                                            (step "report")

Every result file carries a random ``stamp``, the settings it was made with and the stamps of
the results it was computed from. A step is *done* when its file exists, its settings equal
the current configuration and its inputs are the current upstream results; otherwise it is
(re)computed. ``force`` recomputes regardless. So a rerun skips finished work, a changed
option redoes exactly the steps that depend on it, and nothing stale survives.

Before any step computes, the data is loaded and the model built and tried on it
(:mod:`prunelimit.preflight`), so bad input fails in one line with nothing written; then
``overwrite`` deletes the pipeline's files and a resumed run removes temporary files that a
killed writer left behind. The directory layout and bookkeeping live in :mod:`prunelimit.rundir`,
the step bodies in :mod:`prunelimit.steps`, report.json's assembly in :mod:`prunelimit.summary`.

Under ``torchrun`` only the spectrum step runs on every rank (each on its shard of the data,
combined by the core's all-reduces); the other steps run on rank 0 and only rank 0 writes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from mmpl.device import resolve_device
from mmpl.fsio import remove_stale_temp_files

from . import distributed
from .config import RunConfig
from .context import Context, stderr_log
from .errors import PruneLimitError
from .preflight import check_data_and_model
from .rundir import (
    RESULT_FILES, STEPS, RunDirectory, check_plan, check_upstream_current, clear_run_directory, open_run, save_config,
)
from .steps import STEP_FUNCTIONS


@dataclass
class StepOutcome:
    step: str
    ran: bool
    reason: str
    seconds: float = 0.0


def run_steps(run: RunDirectory, config: RunConfig, steps: Sequence[str] = STEPS, *, force: bool = False,
              overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = stderr_log) -> list[StepOutcome]:
    """Run ``steps`` in order on ``run``, skipping those already done (unless ``force``).

    ``overwrite`` first deletes every file the pipeline wrote there (refusing unknown files).
    """
    unknown = [s for s in steps if s not in STEP_FUNCTIONS]
    if unknown:
        raise PruneLimitError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    rank, world_size = distributed.world()
    ctx = Context(run, config, progress=progress and rank == 0, log=log if rank == 0 else (lambda _m: None))
    _prepare(ctx, steps, force=force, overwrite=overwrite)
    outcomes = []
    for index, step in enumerate(steps):
        done, why = run.status(step, config)
        if world_size > 1:
            # Every rank decides from the same files before rank 0 may write any.
            torch.distributed.barrier()
        if done and not force:
            ctx.log(f"{step}: done ({RESULT_FILES[step]}), skipping; --force to redo")
            outcomes.append(StepOutcome(step, False, "done"))
            continue
        inputs = run.current_inputs(step)
        check_upstream_current(run, config, step, inputs, already=steps[:index])
        if why.startswith("settings changed") or why == "an earlier step was redone":
            ctx.log(f"{step}: redoing ({why})")
        seconds = _run_step(ctx, step, inputs, computes=step == "spectrum" or rank == 0, writes=rank == 0)
        if world_size > 1:
            torch.distributed.barrier()
        outcomes.append(StepOutcome(step, True, why if not force else "forced", seconds))
    # config.yaml was saved by each step that ran (_run_step); when every step was skipped it must not
    # change, or the directory would describe settings its results were not made with.
    return outcomes


def _run_step(ctx: Context, step: str, inputs: dict[str, str], *, computes: bool, writes: bool) -> float:
    """Compute ``step`` (on the ranks that do) and write its result (rank 0); the seconds it took."""
    if not computes:
        return 0.0
    start = time.perf_counter()
    payload = STEP_FUNCTIONS[step](ctx)
    seconds = time.perf_counter() - start
    if writes:
        save_config(ctx.run, ctx.config)
        ctx.run.write_result(step, payload, ctx.config, inputs, seconds)
    return seconds


def _prepare(ctx: Context, steps: Sequence[str], *, force: bool, overwrite: bool) -> None:
    """Check data and model when anything will run, then (rank 0) start afresh or tidy up a resumed directory."""
    run = ctx.run
    if not overwrite:
        check_plan(run, ctx.config, steps, force)
    if overwrite or force or not all(run.status(s, ctx.config)[0] for s in steps):
        check_data_and_model(ctx, steps)
    rank, world_size = distributed.world()
    if rank == 0 and run.root.is_dir():
        if overwrite:
            removed = clear_run_directory(run)
            if removed:
                ctx.log(f"--overwrite: deleted {', '.join(removed)} from {run.path}")
        elif remove_stale_temp_files(run.root):
            ctx.log(f"removed temporary files a killed run left in {run.path}")
    if world_size > 1:
        torch.distributed.barrier()


def maybe_init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); False when not launched so."""
    if distributed.is_distributed():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if resolve_device(device, error=PruneLimitError).type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


def run_pipeline(out: str | os.PathLike, overrides: dict[str, Any] | None = None, *, steps: Sequence[str] = STEPS,
                 force: bool = False, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = stderr_log) -> dict | None:
    """Open (or start) the run directory ``out`` with ``overrides`` and run ``steps``.

    ``overwrite`` starts ``out`` afresh from ``overrides`` alone: the stored configuration is
    ignored and the pipeline's files are deleted (only those; unknown files make it refuse).
    Returns report.json's content when the report step ran or exists, else ``None``.
    """
    must_exist = "train" not in steps
    if overwrite and must_exist:
        raise PruneLimitError("--overwrite starts the run afresh, so it needs the train step: use `prunelimit run` or `prunelimit train`")
    run, config = open_run(out, overrides, must_exist=must_exist, fresh=overwrite)
    run_steps(run, config, steps, force=force, overwrite=overwrite, progress=progress, log=log)
    report = run.read_result("report") if "report" in steps else None
    return report
