"""The five steps of a run, each a function of the shared :class:`~prunelimit.context.Context`.

Each returns the payload of its result file (the driver in :mod:`prunelimit.pipeline` adds the
bookkeeping): train -> train.json, spectrum -> spectrum.json, predict -> prediction.json,
prune -> actual.json, report -> report.json (plus the PNGs).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
from mmpl.jsonio import write_json
from torch import nn

from . import distributed
from .context import EVAL_BATCH_SIZE, Context, loss_fn
from .criteria import check_not_chance, prediction_interval, tolerance_summary
from .data import BatchIterable, subset_indices
from .epsilon import loss_epsilon
from .errors import PruneLimitError
from .estimators import SpectrumEstimate, hessian_rows_null_mass, hutchinson_trace, slq
from .geometry import ThresholdConvergence, lomp_regime_fraction, radius_curve, solve_threshold
from .hessian import HessianOperator, hessian_operator
from .io import save_state_dict
from .lamsweep import sweep_lambda
from .params import num_weights, prunable_parameters, weights_vector
from .prediction import ThresholdPrediction, predict_limit
from .preflight import check_eps_batches
from .prune import MagnitudeMasker, actual_threshold, check_ratio, prune_global, remove_masks
from .regularize import evaluate, train_l1
from .report import write_plots
from .rundir import MODEL_FILE, MODEL_INFO_FILE, PLOT_FILES, PRUNED_MODEL_FILE
from .summary import build_report


def step_train(ctx: Context) -> dict:
    """l1-regularised training from a seeded initialisation; dense test accuracy and loss."""
    cfg, bundle = ctx.config, ctx.bundle
    sweep = sweep_lambda(ctx) if cfg.lam == "auto" else None
    lam = sweep.chosen if sweep is not None else float(cfg.lam)
    model = ctx.build_model(bundle.in_shape, bundle.num_classes)
    num_prunable = num_weights(prunable_parameters(model))
    ctx.log(f"train: {cfg.model} on {cfg.dataset} ({len(bundle.train)} train / {len(bundle.test)} test), "
            f"D = {num_prunable} prunable weights, lam = {lam:g}{' (auto)' if sweep else ''}, {cfg.epochs} epochs")
    history = train_l1(
        model, loss_fn(), bundle.train, lam, cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, schedule=cfg.schedule, seed=cfg.seed,
        device=ctx.device, progress=ctx.progress, augment=bundle.augment if cfg.augment else None,
    )
    test_acc, test_loss = evaluate(model, loss_fn(), ctx.test_batches(), ctx.device)
    check_not_chance(test_acc, bundle.num_classes, cfg.chance_margin, lam)  # before anything is written
    w = weights_vector(model)
    save_state_dict(ctx.run.file(MODEL_FILE), model.state_dict(), metadata={"model": cfg.model, "dataset": cfg.dataset})
    write_json(ctx.run.file(MODEL_INFO_FILE), {
        "model": cfg.model, "dataset": cfg.dataset, "in_shape": list(bundle.in_shape),
        "num_classes": bundle.num_classes, "num_prunable": num_prunable, "weights": MODEL_FILE,
    })
    last = history.epochs[-1] if history.epochs else None
    return {
        "lam": lam,
        "lam_sweep": sweep.to_dict() if sweep is not None else None,
        "test_accuracy_dense": test_acc,
        "test_loss_dense": test_loss,
        "train_accuracy": last.train_accuracy if last else None,
        "train_loss": last.task_loss if last else None,
        "num_prunable": num_prunable,
        "l1_norm": float(np.abs(w).sum()),
        "near_zero_fraction": lomp_regime_fraction(w, cfg.regime_tol),
        "history": history.to_dict(),
    }


def step_spectrum(ctx: Context) -> dict:
    """epsilon, the SLQ spectrum (m chosen by convergence of p* when ``auto``), Hutchinson trace, p0."""
    cfg = ctx.config
    model = ctx.load_model()
    hessian_data, eps_data = _spectrum_data(ctx)
    epsilon = loss_epsilon(model, loss_fn(), eps_data, progress=ctx.progress)
    op = hessian_operator(model, loss_fn(), hessian_data, progress=ctx.progress)
    ctx.log(f"spectrum: eps = {epsilon:.4g}, D = {op.dim}, {op.num_samples} Hessian samples"
            f"{' (cached first-order graph)' if op.cached else ''}")
    use_p0 = cfg.use_p0(model)
    null_mass = hessian_rows_null_mass(op, threshold=cfg.p0_threshold, progress=ctx.progress) if use_p0 else None
    p0 = null_mass.p0 if null_mass is not None else 0.0
    w = weights_vector(model)
    spectrum, stop, converged, budget = _lanczos(ctx, op, w, epsilon, p0)
    trace = hutchinson_trace(op, cfg.trace_samples, seed=cfg.seed + 1, progress=ctx.progress)
    curve = radius_curve(w)
    per_probe = [solve_threshold(curve, (spectrum.nodes[k:k + 1], spectrum.weights[k:k + 1]), epsilon, p0)
                 for k in range(spectrum.num_probes)]
    ctx.log(f"spectrum: m = {max(spectrum.steps)} Lanczos steps x {spectrum.num_probes} probes"
            f"{' (auto)' if stop else ''}, Tr(H) = {trace.mean:.4g} +- {trace.stderr:.2g}, p0 = {p0:.3f}"
            f"{'' if use_p0 else ' (off)'}, {op.num_products} Hessian-vector products")
    return {
        "epsilon": epsilon,
        "train_loss_mean": op.loss(),
        "num_prunable": op.dim,
        "hessian_samples": op.num_samples,
        "lanczos_steps": max(int(s) for s in spectrum.steps),
        "lanczos_steps_per_probe": [int(s) for s in spectrum.steps],
        "lanczos_auto": stop is not None,
        "lanczos_converged": converged,
        "lanczos_stop_reasons": budget.pop("stop_reasons"),
        "lanczos_budget": budget,
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


def _lanczos(ctx: Context, op: HessianOperator, w: np.ndarray, epsilon: float, p0: float):
    """SLQ with m fixed, or grown until p* settles ("auto"): (spectrum, stop rule or None, converged or None, budget).

    m never exceeds what lanczos_max_memory_mb holds (the basis is m x D float64); in auto mode the
    runs also share a time budget of lanczos_max_seconds.
    """
    cfg = ctx.config
    auto = cfg.lanczos_steps == "auto"
    memory_steps = max(2, int(cfg.lanczos_max_memory_mb * 2**20 // (8 * op.dim)))
    wanted = cfg.lanczos_max_steps if auto else int(cfg.lanczos_steps)
    num_steps = min(wanted, memory_steps)
    stop = None
    if auto:
        stop = ThresholdConvergence(w, epsilon, p0, tol=cfg.lanczos_tol, min_steps=min(50, num_steps),
                                    growth=cfg.lanczos_growth, rel_tol=cfg.lanczos_rel_tol,
                                    max_seconds=cfg.lanczos_max_seconds, num_probes=cfg.probes)
    start = time.perf_counter()
    spectrum = slq(op, num_steps=num_steps, num_probes=cfg.probes, seed=cfg.seed, progress=ctx.progress, stop_when=stop)
    budget = {"memory_mb": cfg.lanczos_max_memory_mb, "memory_step_cap": memory_steps, "step_cap": num_steps,
              "capped_by_memory": memory_steps < wanted, "max_seconds": cfg.lanczos_max_seconds if auto else None,
              "seconds": time.perf_counter() - start, "basis_mb": num_steps * op.dim * 8 / 2**20}
    if memory_steps < wanted:
        ctx.log(f"spectrum: m capped at {memory_steps} by the memory budget ({cfg.lanczos_max_memory_mb:g} MiB for "
                f"{op.dim} weights; --lanczos-max-memory-mb)")
    converged = reasons = None
    if auto:
        # Converged: p* settled, or the run ended early (breakdown, m = D); not: a budget or the step cap ended it.
        reasons = [r if r is not None else ("breakdown or m = D" if int(s) < num_steps or int(s) >= op.dim else "step cap")
                   for r, s in zip(stop.reasons, spectrum.steps)]
        converged = all(r in ("converged", "breakdown or m = D") for r in reasons)
        if not converged:
            ctx.log(f"spectrum: p* had not settled for every probe ({', '.join(reasons)}); raise "
                    "--lanczos-max-seconds / --lanczos-max-steps for a steadier estimate")
    budget["stop_reasons"] = reasons
    return spectrum, stop, converged, budget


def load_spectrum(record: dict) -> SpectrumEstimate:
    """The SpectrumEstimate stored in a spectrum.json record."""
    return SpectrumEstimate.from_dict(record["spectrum"])


def prediction_from_files(ctx: Context) -> ThresholdPrediction:
    """The prediction (with the LOMP-regime check) recomputed from model.safetensors and spectrum.json alone."""
    cfg = ctx.config
    record = ctx.run.read_result("spectrum")
    if record is None:
        raise PruneLimitError(f"{ctx.run.path} has no spectrum.json; run `prunelimit spectrum --out {ctx.run.path}` first")
    return predict_limit(weights_vector(ctx.load_model()), record["epsilon"], load_spectrum(record),
                         p0=record["p0"] if record["p0_used"] else 0.0, trace=record["trace"]["mean"],
                         regime_tol=cfg.regime_tol, regime_min_share=cfg.regime_min_share)


def step_predict(ctx: Context) -> dict:
    """p* from G(R(p)) = p, kept fraction, trace bound, sensitivity to eps, LOMP-regime check."""
    prediction = prediction_from_files(ctx)
    payload = prediction.to_dict()
    per_probe = ctx.run.read_result("spectrum").get("p_star_per_probe") or []
    payload.update({
        "predicted_threshold": prediction.predicted_ratio,
        "predicted_interval": prediction_interval(prediction.predicted_ratio, prediction.sensitivity, per_probe),
        "warning": None if prediction.in_lomp_regime else prediction.lomp_message,
    })
    ctx.log(f"predict: p* = {prediction.predicted_ratio:.4f} (keep {prediction.kept_fraction:.2%}); "
            f"eps/2 -> {prediction.sensitivity.get('eps*0.5', float('nan')):.4f}, 2 eps -> {prediction.sensitivity.get('eps*2', float('nan')):.4f}")
    if not prediction.in_lomp_regime:
        ctx.log("warning: " + prediction.lomp_message)
    return payload


def step_prune(ctx: Context) -> dict:
    """Actual threshold (first drop below dense - tolerance; and the released criterion) on the test set."""
    cfg = ctx.config
    model = ctx.load_model()
    loss, test = loss_fn(), ctx.test_batches()

    def eval_fn(m: nn.Module) -> tuple[float, float]:
        return evaluate(m, loss, test, ctx.device)

    search = actual_threshold(model, eval_fn, tolerance=cfg.tolerance, progress=ctx.progress)
    payload = search.to_dict()
    payload["actual_threshold"] = search.threshold if cfg.criterion == "first-drop" else search.released_threshold
    payload["criterion"] = cfg.criterion
    payload["tolerance_meaning"] = tolerance_summary(search.dense_accuracy, len(ctx.bundle.test), cfg.tolerance)
    payload["train_data"] = _train_threshold(ctx, model, loss)
    payload["beyond"] = _beyond_threshold(model, eval_fn, search)
    meaning = payload["tolerance_meaning"]
    ctx.log(f"prune: actual threshold {search.threshold:.4f} (keep {search.kept_fraction:.2%}; tolerance "
            f"{meaning['tolerance_points']:g} points of {meaning['test_size']} test samples, dense accuracy +- "
            f"{meaning['dense_accuracy_stderr_points']:.2f} points) after {search.num_evaluations} evaluations; "
            f"released criterion {search.released_threshold:.4f}; on train data {payload['train_data']['threshold']:.4f}")
    prediction = ctx.run.read_result("predict")
    ratio, source = None, None
    if cfg.prune_ratio is not None:
        ratio, source = check_ratio(cfg.prune_ratio), "prune_ratio"
    elif prediction is not None:
        ratio, source = min(prediction["predicted_threshold"], 1.0 - 1.0 / prediction["dim"]), "predicted"
    if ratio is not None:
        payload["at_ratio"] = _at_ratio(ctx, model, eval_fn, ratio, source, search.dense_accuracy)
    elif cfg.save_pruned:
        ctx.log("prune: --save-pruned needs a prediction (run `predict` first) or --prune-ratio; nothing saved")
    return payload


def _train_threshold(ctx: Context, model: nn.Module, loss) -> dict:
    """The actual threshold measured on the (non-augmented) training set, same tolerance."""
    train = BatchIterable(ctx.bundle.train, EVAL_BATCH_SIZE, device=ctx.device)
    search = actual_threshold(model, lambda m: evaluate(m, loss, train, ctx.device), tolerance=ctx.config.tolerance)
    return {"threshold": search.threshold, "released_threshold": search.released_threshold,
            "dense_accuracy": search.dense_accuracy, "num_evaluations": search.num_evaluations,
            "size": len(ctx.bundle.train)}


def _at_ratio(ctx: Context, model: nn.Module, eval_fn: Callable, ratio: float, source: str, dense: float) -> dict:
    """Test accuracy and loss of a copy pruned at ``ratio`` (saved with --save-pruned)."""
    pruned = copy.deepcopy(model)
    prune_global(pruned, ratio)
    acc, loss = eval_fn(pruned)
    out = {"ratio": ratio, "source": source, "test_accuracy": acc, "test_loss": loss}
    ctx.log(f"prune: at the {source} ratio {ratio:.4f}: test accuracy {acc:.4f} (dense {dense:.4f})")
    if ctx.config.save_pruned:
        remove_masks(pruned)
        save_state_dict(ctx.run.file(PRUNED_MODEL_FILE), pruned.state_dict(),
                        metadata={"model": ctx.config.model, "ratio": repr(ratio)})
        out["file"] = PRUNED_MODEL_FILE
    return out


def _beyond_threshold(model: nn.Module, eval_fn: Callable, search, fractions=(0.25, 0.5, 0.75, 0.9)) -> dict:
    """A few evaluations between the threshold and p = 1, so the plot shows the collapse (the search stops at it)."""
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


def step_report(ctx: Context) -> dict:
    """report.json plus the three PNGs."""
    report = build_report(ctx.run, ctx.config)
    run = ctx.run
    write_plots(run.root, run.read_result("spectrum"), run.read_result("predict"), run.read_result("prune"), PLOT_FILES)
    return report


STEP_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "train": step_train, "spectrum": step_spectrum, "predict": step_predict, "prune": step_prune, "report": step_report,
}
