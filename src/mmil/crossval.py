"""Cross-validation: folds -> train -> evaluate -> aggregate.

Output directory layout::

    DIR/config.yaml, config.json     the experiment (reproduce the run from it)
    DIR/folds.json                   slide ids of train/val/test (and calib) per fold
    DIR/fold_k/checkpoint/           best model of fold k (safetensors + JSON)
    DIR/fold_k/predictions.csv       slide_id[,case_id],label,prob_<class>..,pred_label (mean over repeats)
    DIR/fold_k/patient_predictions.csv  with case ids: case_id,n_slides,label,prob_<class>..,pred_label (patient mean)
    DIR/fold_k/result.json           fold metrics; its presence marks the fold done
    DIR/metrics.json                 summary: means over folds, *_std, folds list
    DIR/roc.png                      ROC curves

Rerunning the same command skips finished folds and resumes an interrupted fold
from its last saved epoch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mmpl.config import differences
from mmpl.fsio import remove_stale_temp_files
from mmpl.jsonio import nan_from_null, to_builtin, write_json, write_text

from .calibrate_run import calibrate_fold, fold_calibration_fields, plot_run_reliability, summarize_calibration
from .checkpoint import load_checkpoint
from .config import ExperimentConfig, TrainConfig, with_legacy_train_values
from .data.dataset import BagDataset
from .data.splits import FoldSplit, check_no_patient_leakage, plan_folds, with_calibration_sets
from .errors import MMILInputError
from .evaluate import METRIC_NAMES, mean_std, patient_predictions_csv, predict_probs, predictions_csv, repeated_metrics, resolve_device
from .plots import plot_roc
from . import ddp
from .parallel import run_folds
from .rng import private_rng
from .train import LAST_STATE_NAME, resolve_centering, train_fold

RESULT_NAME = "result.json"


@dataclass
class FoldOutcome:
    """One evaluated fold.

    Attributes:
        fold: fold index.
        metrics: test metrics: means over repeats (``auc``, ...), their
            standard deviations (``auc_std``, ...), ``ensemble`` and per-repeat ``repeats``.
        train_seconds: training wall time.
        slide_ids, y_true, probs: test bags, their labels and ``(n_test, C)`` probabilities averaged over repeats.
        checkpoint_dir: best model of the fold.
        n_train, n_val, n_test, best_epoch, epochs_run, stopped_early: bookkeeping.
    """

    fold: int
    metrics: dict[str, Any]
    train_seconds: float
    slide_ids: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    checkpoint_dir: Path
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        """The fold's entry in ``metrics.json``."""
        d: dict[str, Any] = {"fold": self.fold}
        for name in METRIC_NAMES:
            d[name] = self.metrics[name]
        for name in METRIC_NAMES:
            d[f"{name}_std"] = self.metrics[f"{name}_std"]
        d["ensemble"] = self.metrics["ensemble"]
        d.update(fold_calibration_fields(self.metrics))
        d.update(
            n_train=self.n_train, n_val=self.n_val, n_test=self.n_test, best_epoch=self.best_epoch,
            epochs_run=self.epochs_run, stopped_early=self.stopped_early, train_seconds=round(self.train_seconds, 3),
        )
        return d


@dataclass
class CrossValResult:
    """All folds and the summary written to ``metrics.json``."""

    folds: list[FoldOutcome]
    summary: dict[str, Any]
    out_dir: Path


