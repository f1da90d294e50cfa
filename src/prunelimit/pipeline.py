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
killed writer left behind. The directory layout lives in :mod:`prunelimit.rundir`.

Under ``torchrun`` only the spectrum step runs on every rank (each on its shard of the data,
combined by the core's all-reduces); the other steps run on rank 0 and only rank 0 writes.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mmpl.fsio import remove_stale_temp_files
from torch import nn

from . import distributed
from .config import RunConfig
from .data import BatchIterable, DatasetBundle, load_dataset, subset_indices
from .errors import PruneLimitError
from .io import load_state_dict, read_json, save_state_dict, write_json
from .models import create_model
from .preflight import check_data_and_model, check_eps_batches
# The run directory's layout and bookkeeping live in rundir.py; re-exported here for callers.
from .rundir import (  # noqa: F401
    CONFIG_FILE, MODEL_FILE, MODEL_INFO_FILE, OPTIONAL, PLOT_FILES, PRUNED_MODEL_FILE, REQUIRES, RESULT_FILES, STEPS,
    RunDirectory, clear_run_directory, open_run, save_config,
)

EVAL_BATCH_SIZE = 1024


def _loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ============================================================================ context
@dataclass
class Context:
    """What the steps share during one invocation: directory, config, data (loaded once), options."""

    run: RunDirectory
    config: RunConfig
    progress: bool = True
    log: Callable[[str], None] = _stderr
    _bundle: DatasetBundle | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        device = torch.device(self.config.device)
        if device.type == "cuda" and device.index is None and distributed.is_distributed():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device

    @property
    def bundle(self) -> DatasetBundle:
        if self._bundle is None:
            self._bundle = load_dataset(self.config.dataset, data_root=self.config.data_root, seed=self.config.seed)
        return self._bundle

    def build_model(self, in_shape: Sequence[int], num_classes: int) -> nn.Module:
        """A freshly initialised model; initialisation is seeded without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return create_model(self.config.model, in_shape, num_classes)

    def load_model(self, file: str = MODEL_FILE) -> nn.Module:
        """Rebuild the trained model from model.json and load its safetensors weights (strict)."""
        info_path = self.run.file(MODEL_INFO_FILE)
        weights_path = self.run.file(file)
        if not info_path.is_file() or not weights_path.is_file():
            raise PruneLimitError(f"{self.run.path} has no trained model ({MODEL_INFO_FILE}, {file}); run `prunelimit train --out {self.run.path}` first")
        info = read_json(info_path)
        model = self.build_model(info["in_shape"], info["num_classes"])
        try:
            state = load_state_dict(weights_path)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise PruneLimitError(f"cannot read {weights_path} ({type(err).__name__}: {err}); rerun `prunelimit train --force`") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise PruneLimitError(f"{weights_path} does not fit model {info['model']!r} ({first}); rerun `prunelimit train --force`") from None
        return model.to(self.device).eval()

    def test_batches(self) -> BatchIterable:
        return BatchIterable(self.bundle.test, EVAL_BATCH_SIZE, device=self.device)


# ============================================================================ steps
def step_train(ctx: Context) -> dict:
    """l1-regularised training from a seeded initialisation; dense test accuracy and loss."""
    from .params import num_weights, prunable_parameters, weights_vector
    from .regularize import evaluate, train_l1

    cfg, bundle = ctx.config, ctx.bundle
    model = ctx.build_model(bundle.in_shape, bundle.num_classes)
    num_prunable = num_weights(prunable_parameters(model))
    ctx.log(f"train: {cfg.model} on {cfg.dataset} ({len(bundle.train)} train / {len(bundle.test)} test), "
            f"D = {num_prunable} prunable weights, lam = {cfg.lam:g}, {cfg.epochs} epochs")
    history = train_l1(
        model, _loss_fn(), bundle.train, cfg.lam, cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, schedule=cfg.schedule, seed=cfg.seed,
        device=ctx.device, progress=ctx.progress, augment=bundle.augment if cfg.augment else None,
    )
    test_acc, test_loss = evaluate(model, _loss_fn(), ctx.test_batches(), ctx.device)
    w = weights_vector(model)
    save_state_dict(ctx.run.file(MODEL_FILE), model.state_dict(), metadata={"model": cfg.model, "dataset": cfg.dataset})
    write_json(ctx.run.file(MODEL_INFO_FILE), {
        "model": cfg.model, "dataset": cfg.dataset, "in_shape": list(bundle.in_shape),
        "num_classes": bundle.num_classes, "num_prunable": num_prunable, "weights": MODEL_FILE,
    })
    last = history.epochs[-1] if history.epochs else None
    return {
        "test_accuracy_dense": test_acc,
        "test_loss_dense": test_loss,
        "train_accuracy": last.train_accuracy if last else None,
        "train_loss": last.task_loss if last else None,
        "num_prunable": num_prunable,
        "l1_norm": float(np.abs(w).sum()),
        "near_zero_fraction": float(np.mean(np.abs(w) < cfg.regime_tol)),
        "history": history.to_dict(),
    }


def step_spectrum(ctx: Context) -> dict:
    """epsilon, the SLQ spectrum (m chosen by convergence of p* when ``auto``), Hutchinson trace, p0."""
    from .geometry import solve_threshold, radius_curve
    from .hessian import HessianOperator, hessian_rows_null_mass, hutchinson_trace, loss_epsilon
    from .params import weights_vector

    cfg = ctx.config
    model = ctx.load_model()
    loss_fn = _loss_fn()
    hessian_data, eps_data = _spectrum_data(ctx)
    epsilon = loss_epsilon(model, loss_fn, eps_data, progress=ctx.progress)
    op = HessianOperator(model, loss_fn, hessian_data, progress=ctx.progress)
    ctx.log(f"spectrum: eps = {epsilon:.4g}, D = {op.dim}, {op.num_samples} Hessian samples"
            f"{' (cached first-order graph)' if op.cached else ''}")

    use_p0 = cfg.use_p0(model)
    null_mass = None
    p0 = 0.0
    if use_p0:
        null_mass = hessian_rows_null_mass(op, None, None, threshold=cfg.p0_threshold, progress=ctx.progress)
        p0 = null_mass.p0

    w = weights_vector(model)
    auto = cfg.lanczos_steps == "auto"
    spectrum, stop, converged = _lanczos(ctx, op, w, epsilon, p0)
    steps = [int(s) for s in spectrum.steps]
    chosen = max(steps)
    trace = hutchinson_trace(op, None, None, cfg.trace_samples, seed=cfg.seed + 1, progress=ctx.progress)
    curve = radius_curve(w)
    per_probe = [solve_threshold(curve, (spectrum.nodes[k:k + 1], spectrum.weights[k:k + 1]), epsilon, p0)
                 for k in range(spectrum.num_probes)]
    ctx.log(f"spectrum: m = {chosen} Lanczos steps x {spectrum.num_probes} probes"
            f"{' (auto)' if auto else ''}, Tr(H) = {trace.mean:.4g} +- {trace.stderr:.2g}, p0 = {p0:.3f}"
            f"{'' if use_p0 else ' (off)'}, {op.num_products} Hessian-vector products")
    return {
        "epsilon": epsilon,
        "train_loss_mean": op.loss(),
        "num_prunable": op.dim,
        "hessian_samples": op.num_samples,
        "lanczos_steps": chosen,
        "lanczos_steps_per_probe": steps,
        "lanczos_auto": auto,
        "lanczos_converged": converged,
        "convergence_history": [[list(map(float, kp)) for kp in run] for run in stop.history] if stop else None,
        "probes": spectrum.num_probes,
        "p_star_per_probe": per_probe,
        "p0": p0,
        "p0_used": use_p0,
        "null_mass": null_mass.to_dict() if null_mass is not None else None,
        "trace": trace.to_dict(),
        "num_products": op.num_products,
        "hvp_cached_graph": bool(op.cached),
        "spectrum": spectrum.to_dict(),
    }


def _spectrum_data(ctx: Context) -> tuple[BatchIterable, BatchIterable]:
    """Fixed passes over the non-augmented training set (augmentation lives in bundle.augment): Hessian, epsilon."""
    cfg, bundle = ctx.config, ctx.bundle
    check_eps_batches(len(bundle.train), cfg.eps_batch_size)
    rank, world_size = distributed.world()
    indices = subset_indices(len(bundle.train), cfg.hessian_samples, cfg.seed)
    hessian_data = BatchIterable(bundle.train, cfg.hessian_batch_size, indices=indices, device=ctx.device)
    eps_data = BatchIterable(bundle.train, cfg.eps_batch_size, device=ctx.device)
    if world_size > 1:
        hessian_data = distributed.shard(hessian_data, rank, world_size)
        eps_data = distributed.shard(eps_data, rank, world_size)
    return hessian_data, eps_data


def _lanczos(ctx: Context, op, w, epsilon: float, p0: float):
    """SLQ with m fixed, or grown until p* settles ("auto"): (spectrum, stop rule or None, converged or None)."""
    from .geometry import ThresholdConvergence
    from .hessian import slq

    cfg = ctx.config
    auto = cfg.lanczos_steps == "auto"
    stop = None
    if auto:
        stop = ThresholdConvergence(w, epsilon, p0, tol=cfg.lanczos_tol, min_steps=min(50, cfg.lanczos_max_steps),
                                    growth=cfg.lanczos_growth)
        num_steps = cfg.lanczos_max_steps
    else:
        num_steps = int(cfg.lanczos_steps)
    spectrum = slq(op, None, None, num_steps=num_steps, num_probes=cfg.probes, seed=cfg.seed,
                   progress=ctx.progress, stop_when=stop)
    converged = None
    if auto:
        # Converged: the last two checkpoints agree, or the run ended early (breakdown, m = D).
        converged = all(
            (len(hist) >= 2 and abs(hist[-1][1] - hist[-2][1]) < cfg.lanczos_tol) or int(s) < num_steps or int(s) >= op.dim
            for hist, s in zip(stop.history, spectrum.steps)
        )
        if not converged:
            ctx.log(f"spectrum: p* had not settled to {cfg.lanczos_tol} after {num_steps} Lanczos steps; "
                    "raise lanczos_max_steps for a steadier estimate")
    return spectrum, stop, converged


def load_spectrum(record: dict):
    """The SpectrumEstimate stored in a spectrum.json record."""
    from .hessian import SpectrumEstimate

    return SpectrumEstimate.from_dict(record["spectrum"])


def prediction_from_files(ctx: Context) -> tuple[Any, Any]:
    """(ThresholdPrediction, LompRegime) recomputed from model.safetensors and spectrum.json alone."""
    from .geometry import lomp_regime, predict_threshold
    from .params import weights_vector

    cfg = ctx.config
    record = ctx.run.read_result("spectrum")
    if record is None:
        raise PruneLimitError(f"{ctx.run.path} has no spectrum.json; run `prunelimit spectrum --out {ctx.run.path}` first")
    w = weights_vector(ctx.load_model())
    prediction = predict_threshold(w, record["epsilon"], load_spectrum(record), p0=record["p0"] if record["p0_used"] else 0.0,
                                   trace=record["trace"]["mean"], lomp_tol=cfg.regime_tol)
    regime = lomp_regime(w, prediction.predicted_ratio, cfg.regime_tol, cfg.regime_min_share)
    return prediction, regime


def step_predict(ctx: Context) -> dict:
    """p* from G(R(p)) = p, kept fraction, trace bound, sensitivity to eps, LOMP-regime check."""
    prediction, regime = prediction_from_files(ctx)
    payload = prediction.to_dict()
    payload.update({
        "predicted_threshold": prediction.predicted_ratio,
        "near_zero_fraction": regime.near_zero_fraction,
        "in_lomp_regime": regime.in_regime,
        "lomp_message": regime.message,
        "warning": None if regime.in_regime else regime.message,
    })
    ctx.log(f"predict: p* = {prediction.predicted_ratio:.4f} (keep {prediction.kept_fraction:.2%}); "
            f"eps/2 -> {prediction.sensitivity.get('eps*0.5', float('nan')):.4f}, 2 eps -> {prediction.sensitivity.get('eps*2', float('nan')):.4f}")
    if not regime.in_regime:
        ctx.log("warning: " + regime.message)
    return payload


def step_prune(ctx: Context) -> dict:
    """Actual threshold (first drop below dense - tolerance; and the released criterion) on the test set."""
    from .prune import actual_threshold, check_ratio, prune_global, remove_masks
    from .regularize import evaluate

    cfg = ctx.config
    model = ctx.load_model()
    loss_fn = _loss_fn()
    test = ctx.test_batches()

    def eval_fn(m: nn.Module) -> tuple[float, float]:
        return evaluate(m, loss_fn, test, ctx.device)

    search = actual_threshold(model, eval_fn, tolerance=cfg.tolerance, progress=ctx.progress)
    payload = search.to_dict()
    payload["actual_threshold"] = search.threshold
    payload["beyond"] = _beyond_threshold(model, eval_fn, search)
    ctx.log(f"prune: actual threshold {search.threshold:.4f} (keep {search.kept_fraction:.2%}) after "
            f"{search.num_evaluations} evaluations; released criterion {search.released_threshold:.4f}")

    prediction = ctx.run.read_result("predict")
    ratio, source = None, None
    if cfg.prune_ratio is not None:
        ratio, source = check_ratio(cfg.prune_ratio), "prune_ratio"
    elif prediction is not None:
        ratio, source = min(prediction["predicted_threshold"], 1.0 - 1.0 / prediction["dim"]), "predicted"
    if ratio is not None:
        pruned = copy.deepcopy(model)
        prune_global(pruned, ratio)
        acc, loss = eval_fn(pruned)
        payload["at_ratio"] = {"ratio": ratio, "source": source, "test_accuracy": acc, "test_loss": loss}
        ctx.log(f"prune: at the {source} ratio {ratio:.4f}: test accuracy {acc:.4f} (dense {search.dense_accuracy:.4f})")
        if cfg.save_pruned:
            remove_masks(pruned)
            save_state_dict(ctx.run.file(PRUNED_MODEL_FILE), pruned.state_dict(),
                            metadata={"model": cfg.model, "ratio": repr(ratio)})
            payload["at_ratio"]["file"] = PRUNED_MODEL_FILE
    elif cfg.save_pruned:
        ctx.log("prune: --save-pruned needs a prediction (run `predict` first) or --prune-ratio; nothing saved")
    return payload


def _beyond_threshold(model: nn.Module, eval_fn: Callable, search, fractions=(0.25, 0.5, 0.75, 0.9)) -> dict:
    """A few evaluations between the threshold and p = 1, so the plot shows the collapse (the search stops at it)."""
    from .prune import MagnitudeMasker

    t = search.threshold
    ratios = sorted({round(t + (1.0 - t) * f, 3) for f in fractions} - {round(r, 3) for r in search.ratios})
    ratios = [r for r in ratios if r < 1.0]
    accs, losses = [], []
    with MagnitudeMasker(model) as masker, torch.no_grad():
        for r in ratios:
            masker.apply(r)
            acc, loss = eval_fn(model)
            accs.append(acc)
            losses.append(loss)
    return {"ratios": ratios, "accuracies": accs, "losses": losses}


REPORT_KEYS = (
    "predicted_threshold", "actual_threshold", "epsilon", "p0", "trace", "num_prunable", "test_accuracy_dense",
)


def build_report(ctx: Context) -> dict:
    """report.json's content, from the other result files only."""
    cfg, run = ctx.config, ctx.run
    train, spectrum, prediction, actual = (run.read_result(s) for s in ("train", "spectrum", "predict", "prune"))
    trace = spectrum["trace"]
    at_ratio = actual.get("at_ratio") or {}
    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "predicted_threshold": prediction["predicted_threshold"],
        "predicted_kept_fraction": prediction["kept_fraction"],
        "actual_threshold": actual["threshold"],
        "actual_kept_fraction": actual["kept_fraction"],
        "actual_threshold_released_criterion": actual["released_threshold"],
        "difference_predicted_minus_actual": prediction["predicted_threshold"] - actual["threshold"],
        "tolerance": actual["tolerance"],
        "threshold_search_evaluations": actual["num_evaluations"],
        "test_accuracy_at_predicted": at_ratio.get("test_accuracy") if at_ratio.get("source") == "predicted" else None,
        "epsilon": spectrum["epsilon"],
        "sensitivity": {"p_star_eps_half": prediction["sensitivity"].get("eps*0.5"),
                        "p_star_eps_double": prediction["sensitivity"].get("eps*2")},
        "p0": spectrum["p0"],
        "p0_used": spectrum["p0_used"],
        "trace": trace["mean"],
        "trace_stderr": trace["stderr"],
        "trace_samples": len(trace["samples"]),
        "trace_bound": prediction["trace_bound"],
        "lanczos_steps": spectrum["lanczos_steps"],
        "lanczos_steps_per_probe": spectrum["lanczos_steps_per_probe"],
        "lanczos_auto": spectrum["lanczos_auto"],
        "lanczos_converged": spectrum["lanczos_converged"],
        "probes": spectrum["probes"],
        "p_star_per_probe": spectrum["p_star_per_probe"],
        "hessian_samples": spectrum["hessian_samples"],
        "hessian_vector_products": spectrum["num_products"],
        "num_prunable": train["num_prunable"],
        "test_accuracy_dense": train["test_accuracy_dense"],
        "test_loss_dense": train["test_loss_dense"],
        "lam": cfg.lam,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "regime_fraction": prediction["near_zero_fraction"],
        "regime_tol": cfg.regime_tol,
        "in_lomp_regime": prediction["in_lomp_regime"],
        "warning": _report_warning(prediction["warning"], train["test_accuracy_dense"],
                                   read_json(run.file(MODEL_INFO_FILE))["num_classes"]),
        "seconds": {s: r["seconds"] for s, r in zip(("train", "spectrum", "predict", "prune"), (train, spectrum, prediction, actual))},
        "plots": dict(PLOT_FILES),
    }


