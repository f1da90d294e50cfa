"""``mmil bench``: several MIL models through the same cross-validation, one table.

Every model is trained and evaluated by :func:`mmil.crossval.cross_validate` with
the same folds, seeds, optimiser recipe and early stopping (there is no second
training loop here). On top of the fold metrics the bench measures cost
(:mod:`mmil.bench_cost`):

* per fold, the inference time per test bag (model forward only, bags already in
  memory; the mean over the fold's test bags) and the peak memory of one forward
  pass over the fold's largest test bag;
* per model, inference time and peak memory against bag size ``N`` (default
  1k, 10k, 50k, 100k instances of random features of the data's dimension).

Layout of ``DIR``: ``results.csv``, ``summary.md``, ``roc.png``, ``metrics.png``,
``cost.csv``, ``cost.png`` (:mod:`mmil.bench_report`), ``bench_config.json`` and
``runs/<model>/`` (the cross-validation directory of each model plus ``bench.json``
and ``cost.json``, which make a rerun skip finished work). Every file is written
atomically; ``bench_config.json`` last, with the reports it describes. When a rerun
may reuse the directory, and how ``--overwrite`` clears it, is in :mod:`mmil.bench_dir`.
The settings are :class:`mmil.bench_config.BenchConfig`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mmpl.jsonio import nan_from_null, write_json, write_text
from mmpl.progress import progress_bar

from . import bench_dir
from .bench_config import DEFAULT_COST_SIZES, DEFAULT_MODELS, BenchConfig, parse_model_list, parse_size  # noqa: F401 - re-exported
from .bench_cost import (  # noqa: F401 - re-exported
    count_parameters,
    cpu_peak_memory_bytes,
    fold_inference_cost,
    measure_cost,
    peak_memory_bytes,
    peak_of_running_sum,
    synthetic_cost_bag,
    timed_ms,
)
from .bench_dir import (  # noqa: F401 - the state records of runs/<model>/ (re-exported)
    STATE_VERSION,
    cost_fingerprint,
    dataset_fingerprint,
    expected_fingerprints,
    model_fingerprint,
    read_state as _read_state,
    train_fingerprint as _train_fingerprint,
)
from .bench_report import (  # noqa: F401 - re-exported
    CALIBRATION_COLUMNS,
    COST_COLUMNS,
    METRICS,
    RESULT_COLUMNS,
    TIMING_COLUMNS,
    ModelBench,
    cost_csv_text,
    mean_std,
    plot_cost,
    plot_metric_bars,
    plot_roc,
    read_results_csv,
    results_csv_text,
    summarize,
    summary_markdown,
)
from .bench_stats import kept_epochs, model_statistics, stats_csv_text, stats_markdown
from .errors import MMILInputError
from .evaluate import resolve_device
from .models import create_model
from .parallel import run_tasks
from .rng import private_rng


# ----------------------------------------------------------------------------- one model
def _fold_rows(dataset, name: str, cfg: BenchConfig, result, params: int) -> tuple[list[dict[str, Any]], list[int], list[list[float]]]:
    """Per fold of a finished cross-validation: the metrics and inference cost, and the out-of-fold predictions."""
    device = resolve_device(cfg.train.device)
    index = {sid: i for i, sid in enumerate(dataset.slide_ids)}
    rows, y_true, probs = [], [], []
    for fold in result.folds:
        test = dataset.subset([index[s] for s in fold.slide_ids])
        ms, peak = fold_inference_cost(Path(fold.checkpoint_dir), test, device=device, seed=cfg.seed, precision=cfg.train.precision)
        row = {"model": name, "fold": int(fold.fold)}
        row.update({m: float(fold.metrics[m]) for m in METRICS})
        row.update({"train_seconds": float(fold.train_seconds), "inference_ms_per_bag": ms, "peak_memory_mb": peak, "params": params})
        row.update({c: float((fold.metrics.get("calibration") or {}).get(c, np.nan)) for c in CALIBRATION_COLUMNS})
        row["best_epoch"] = int(fold.best_epoch)  # the kept epoch (not a results.csv column; summary.md lists it)
        rows.append(row)
        y_true.extend(int(y) for y in np.asarray(fold.y_true))
        probs.extend(np.asarray(fold.probs, dtype=np.float64).tolist())
    return rows, y_true, probs


def bench_model(dataset, name: str, cfg: BenchConfig, out_dir: Path, data_fp: dict[str, Any]) -> ModelBench:
    """Cross-validate one model (or load its finished result) and measure its inference cost."""
    from .crossval import cross_validate

    run_dir = out_dir / "runs" / name
    state_path = run_dir / "bench.json"
    fingerprint = model_fingerprint(name, cfg, data_fp)
    state = _read_state(state_path, fingerprint)
    if state is None:
        kwargs = cfg.model_kwargs.get(name, {})
        result = cross_validate(dataset, name, kwargs, cfg.train, run_dir, folds=cfg.folds, repeats=cfg.repeats, seed=cfg.seed,
                                use_splits=cfg.use_splits, validate_data=False)  # run_bench read every bag once already
        with private_rng():
            params = count_parameters(create_model(name, in_dim=dataset.in_dim, n_classes=dataset.n_classes, **kwargs))
        rows, y_true, probs = _fold_rows(dataset, name, cfg, result, params)
        state = {"fingerprint": fingerprint, "rows": rows, "y_true": y_true, "probs": probs, "params": params}
        write_json(state_path, state)  # NaN (an undefined AUC) is written as null
    return ModelBench(name, nan_from_null(state["rows"]), state["y_true"], state["probs"], int(state["params"]))


def bench_cost(name: str, cfg: BenchConfig, in_dim: int, n_classes: int, out_dir: Path) -> list[dict[str, Any]]:
    """The cost table rows of one model (measured once, then read from ``cost.json``)."""
    if not cfg.cost_sizes:
        return []
    device = resolve_device(cfg.train.device)
    fingerprint = cost_fingerprint(name, cfg, in_dim, n_classes, device)
    path = out_dir / "runs" / name / "cost.json"
    state = _read_state(path, fingerprint)
    if state is None:
        rows = measure_cost(name, cfg.model_kwargs.get(name, {}), in_dim, n_classes, cfg.cost_sizes, device=device,
                            seed=cfg.seed, repeats=cfg.cost_repeats, budget_s=cfg.cost_budget_s, precision=cfg.train.precision)
        state = {"fingerprint": fingerprint, "rows": rows}
        write_json(path, state)
    return nan_from_null(state["rows"])



def _train_fold_task(dataset, name: str, kwargs: dict[str, Any], train, run_dir: Path, cfg: BenchConfig, fold: int, callback=None) -> None:
    """One (model, fold) of ``--workers K``: :func:`mmil.crossval.cross_validate` of that fold alone."""
    from .crossval import cross_validate

    cross_validate(dataset, name, kwargs, train, run_dir, folds=cfg.folds, repeats=cfg.repeats, seed=cfg.seed,
                   use_splits=cfg.use_splits, validate_data=False, only_folds=[fold])


def train_in_workers(dataset, cfg: BenchConfig, out_dir: Path, data_fp: dict[str, Any], log: Callable[[str], None]) -> None:
    """``--workers K``: every fold of every unfinished model trained in ``K`` processes (:mod:`mmil.parallel`),
    handed out model by model in table order (fold by fold); the sequential pass of :func:`run_bench` then reads them back, evaluates
    and measures cost alone (timings are not taken while other folds train)."""
    from .crossval import _plan

    todo = [m for m in cfg.models if _read_state(out_dir / "runs" / m / "bench.json", model_fingerprint(m, cfg, data_fp)) is None]
    folds = [fs.fold for fs in _plan(dataset, cfg.train, cfg.folds, cfg.seed, cfg.use_splits)]
    train = dataclasses.replace(cfg.train, workers=1, progress=False)
    tasks = [(dataset, m, cfg.model_kwargs.get(m, {}), train, out_dir / "runs" / m, cfg, k) for m in todo for k in folds]
    log(f"training {len(todo)} model(s) x {len(folds)} fold(s) in {cfg.train.workers} worker processes")
    run_tasks(_train_fold_task, tasks, cfg.train.workers, labels=[f"{t[1]} fold {t[-1]}" for t in tasks])


# ----------------------------------------------------------------------------- the bench
@dataclass
class BenchResult:
    benches: list[ModelBench]
    summary: list[dict[str, Any]]
    cost: list[dict[str, Any]]
    out_dir: Path


def prepare_bench_directory(dataset, cfg: BenchConfig, out_dir: Path, *, overwrite: bool = False, progress: bool = False) -> tuple[dict[str, Any], bool]:
    """Every check that can refuse the run, then the directory made ready; returns ``(data fingerprint, created)``.

    Nothing is written until the settings match the work already in ``out_dir`` (or
    ``overwrite`` found only the bench's own files there) and every bag has been read once.
    """
    cfg.check()
    dataset.require_labels("benchmarking")
    if len(dataset) < cfg.folds:
        raise MMILInputError(f"{dataset.source}: {len(dataset)} bags cannot be split into {cfg.folds} folds; lower --folds")
    device = resolve_device(cfg.train.device)
    data_fp = dataset_fingerprint(dataset)
    if overwrite:
        bench_dir.check_clearable(out_dir)
    else:
        record = bench_dir.settings_record(cfg.to_dict(), data_fp, dataset.source)
        bench_dir.check_resumable(out_dir, record, {m: expected_fingerprints(m, cfg, data_fp, device) for m in cfg.models})
    dataset.validate(progress=progress)
    if overwrite:
        bench_dir.clear_bench_directory(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_dir.remove_stale_temps(out_dir)  # left by a killed run
    return data_fp, created


def run_bench(dataset, cfg: BenchConfig, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] | None = None,
              overwrite: bool = False) -> BenchResult:
    """Cross-validate every model of ``cfg`` on ``dataset`` and write the reports to ``out_dir``.

    Finished models (``runs/<model>/bench.json``) and cost tables are reused on a
    rerun with the same settings; settings that differ are refused before anything
    is written, naming them (``overwrite`` starts the directory afresh instead).
    ``bench_config.json`` is written with the reports, at the end.
    """
    out_dir = Path(out_dir)
    log = log or (lambda msg: None)
    data_fp, created = prepare_bench_directory(dataset, cfg, out_dir, overwrite=overwrite, progress=progress)
    benches, cost = [], []
    bar = progress_bar(progress, len(cfg.models), "bench")
    try:
        if cfg.train.workers > 1:
            train_in_workers(dataset, cfg, out_dir, data_fp, log)
        for name in cfg.models:
            if bar is not None:
                bar.set_postfix_str(name)
            log(f"{name}: cross-validating ({cfg.folds} folds)")
            b = bench_model(dataset, name, cfg, out_dir, data_fp)
            log(f"{name}: mean AUC {mean_std([r['auc'] for r in b.rows])[0]:.4f}; measuring cost")
            b.cost = bench_cost(name, cfg, dataset.in_dim, dataset.n_classes, out_dir)
            benches.append(b)
            cost.extend(b.cost)
            if bar is not None:
                bar.update(1)
    except BaseException:
        bench_dir.discard_if_empty(out_dir, created)
        raise
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(benches)
    _write_reports(dataset, cfg, out_dir, benches, summary, cost, data_fp)
    return BenchResult(benches, summary, cost, out_dir)


def _write_reports(dataset, cfg: BenchConfig, out_dir: Path, benches, summary, cost, data_fp: dict[str, Any]) -> None:
    header = {
        "data": f"{dataset.source} ({len(dataset)} bags, {dataset.n_classes} classes, {dataset.in_dim}-d features)",
        "folds": cfg.folds,
        "evaluation repeats per fold": cfg.repeats,
        "seed": cfg.seed,
        "training": ", ".join(f"{k}={v}" for k, v in _train_fingerprint(cfg.train).items()),
        "model options": json.dumps({m: cfg.model_kwargs.get(m, {}) for m in cfg.models}),
        "torch": torch.__version__,
    }
    write_text(out_dir / "results.csv", results_csv_text(benches))
    write_text(out_dir / "cost.csv", cost_csv_text(cost))
    stats = model_statistics(benches, seed=cfg.seed)
    write_text(out_dir / "stats.csv", stats_csv_text(stats))
    write_text(out_dir / "summary.md", summary_markdown(summary, cost, header) + "\n" + stats_markdown(stats, kept_epochs(benches)))
    plot_roc(benches, out_dir / "roc.png")
    plot_metric_bars(summary, out_dir / "metrics.png")
    if cost:
        plot_cost(cost, out_dir / "cost.png")
    else:
        (out_dir / "cost.png").unlink(missing_ok=True)  # an earlier run's plot would describe another table
    # Last: the settings of the results just written (a failed or refused run leaves the pair as it was).
    write_json(out_dir / bench_dir.CONFIG_NAME, bench_dir.settings_record(cfg.to_dict(), data_fp, dataset.source))
