"""``mmil bench``: several MIL models through the same cross-validation, one table.

Every model is trained and evaluated by :func:`mmil.crossval.cross_validate` with
the same folds, seeds, optimiser recipe and early stopping (there is no second
training loop here). On top of the fold metrics the bench measures cost:

* per fold, the inference time per test bag (model forward only, bags already in
  memory; the mean over the fold's test bags) and the peak memory of one forward
  pass over the fold's largest test bag;
* per model, inference time and peak memory against bag size ``N`` (default
  1k, 10k, 50k, 100k instances of random features of the data's dimension).

Peak memory is the largest amount of tensor memory allocated *during* one
``no_grad`` forward pass, above what was allocated before it (weights and the
input bag are not counted). On CUDA it is ``torch.cuda.max_memory_allocated``
after a reset; on the CPU every allocation and free made by PyTorch's CPU
allocator during the pass is recorded by ``torch.profiler`` (``profile_memory``)
and the peak of the running sum is taken (:func:`peak_of_running_sum`). Memory
allocated outside PyTorch's allocator (e.g. by a BLAS library's own workspace)
is not seen on the CPU.

Layout of ``DIR``: ``results.csv``, ``summary.md``, ``roc.png``, ``metrics.png``,
``cost.csv``, ``cost.png``, ``bench_config.json`` and ``runs/<model>/`` (the
cross-validation directory of each model plus ``bench.json`` and ``cost.json``,
which make a rerun skip finished work). Every file is written atomically;
``bench_config.json`` last, with the reports it describes. When a rerun may reuse
the directory, and how ``--overwrite`` clears it, is in :mod:`mmil.bench_dir`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import bench_dir
from .bench_dir import (  # noqa: F401 - the state records of runs/<model>/ (re-exported)
    STATE_VERSION,
    cost_fingerprint,
    dataset_fingerprint,
    expected_fingerprints,
    model_fingerprint,
    read_state as _read_state,
    train_fingerprint as _train_fingerprint,
)
from .config import TrainConfig, read_yaml_mapping
from .errors import MMILInputError
from .io import atomic_path, write_json, write_text
from .models import create_model, list_models

#: The models of issue 5, in the order tables list them (filtered by the registry).
DEFAULT_MODELS = ("mmil", "mean", "max", "abmil", "abmil-gated", "transmil", "dsmil", "clam-sb")
DEFAULT_COST_SIZES = (1_000, 10_000, 50_000, 100_000)
METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")
RESULT_COLUMNS = ("model", "fold", *METRICS, "train_seconds", "inference_ms_per_bag", "peak_memory_mb", "params")
#: Columns that measure the machine rather than the model (they change between runs).
TIMING_COLUMNS = ("train_seconds", "inference_ms_per_bag", "peak_memory_mb")
COST_COLUMNS = ("model", "n_instances", "inference_ms", "peak_memory_mb", "device", "status")


# ----------------------------------------------------------------------------- config
@dataclass
class BenchConfig:
    """Settings of one bench run (YAML keys are the field names).

    Attributes:
        models: registry names to compare, in table order.
        model_kwargs: per-model constructor options, ``{name: {option: value}}``.
        train: the training recipe shared by every model.
        folds: k of the stratified k-fold (ignored with fixed splits).
        repeats: stochastic evaluations of each test fold (seeds ``seed..seed+R-1``).
        seed: seeds folds, weights and evaluation (the same for every model).
        use_splits: use split columns of the label CSV when present.
        cost_sizes: bag sizes ``N`` of the cost table (empty = no cost table).
        cost_repeats: timed forward passes per size (the median is reported).
        cost_budget_s: once one forward pass of a model takes longer than this,
            its larger sizes are skipped (recorded with status ``over budget``).
    """

    models: list[str] = field(default_factory=list)
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = 5
    repeats: int = 1
    seed: int = 0
    use_splits: bool = True
    cost_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_COST_SIZES))
    cost_repeats: int = 3
    cost_budget_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [m for m in DEFAULT_MODELS if m in list_models()] or list_models()
        self.check()

    def check(self) -> None:
        """Raise :class:`MMILInputError` for unknown models or values of the wrong type or out of range."""
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise MMILInputError(f"models must be a list of model names (--models), got {self.models!r}")
        known = list_models()
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise MMILInputError(f"unknown model(s) {', '.join(map(repr, unknown))} in --models; choose from: {', '.join(known)}")
        if len(set(self.models)) != len(self.models):
            raise MMILInputError(f"--models lists a model twice: {', '.join(self.models)}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(v, dict) for v in self.model_kwargs.values()):
            raise MMILInputError("model_kwargs must map model names to mappings of options, e.g. {abmil: {embed_dim: 256}}")
        stray = [m for m in self.model_kwargs if m not in known]
        if stray:
            raise MMILInputError(f"model_kwargs names unknown model(s) {', '.join(map(repr, stray))}; choose from: {', '.join(known)}")
        if not isinstance(self.train, TrainConfig):
            raise MMILInputError(f"train must be a mapping of training options, got {self.train!r}")
        for name, low, option in (("folds", 2, "--folds"), ("repeats", 1, "--repeats"), ("seed", 0, "--seed"), ("cost_repeats", 1, "")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MMILInputError(f"{name} must be an integer >= {low}, got {value!r}" + (f" ({option})" if option else ""))
        if not isinstance(self.use_splits, bool):
            raise MMILInputError(f"use_splits must be true or false, got {self.use_splits!r}")
        if not isinstance(self.cost_sizes, (list, tuple)):
            raise MMILInputError(f"cost_sizes must be a list of bag sizes such as [1k, 10k] (--cost-sizes), got {self.cost_sizes!r}")
        self.cost_sizes = [parse_size(n) for n in self.cost_sizes]
        budget = self.cost_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise MMILInputError(f"cost_budget_s must be a number > 0, got {budget!r} (--cost-budget)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "BenchConfig":
        if not isinstance(data, dict):
            raise MMILInputError(f"{source}: the top level must be a mapping of options, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise MMILInputError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}")
        data = dict(data)
        train = data.pop("train", None) or {}
        if not isinstance(train, dict):
            raise MMILInputError(f"{source}: `train` must be a mapping, got {type(train).__name__}")
        models = data.pop("models", None) or []
        if isinstance(models, str):
            models = parse_model_list(models)
        try:
            train_cfg = TrainConfig.from_dict(train, f"{source} (train)")
        except MMILInputError as err:  # range errors name the key only: say where it is
            raise MMILInputError(str(err) if str(err).startswith(source) else f"{source}: train.{err}") from None
        try:
            return cls(train=train_cfg, models=models, **data)
        except TypeError as err:
            raise MMILInputError(f"{source}: {err}") from None
        except MMILInputError as err:
            raise MMILInputError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BenchConfig":
        return cls.from_dict(read_yaml_mapping(path), str(path))


def parse_size(value: str | int) -> int:
    """A bag size: ``2000``, ``"2000"``, ``"50k"`` (50 000), ``"0.1m"`` (100 000)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        t = str(value).strip().lower().replace("_", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
        try:
            n = int(round(float(t[:-1] if scale != 1 else t) * scale))
        except ValueError:
            raise MMILInputError(f"not a bag size: {value!r} (use e.g. 1000, 10k, 0.1m)") from None
    if n < 1:
        raise MMILInputError(f"bag sizes must be >= 1, got {value!r}")
    return n


def parse_model_list(text: str) -> list[str]:
    """``"abmil, dsmil"`` -> ``["abmil", "dsmil"]`` (``"all"`` = every registered model)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list_models()
    if not names:
        raise MMILInputError("--models is empty; give a comma-separated list such as abmil,dsmil")
    return names


# ----------------------------------------------------------------------------- measuring
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
            return model(x, None, coords=coords, groups=groups, seed=seed)

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
    torch.manual_seed(seed)
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


# ----------------------------------------------------------------------------- one model
@dataclass
class ModelBench:
    """Everything the reports need about one model."""

    model: str
    rows: list[dict[str, Any]]  # one per fold, RESULT_COLUMNS
    y_true: list[int]  # out-of-fold labels, fold after fold
    probs: list[list[float]]  # out-of-fold probabilities (mean over repeats)
    params: int
    cost: list[dict[str, Any]] = field(default_factory=list)


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _none_to_nan(v: Any) -> Any:
    return float("nan") if v is None else v


def bench_model(dataset, name: str, cfg: BenchConfig, out_dir: Path, data_fp: dict[str, Any]) -> ModelBench:
    """Cross-validate one model (or load its finished result) and measure its inference cost."""
    from .crossval import cross_validate
    from .evaluate import resolve_device

    run_dir = out_dir / "runs" / name
    state_path = run_dir / "bench.json"
    fingerprint = model_fingerprint(name, cfg, data_fp)
    state = _read_state(state_path, fingerprint)
    if state is None:
        kwargs = cfg.model_kwargs.get(name, {})
        result = cross_validate(dataset, name, kwargs, cfg.train, run_dir, folds=cfg.folds, repeats=cfg.repeats, seed=cfg.seed,
                                use_splits=cfg.use_splits, validate_data=False)  # run_bench read every bag once already
        device = resolve_device(cfg.train.device)
        params = count_parameters(create_model(name, in_dim=dataset.in_dim, n_classes=dataset.n_classes, **kwargs))
        index = {sid: i for i, sid in enumerate(dataset.slide_ids)}
        rows, y_true, probs = [], [], []
        for fold in result.folds:
            test = dataset.subset([index[s] for s in fold.slide_ids])
            ms, peak = fold_inference_cost(Path(fold.checkpoint_dir), test, device=device, seed=cfg.seed, precision=cfg.train.precision)
            row = {"model": name, "fold": int(fold.fold)}
            row.update({m: float(fold.metrics[m]) for m in METRICS})
            row.update({"train_seconds": float(fold.train_seconds), "inference_ms_per_bag": ms, "peak_memory_mb": peak, "params": params})
            rows.append(row)
            y_true.extend(int(y) for y in np.asarray(fold.y_true))
            probs.extend(np.asarray(fold.probs, dtype=np.float64).tolist())
        state = {
            "fingerprint": fingerprint,
            "rows": [{k: _nan_to_none(v) for k, v in r.items()} for r in rows],
            "y_true": y_true,
            "probs": probs,
            "params": params,
        }
        write_json(state_path, state)
    rows = [{k: _none_to_nan(v) for k, v in r.items()} for r in state["rows"]]
    return ModelBench(name, rows, state["y_true"], state["probs"], int(state["params"]))


def bench_cost(name: str, cfg: BenchConfig, in_dim: int, n_classes: int, out_dir: Path) -> list[dict[str, Any]]:
    """The cost table rows of one model (measured once, then read from ``cost.json``)."""
    from .evaluate import resolve_device

    if not cfg.cost_sizes:
        return []
    device = resolve_device(cfg.train.device)
    fingerprint = cost_fingerprint(name, cfg, in_dim, n_classes, device)
    path = out_dir / "runs" / name / "cost.json"
    state = _read_state(path, fingerprint)
    if state is None:
        rows = measure_cost(name, cfg.model_kwargs.get(name, {}), in_dim, n_classes, cfg.cost_sizes, device=device,
                            seed=cfg.seed, repeats=cfg.cost_repeats, budget_s=cfg.cost_budget_s, precision=cfg.train.precision)
        state = {"fingerprint": fingerprint, "rows": [{k: _nan_to_none(v) for k, v in r.items()} for r in rows]}
        write_json(path, state)
    return [{k: _none_to_nan(v) for k, v in r.items()} for r in state["rows"]]


# ----------------------------------------------------------------------------- reports
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(benches: Sequence[ModelBench]) -> list[dict[str, Any]]:
    """Mean and std over folds of every column per model, ranked by mean AUC
    (ties broken by mean balanced accuracy, then by the model's table order)."""
    out = []
    for order, b in enumerate(benches):
        s: dict[str, Any] = {"model": b.model, "params": b.params, "folds": len(b.rows), "order": order}
        for col in (*METRICS, *TIMING_COLUMNS):
            s[col], s[f"{col}_std"] = mean_std([r[col] for r in b.rows])
        out.append(s)

    def key(s):
        auc = s["auc"] if math.isfinite(s["auc"]) else -1.0
        bal = s["balanced_accuracy"] if math.isfinite(s["balanced_accuracy"]) else -1.0
        return (-auc, -bal, s["order"])

    for rank, s in enumerate(sorted(out, key=key), start=1):
        s["rank"] = rank
    return sorted(out, key=lambda s: s["rank"])


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def results_csv_text(benches: Sequence[ModelBench]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_COLUMNS)
    for b in benches:
        for r in b.rows:
            w.writerow([_fmt(r[c], 3) if c in TIMING_COLUMNS else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in RESULT_COLUMNS])
    return buf.getvalue()


def cost_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COST_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c], 3) if isinstance(r[c], float) else r[c] for c in COST_COLUMNS])
    return buf.getvalue()


