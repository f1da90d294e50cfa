"""report.json: the run's headline numbers assembled from the other result files, and their summary lines."""
from __future__ import annotations

from mmpl.jsonio import read_json

from .config import RunConfig
from .errors import PruneLimitError
from .rundir import MODEL_INFO_FILE, PLOT_FILES, RunDirectory

REPORT_KEYS = (
    "predicted_threshold", "actual_threshold", "epsilon", "p0", "trace", "num_prunable", "test_accuracy_dense",
)


def build_report(run: RunDirectory, cfg: RunConfig) -> dict:
    """report.json's content, from the other result files only."""
    train, spectrum, prediction, actual = (run.read_result(s) for s in ("train", "spectrum", "predict", "prune"))
    trace = spectrum["trace"]
    at_ratio = actual.get("at_ratio") or {}
    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "predicted_threshold": prediction["predicted_threshold"],
        "predicted_kept_fraction": prediction["kept_fraction"],
        "predicted_interval": prediction.get("predicted_interval"),
        "actual_threshold": actual.get("actual_threshold", actual["threshold"]),
        "actual_kept_fraction": 1.0 - actual.get("actual_threshold", actual["threshold"]),
        "actual_criterion": actual.get("criterion", "first-drop"),
        "actual_threshold_first_drop": actual["threshold"],
        "actual_threshold_train_data": (actual.get("train_data") or {}).get("threshold"),
        "actual_threshold_released_criterion": actual["released_threshold"],
        "difference_predicted_minus_actual": prediction["predicted_threshold"] - actual.get("actual_threshold", actual["threshold"]),
        "tolerance": actual["tolerance"],
        "tolerance_meaning": actual.get("tolerance_meaning"),
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
        "lanczos_stop_reasons": spectrum.get("lanczos_stop_reasons"),
        "lanczos_budget": spectrum.get("lanczos_budget"),
        "probes": spectrum["probes"],
        "p_star_per_probe": spectrum["p_star_per_probe"],
        "hessian_samples": spectrum["hessian_samples"],
        "hessian_vector_products": spectrum["num_products"],
        "num_prunable": train["num_prunable"],
        "test_accuracy_dense": train["test_accuracy_dense"],
        "test_loss_dense": train["test_loss_dense"],
        "lam": train.get("lam", cfg.lam),
        "lam_auto": cfg.lam == "auto",
        "lam_sweep": train.get("lam_sweep"),
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "regime_fraction": prediction["near_zero_fraction"],
        "regime_tol": cfg.regime_tol,
        "in_lomp_regime": prediction["in_lomp_regime"],
        "warning": _report_warning(prediction["warning"], train["test_accuracy_dense"],
                                   read_json(run.file(MODEL_INFO_FILE), PruneLimitError)["num_classes"]),
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


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines for the end of `prunelimit run` (printed by the CLI)."""
    lines = [
        f"model {report['model']} on {report['dataset']}: D = {report['num_prunable']} prunable weights, "
        f"dense test accuracy {report['test_accuracy_dense']:.4f}",
        f"predicted threshold p* = {report['predicted_threshold']:.4f} (keep {report['predicted_kept_fraction']:.2%})",
        f"actual threshold       = {report['actual_threshold']:.4f} (keep {report['actual_kept_fraction']:.2%}; "
        f"released criterion {report['actual_threshold_released_criterion']:.4f}: the authors' rule, the largest ratio still "
        "strictly above dense accuracy)",
        f"difference predicted - actual = {report['difference_predicted_minus_actual']:+.4f}",
        *_meaning_lines(report),
        f"eps = {report['epsilon']:.4g} (p* at eps/2: {report['sensitivity']['p_star_eps_half']:.4f}, at 2 eps: "
        f"{report['sensitivity']['p_star_eps_double']:.4f}), Tr(H) = {report['trace']:.4g}, p0 = {report['p0']:.3f}"
        f"{'' if report['p0_used'] else ' (not used)'}, m = {report['lanczos_steps']}, probes = {report['probes']}",
        f"{report['regime_fraction']:.1%} of weights below {report['regime_tol']:g} "
        f"({'inside' if report['in_lomp_regime'] else 'OUTSIDE'} the LOMP regime)",
    ]
    if report.get("warning"):
        lines.append("warning: " + report["warning"])
    return lines


def _meaning_lines(report: dict) -> list[str]:
    """lambda (and its sweep), the tolerance against the test set's noise, p*'s interval, the train-data threshold."""
    lines = []
    sweep = report.get("lam_sweep")
    if sweep:
        lines.append(f"lam = {report['lam']:g} (auto: largest of {len(sweep['lams'])} swept with validation accuracy >= "
                     f"{sweep['bar']:.4f} = lam-0 accuracy {sweep['baseline_accuracy']:.4f} - {100 * sweep['max_drop']:g} points)")
    meaning = report.get("tolerance_meaning")
    if meaning:
        lines.append(f"tolerance {meaning['tolerance_points']:g} points = {meaning['tolerance_samples']:.1f} of "
                     f"{meaning['test_size']} test samples; dense accuracy standard error "
                     f"{meaning['dense_accuracy_stderr_points']:.2f} points; actual threshold on train data "
                     f"{report.get('actual_threshold_train_data', float('nan')):.4f}")
    interval = report.get("predicted_interval")
    if interval:
        lines.append(f"p* interval (eps/2..2 eps, single probes): [{interval['low']:.4f}, {interval['high']:.4f}]")
    return lines