def _report_warning(regime_warning: str | None, dense_accuracy: float, num_classes: int) -> str | None:
    """The regime warning, preceded by one for a model that never learned (thresholds then mean nothing)."""
    warnings = []
    if dense_accuracy <= 1.5 / num_classes:
        warnings.append(f"dense test accuracy {dense_accuracy:.3f} is near chance (1/{num_classes}): "
                        "training failed, both thresholds are meaningless; lower --lam or --lr")
    if regime_warning:
        warnings.append(regime_warning)
    return "; ".join(warnings) or None


def step_report(ctx: Context) -> dict:
    """report.json plus the three PNGs."""
    from .report import write_plots

    report = build_report(ctx)
    run = ctx.run
    write_plots(run.root, run.read_result("spectrum"), run.read_result("predict"), run.read_result("prune"), PLOT_FILES)
    return report


STEP_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "train": step_train, "spectrum": step_spectrum, "predict": step_predict, "prune": step_prune, "report": step_report,
}


# ============================================================================ driver
@dataclass
class StepOutcome:
    step: str
    ran: bool
    reason: str
    seconds: float = 0.0


def run_steps(run: RunDirectory, config: RunConfig, steps: Sequence[str] = STEPS, *, force: bool = False,
              overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = _stderr) -> list[StepOutcome]:
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
        _check_upstream_current(run, config, step, inputs, already=steps[:index])
        if why.startswith("settings changed") or why == "an earlier step was redone":
            ctx.log(f"{step}: redoing ({why})")
        runs_here = step == "spectrum" or rank == 0
        seconds = 0.0
        if runs_here:
            start = time.perf_counter()
            payload = STEP_FUNCTIONS[step](ctx)
            seconds = time.perf_counter() - start
            if rank == 0:
                save_config(run, config)
                run.write_result(step, payload, config, inputs, seconds)
        if world_size > 1:
            torch.distributed.barrier()
        outcomes.append(StepOutcome(step, True, why if not force else "forced", seconds))
    save_config(run, config)
    return outcomes