def summary_markdown(summary: Sequence[dict[str, Any]], cost: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """The ``summary.md`` text: settings, ranked metric table, cost table."""
    lines = ["# mmil bench", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## Cross-validated results (mean ± std over folds)", ""]
    lines.append("| rank | model | AUC | accuracy | balanced accuracy | macro F1 | train s/fold | inference ms/bag | peak MB (largest test bag) | params |")
    lines.append("|---:|---|---|---|---|---|---:|---:|---:|---:|")
    for s in summary:
        pm = lambda c, d=3: f"{_fmt(s[c], d)} ± {_fmt(s[c + '_std'], d)}"  # noqa: E731
        lines.append(
            f"| {s['rank']} | {s['model']} | {pm('auc')} | {pm('accuracy')} | {pm('balanced_accuracy')} | {pm('f1')} | "
            f"{_fmt(s['train_seconds'], 1)} | {_fmt(s['inference_ms_per_bag'], 2)} | {_fmt(s['peak_memory_mb'], 1)} | {s['params']:,} |"
        )
    lines += ["", "Ranked by mean AUC (ties: balanced accuracy). Std is the sample standard deviation over folds.", ""]
    if cost:
        sizes = sorted({int(r["n_instances"]) for r in cost})
        models = list(dict.fromkeys(r["model"] for r in cost))
        table = {(r["model"], int(r["n_instances"])): r for r in cost}
        lines += [f"## Inference cost against bag size (device: {cost[0]['device']}; one bag, no_grad)", ""]
        lines.append("| model | " + " | ".join(f"N={n:,} ms / MB" for n in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        for m in models:
            cells = []
            for n in sizes:
                r = table.get((m, n))
                cells.append("–" if r is None or r["status"] != "ok" else f"{_fmt(r['inference_ms'], 1)} / {_fmt(r['peak_memory_mb'], 1)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "– = not measured (over the time budget, or failed; see cost.csv).", ""]
    lines += ["Files: results.csv (per fold), cost.csv, roc.png, metrics.png, cost.png, runs/<model>/ (cross-validation outputs).", ""]
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def roc_points(y_true: Sequence[int], probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve of pooled out-of-fold predictions: binary on ``probs[:, 1]``;
    multi-class micro-averaged one-vs-rest. Returns ``(fpr, tpr, auc)``."""
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(y_true)
    p = np.asarray(probs)
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:
        onehot = np.eye(p.shape[1])[y]
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr, float(auc(fpr, tpr))


def plot_roc(benches: Sequence[ModelBench], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for b in benches:
        if len(set(b.y_true)) < 2:
            continue
        fpr, tpr, auc = roc_points(b.y_true, np.asarray(b.probs))
        ax.plot(fpr, tpr, label=f"{b.model} (pooled AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC of out-of-fold predictions")
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


def plot_metric_bars(summary: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 1.3 * len(summary) + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(METRICS)
    x = np.arange(len(summary))
    for j, m in enumerate(METRICS):
        ax.bar(x + (j - (len(METRICS) - 1) / 2) * width, [s[m] for s in summary], width, yerr=[s[f"{m}_std"] for s in summary], capsize=2, label=m)
    ax.set_xticks(x, [s["model"] for s in summary], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over folds (± std)")
    ax.legend(fontsize=8, ncol=len(METRICS), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _save_figure(fig, path)


def plot_cost(cost: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for m in dict.fromkeys(r["model"] for r in cost):
        pts = [r for r in cost if r["model"] == m and r["status"] == "ok"]
        if not pts:
            continue
        n = [r["n_instances"] for r in pts]
        axes[0].plot(n, [r["inference_ms"] for r in pts], marker="o", label=m)
        axes[1].plot(n, [max(r["peak_memory_mb"], 1e-3) for r in pts], marker="o", label=m)
    for ax, label in zip(axes, ("inference time per bag (ms)", "peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("instances per bag N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    _save_figure(fig, path)


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
    from .evaluate import resolve_device

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
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    log = log or (lambda msg: None)
    data_fp, created = prepare_bench_directory(dataset, cfg, out_dir, overwrite=overwrite, progress=progress)
    benches, cost = [], []
    try:
        bar = tqdm(cfg.models, desc="bench", disable=not (progress and sys.stderr.isatty()))
        for name in bar:
            bar.set_postfix_str(name)
            log(f"{name}: cross-validating ({cfg.folds} folds)")
            b = bench_model(dataset, name, cfg, out_dir, data_fp)
            log(f"{name}: mean AUC {mean_std([r['auc'] for r in b.rows])[0]:.4f}; measuring cost")
            b.cost = bench_cost(name, cfg, dataset.in_dim, dataset.n_classes, out_dir)
            benches.append(b)
            cost.extend(b.cost)
    except BaseException:
        bench_dir.discard_if_empty(out_dir, created)
        raise
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
    write_text(out_dir / "summary.md", summary_markdown(summary, cost, header))
    plot_roc(benches, out_dir / "roc.png")
    plot_metric_bars(summary, out_dir / "metrics.png")
    if cost:
        plot_cost(cost, out_dir / "cost.png")
    else:
        (out_dir / "cost.png").unlink(missing_ok=True)  # an earlier run's plot would describe another table
    # Last: the settings of the results just written (a failed or refused run leaves the pair as it was).
    write_json(out_dir / bench_dir.CONFIG_NAME, bench_dir.settings_record(cfg.to_dict(), data_fp, dataset.source))


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``results.csv`` (strings), for tests and downstream scripts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