def summarize(outcomes: Sequence[FoldOutcome], header: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` content: for each metric its mean over folds (top level,
    e.g. ``auc``) and standard deviation over folds (``auc_std``); the same for the
    test-time ensemble (``ensemble``); the mean within-fold standard deviation over
    repeats (``repeat_std``); total training time; and the ``folds`` list."""
    out: dict[str, Any] = dict(header or {})
    for name in METRIC_NAMES:
        out[name], out[f"{name}_std"] = mean_std([o.metrics[name] for o in outcomes])
    ens: dict[str, float] = {}
    for name in METRIC_NAMES:
        ens[name], ens[f"{name}_std"] = mean_std([o.metrics["ensemble"][name] for o in outcomes])
    out["ensemble"] = ens
    out["repeat_std"] = {name: mean_std([o.metrics[f"{name}_std"] for o in outcomes])[0] for name in METRIC_NAMES}
    out["calibration"] = summarize_calibration([o.metrics.get("calibration") for o in outcomes])
    out["n_folds"] = len(outcomes)
    out["train_seconds"] = round(sum(o.train_seconds for o in outcomes), 3)
    out["folds"] = [o.summary() for o in outcomes]
    return out


def format_metrics_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the per-fold metrics and their mean ± std."""
    cols = [("auc", "AUC"), ("accuracy", "acc"), ("balanced_accuracy", "bal_acc"), ("f1", "F1")]

    def fmt(v) -> str:
        return "   nan" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:6.4f}"

    lines = [f"{'fold':>6} {'n_test':>6} {'best_ep':>7} " + " ".join(f"{h:>15}" for _, h in cols) + f" {'ens_AUC':>8} {'train_s':>8}"]
    for f in summary["folds"]:
        cells = " ".join(f"{fmt(f[k])} ± {fmt(f[k + '_std']).strip():>6}" for k, _ in cols)
        lines.append(f"{f['fold']:>6} {f['n_test']:>6} {f['best_epoch']:>7} {cells} {fmt(f['ensemble']['auc']):>8} {f['train_seconds']:>8.1f}")
    cells = " ".join(f"{fmt(summary[k])} ± {fmt(summary[k + '_std']).strip():>6}" for k, _ in cols)
    lines.append(f"{'mean':>6} {'':>6} {'':>7} {cells} {fmt(summary['ensemble']['auc']):>8} {summary['train_seconds']:>8.1f}")
    lines.append("(fold rows: mean ± std over the R evaluation repeats; mean row: mean ± std over folds; ens_AUC: AUC of the repeat-averaged probabilities)")
    return "\n".join(lines)


def _fold_plan_json(plan: list[FoldSplit], slide_ids: list[str]) -> list[dict[str, Any]]:
    return [fs.to_dict(slide_ids) for fs in plan]


#: Options that may differ when a run directory is reused (they do not change results).
#: ``epochs`` is not among them: finished folds would mix two schedules.
RUNTIME_OPTIONS = ("progress", "device", "num_workers", "workers", "log_every", "tensorboard")
#: Files a run writes at its top level (``--overwrite`` removes these and the fold directories only).
RUN_FILES = ("config.yaml", "config.json", "folds.json", "metrics.json", "roc.png", "reliability.png")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg, default=str))
    d.pop("features", None)
    d.pop("labels", None)
    d["train"] = {k: v for k, v in with_legacy_train_values(d.get("train", {})).items() if k not in RUNTIME_OPTIONS}
    return d


def config_differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``key: stored -> given`` for every setting that differs (nested keys dotted)."""
    return differences(_comparable(stored), _comparable(given))


def has_progress(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds work worth resuming: a finished fold, a saved epoch or a best checkpoint."""
    for fold_dir in out_dir.glob("fold_*"):
        if (fold_dir / RESULT_NAME).is_file() or (fold_dir / LAST_STATE_NAME).is_file() or (fold_dir / "checkpoint").is_dir():
            return True
    return False


def _check_same_run(out_dir: Path, plan_json: list[dict[str, Any]], experiment: ExperimentConfig) -> None:
    """Refuse, changing nothing, to resume a run made with other folds or settings."""
    hint = "rerun with the stored options, choose a fresh --out, or pass --overwrite to start it afresh"
    if (out_dir / "folds.json").is_file() and json.loads((out_dir / "folds.json").read_text()) != plan_json:
        raise MMILInputError(f"{out_dir}: holds a started run with other folds (other data, seed or --folds); {hint}")
    if (out_dir / "config.json").is_file():
        diff = config_differences(json.loads((out_dir / "config.json").read_text()), experiment.to_dict())
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise MMILInputError(f"{out_dir}: holds a started run with other settings (stored -> given: {shown}); {hint}")


def clear_run_directory(out_dir: Path, *, remove_dir: bool = False) -> None:
    """Delete what a run writes (top-level result files and ``fold_*`` directories), nothing else."""
    import shutil

    if not out_dir.is_dir():
        return
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for fold_dir in out_dir.glob("fold_*"):
        if fold_dir.is_dir() and not fold_dir.is_symlink():
            shutil.rmtree(fold_dir)
    remove_stale_temp_files(out_dir)
    if remove_dir and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _check_model(dataset: BagDataset, model_name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model options without ``in_dim``/``n_classes``; the model is built once, so bad options fail before anything is written."""
    from .models import create_model

    kwargs = {k: v for k, v in model_kwargs.items() if k not in ("in_dim", "n_classes")}
    try:
        with private_rng():
            create_model(model_name, in_dim=dataset.in_dim, n_classes=dataset.n_classes, **kwargs)
    except TypeError as err:
        raise MMILInputError(f"{err}; check the model options") from None
    return kwargs


def _plan(dataset: BagDataset, cfg: TrainConfig, folds: int, seed: int, use_splits: bool, splits_dir: str | Path | None = None) -> list[FoldSplit]:
    """The folds (see :func:`cross_validate`), checked for patient leakage and single-class training parts."""
    predefined = None
    if splits_dir is not None:  # CLAM's splits_k.csv: fold k's train/val/test (docs/wsi.md, formats)
        from .data.layouts import read_clam_split_dir
        from .data.splits import split_file_indices

        predefined = [split_file_indices(parts, dataset.slide_ids, path) for path, parts in read_clam_split_dir(splits_dir)]
    plan = plan_folds(
        dataset.labels,
        k=folds,
        seed=seed,
        val_fraction=cfg.val_fraction,
        groups=dataset.case_ids,
        splits=dataset.splits if use_splits else None,
        fold_ids=dataset.fold_ids if use_splits else None,
        predefined=predefined,
    )
    plan = with_calibration_sets(plan, dataset.labels, cfg.calib_fraction, seed, dataset.case_ids)
    if dataset.case_ids is not None:
        for fs in plan:
            check_no_patient_leakage(dataset.case_ids, fs.train, fs.val, fs.test, fs.calib)
    for fs in plan:
        if len(np.unique(dataset.labels[fs.train])) < 2:
            raise MMILInputError(f"fold {fs.fold}: the training part holds a single class; lower --folds or check the split")
    return plan


def _split_name(plan: list[FoldSplit], dataset: BagDataset, use_splits: bool, splits_dir: str | Path | None = None) -> str:
    if splits_dir is not None:
        return "splits-dir"
    if len(plan) == 1:
        return "fixed"
    if use_splits and dataset.fold_ids is not None:
        return "predefined"
    return "stratified-kfold" + ("-patient" if dataset.case_ids is not None else "")


def _start_run_directory(out_dir: Path, experiment: ExperimentConfig, plan_json: list[dict[str, Any]], overwrite: bool, clean: bool = True) -> bool:
    """Make ``out_dir`` ready (afresh with ``overwrite``) and write the experiment and its folds; returns whether it was created.

    Under torchrun only rank 0 writes (the others wait for it); ``clean=False`` leaves temporary
    files alone (other processes may be writing folds of the same run)."""
    ddp.init_from_env(resolve_device(experiment.train.device))
    if not ddp.is_writer():
        ddp.barrier()
        return False
    created = not out_dir.exists()
    if overwrite:
        clear_run_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale_temp_files(out_dir)
    experiment.save(out_dir)
    write_json(out_dir / "folds.json", plan_json)
    ddp.barrier()
    return created


def cross_validate(
    dataset: BagDataset,
    model_name: str,
    model_kwargs: dict[str, Any],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    use_splits: bool = True,
    experiment: ExperimentConfig | None = None,
    validate_data: bool = True,
    overwrite: bool = False,
    splits_dir: str | Path | None = None,
    only_folds: Sequence[int] | None = None,
) -> CrossValResult:
    """Cross-validate ``model_name`` on ``dataset`` and write the run directory.

    Folds: the label CSV's fixed split (one fold) or ``fold`` column when
    ``use_splits``; otherwise stratified ``folds``-fold, patient-level when the
    dataset has case ids. Each training part gives up ``cfg.val_fraction`` of its
    bags (stratified, patient-level) as the validation set for early stopping.
    ``splits_dir`` (CLAM's ``splits_k.csv`` files) defines the folds instead: fold k
    trains on ``train``, stops early on ``val`` (carved from train when empty) and tests on ``test``.
    ``seed`` fixes the fold assignment and the test-time seeds (repeat r uses
    ``seed + r``); ``cfg.seed`` the training. Before anything is written, every
    bag is read once (``validate_data``) and the model is built once, so bad
    input fails with nothing on disk. A directory holding a started run with
    other settings is refused, naming them, unless ``overwrite`` (which starts it
    afresh); a run that fails before any fold saved progress leaves nothing behind.
    The caller's global torch RNG is left as it was. Folds run in ``cfg.workers`` processes (:mod:`mmil.parallel`);
    ``only_folds`` runs those alone and returns them without a summary (``mmil bench --workers``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MMILInputError(f"{out_dir}: exists and is not a directory; choose another --out")
    dataset.require_labels("training")
    if repeats < 1:
        raise MMILInputError(f"--repeats must be >= 1, got {repeats}")
    kwargs = _check_model(dataset, model_name, model_kwargs)
    dataset = dataset.with_centering(resolve_centering(cfg, dataset))  # every fold's train, validation and test bags
    plan = _plan(dataset, cfg, folds, seed, use_splits, splits_dir)
    if experiment is None:
        experiment = ExperimentConfig(model=model_name, model_kwargs=dict(kwargs), train=cfg, folds=max(folds, 2), repeats=repeats, seed=seed, use_splits=use_splits,
                                      splits_dir=None if splits_dir is None else str(splits_dir))
    plan_json = _fold_plan_json(plan, dataset.slide_ids)
    fresh = overwrite or not has_progress(out_dir)
    if not fresh:
        _check_same_run(out_dir, plan_json, experiment)
    if validate_data:
        dataset.validate(progress=cfg.progress)
    created = _start_run_directory(out_dir, experiment, plan_json, overwrite, clean=only_folds is None)
    header = {"model": model_name, "model_kwargs": kwargs, "n_bags": len(dataset), "n_classes": dataset.n_classes,
              "class_names": dataset.class_names, "repeats": repeats, "seed": seed, "split": _split_name(plan, dataset, use_splits, splits_dir)}
    outcomes = _run_folds([fs for fs in plan if only_folds is None or fs.fold in only_folds], dataset, model_name, kwargs, cfg,
                          out_dir, repeats, seed, clear_on_failure=fresh, created=created)
    if outcomes is None or only_folds is not None:  # a rank that does not write, or a share of the folds
        return CrossValResult(outcomes or [], {}, out_dir)
    return CrossValResult(outcomes, _write_summary(outcomes, header, dataset, model_name, out_dir), out_dir)


def _write_summary(outcomes: list[FoldOutcome], header: dict[str, Any], dataset: BagDataset, model_name: str, out_dir: Path) -> dict[str, Any]:
    """``metrics.json``, ``roc.png`` and ``reliability.png`` of the finished folds; returns the summary."""
    summary = to_builtin(summarize(outcomes, header))
    plot_roc([o.y_true for o in outcomes], [o.probs for o in outcomes], out_dir / "roc.png", class_names=dataset.class_names, title=f"{model_name}: ROC, repeat-averaged test probabilities")
    plot_run_reliability(outcomes, out_dir / "reliability.png", title=f"{model_name}: reliability, out-of-fold test slides")
    write_json(out_dir / "metrics.json", summary)
    return summary


def _run_folds(plan: list[FoldSplit], dataset: BagDataset, model_name: str, kwargs: dict[str, Any], cfg: TrainConfig, out_dir: Path,
               repeats: int, seed: int, *, clear_on_failure: bool, created: bool) -> list[FoldOutcome] | None:
    """The folds' outcomes, in ``cfg.workers`` processes (``None`` on a torchrun rank that does not write);
    a failure that left nothing worth resuming removes what the run wrote."""
    wcfg = dataclasses.replace(cfg, progress=False) if cfg.workers > 1 else cfg  # workers print one line per epoch instead
    tasks = [(dataset, fs, model_name, kwargs, wcfg, out_dir / f"fold_{fs.fold}", repeats, seed) for fs in plan]
    try:
        return run_folds(_run_fold, tasks, cfg.workers, labels=[f"{model_name} fold {fs.fold}" for fs in plan],
                         pending=[not (out_dir / f"fold_{fs.fold}" / RESULT_NAME).is_file() for fs in plan])
    except BaseException:
        if clear_on_failure and not has_progress(out_dir):  # nothing worth resuming: leave the directory as it was
            clear_run_directory(out_dir, remove_dir=created)
        raise


def _run_fold(dataset: BagDataset, fs: FoldSplit, model_name: str, kwargs: dict[str, Any], cfg: TrainConfig, fold_dir: Path, repeats: int, seed: int,
              callback=None) -> FoldOutcome | None:
    test = dataset.subset(fs.test)
    result_path = fold_dir / RESULT_NAME
    if result_path.is_file():
        return _load_outcome(result_path, fold_dir)
    trained = train_fold(dataset.subset(fs.train), dataset.subset(fs.val), model_name, kwargs, cfg, fold_dir, extra={"fold": fs.fold},
                         **({} if callback is None else {"callback": callback}))  # workers' epoch lines
    if cfg.workers == 1 and not ddp.is_writer():  # data-parallel under torchrun: rank 0 evaluates and writes
        return None
    with private_rng():  # building the model draws from the global RNG before the weights are loaded
        model, _ = load_checkpoint(trained.checkpoint_dir, map_location=resolve_device(cfg.device))
    if trained.standardization is not None:
        test = test.with_standardization(*trained.standardization)
    probs_r = predict_probs(model, test, seed=seed, repeats=repeats, device=cfg.device, precision=cfg.precision, progress=False)
    metrics = repeated_metrics(test.labels, probs_r)
    cal = dataset.subset(fs.calibration)  # the calibration split, else the validation slides
    cal = cal if trained.standardization is None else cal.with_standardization(*trained.standardization)
    metrics["calibration"] = calibrate_fold(model, cal, trained.checkpoint_dir, test.labels, probs_r, seed=seed, repeats=repeats,
                                            device=cfg.device, precision=cfg.precision, prior_std=cfg.temperature_prior)
    probs = probs_r.mean(0)
    outcome = FoldOutcome(
        # rounded as stored, so a resumed run sums the same per-fold values into the total
        fs.fold, metrics, round(trained.train_seconds, 3), test.slide_ids, test.labels, probs, trained.checkpoint_dir,
        len(fs.train), len(fs.val), len(fs.test), trained.best_epoch, trained.epochs_run, trained.stopped_early,
    )
    write_text(fold_dir / "predictions.csv", predictions_csv(test.slide_ids, probs, test.labels, class_names=dataset.class_names, case_ids=test.case_ids))
    if test.case_ids is not None:  # mean of each patient's slide probabilities
        write_text(fold_dir / "patient_predictions.csv", patient_predictions_csv(test.case_ids, probs, test.labels, class_names=dataset.class_names))
    record = to_builtin(outcome.summary() | {"metrics": metrics, "slide_ids": test.slide_ids, "y_true": test.labels.tolist(), "probs": probs.tolist(), "probs_repeats": probs_r.tolist()})
    write_json(result_path, record)
    (fold_dir / LAST_STATE_NAME).unlink(missing_ok=True)  # the fold is done; its resume state is dead weight
    return outcome


def _load_outcome(path: Path, fold_dir: Path) -> FoldOutcome:
    try:
        r = json.loads(path.read_text())
        metrics = nan_from_null(r["metrics"])
        return FoldOutcome(
            int(r["fold"]), metrics, float(r["train_seconds"]), list(r["slide_ids"]), np.asarray(r["y_true"], dtype=np.int64),
            np.asarray(r["probs"], dtype=np.float64), fold_dir / "checkpoint", int(r["n_train"]), int(r["n_val"]), int(r["n_test"]),
            int(r["best_epoch"]), int(r["epochs_run"]), bool(r["stopped_early"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MMILInputError(f"{path}: unreadable fold result ({err}); delete it to re-evaluate this fold") from None