def _prepare(ctx: Context, steps: Sequence[str], *, force: bool, overwrite: bool) -> None:
    """Check data and model when anything will run, then (rank 0) start afresh or tidy up a resumed directory."""
    run = ctx.run
    if not overwrite:
        _check_plan(run, ctx.config, steps, force)
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


def _check_plan(run: RunDirectory, config: RunConfig, steps: Sequence[str], force: bool) -> None:
    """Up front, the input checks the loop makes for steps that build on results of earlier invocations."""
    for index, step in enumerate(steps):
        earlier = steps[:index]
        if any(up in earlier for up in REQUIRES[step]) or (not force and run.status(step, config)[0]):
            continue
        _check_upstream_current(run, config, step, run.current_inputs(step), already=earlier)


def _check_upstream_current(run: RunDirectory, config: RunConfig, step: str, inputs: dict[str, str], already: Sequence[str]) -> None:
    """Refuse to build on a result that is itself out of date (e.g. `report` after `spectrum --force`)."""
    for up in inputs:
        if up in already:
            continue  # handled earlier in this invocation
        done, why = run.status(up, config)
        if not done:
            raise PruneLimitError(
                f"{run.result_path(up)} is out of date ({why}); run `prunelimit {up} --out {run.path}` "
                f"(or `prunelimit run --out {run.path}`) before `{step}`"
            )


def maybe_init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); False when not launched so."""
    if distributed.is_distributed():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


def run_pipeline(out: str | os.PathLike, overrides: dict[str, Any] | None = None, *, steps: Sequence[str] = STEPS,
                 force: bool = False, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> dict | None:
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
