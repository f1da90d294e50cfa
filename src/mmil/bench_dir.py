"""The run directory of ``mmil bench``: what it holds, when a rerun may resume it, starting it afresh.

``DIR/bench_config.json`` describes the settings and data of ``DIR/results.csv``: both are
written together at the end of a run, so a run that fails or is refused leaves the pair as
it was. Finished and started work lives in ``DIR/runs/<model>/`` (``bench.json``,
``cost.json`` and the cross-validation files); each records the settings it was made with.

A rerun resumes the directory only when every record it would reuse agrees with the given
settings; otherwise it is refused before anything is written, naming each differing
setting as ``key: stored -> given``. ``--overwrite`` deletes what the bench wrote (and
refuses when the directory holds anything else) and starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from mmpl.config import differences
from mmpl.fsio import TEMP_SUFFIX, remove_stale_temp_files

from .config import with_legacy_fingerprint, with_legacy_train_values
from .errors import MMILInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .bench import BenchConfig
    from .config import TrainConfig

STATE_VERSION = 1

CONFIG_NAME = "bench_config.json"
#: Files ``mmil bench`` writes at the top of its directory.
BENCH_FILES = ("results.csv", "summary.md", "stats.csv", "roc.png", "metrics.png", "cost.csv", "cost.png", CONFIG_NAME)
RUNS = "runs"
#: Files in ``runs/<model>/``: the bench's own state and the cross-validation's files (besides ``fold_*/``).
MODEL_FILES = ("bench.json", "cost.json", "config.yaml", "config.json", "folds.json", "metrics.json", "roc.png", "reliability.png")
#: Training options that do not change results (never compared).
RUNTIME_TRAIN_KEYS = ("progress", "num_workers", "workers", "log_every", "tensorboard")
HINT = "rerun with the stored settings, choose a fresh --out directory, or pass --overwrite to start it afresh"


# ----------------------------------------------------------------------------- comparing settings
def _refusal(out_dir: Path, what: str, diffs: list[str]) -> MMILInputError:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return MMILInputError(f"--out {out_dir}: {what} other settings (stored -> given: {shown}); {HINT}")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; ``None`` when absent or unreadable (a torn or foreign file is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def settings_record(config: Mapping[str, Any], data_fp: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What ``bench_config.json`` holds: the bench settings and the data they ran on."""
    return {"config": dict(config), "data": {"source": source, **data_fp}}


def _comparable(record: Mapping[str, Any], models: set[str]) -> dict[str, Any]:
    """The parts of a settings record that results depend on (``models`` picks the model options)."""
    config = record.get("config") or {}
    kwargs = config.get("model_kwargs") or {}
    return {
        "data": {k: v for k, v in (record.get("data") or {}).items() if k != "source"},
        "train": {k: v for k, v in with_legacy_train_values(config.get("train") or {}).items() if k not in RUNTIME_TRAIN_KEYS},
        **{k: config.get(k) for k in ("folds", "repeats", "seed", "use_splits")},
        "model_kwargs": {m: kwargs.get(m) or {} for m in sorted(models)},
    }


def state_differences(path: Path, fingerprint: Mapping[str, Any], prefix: str = "") -> list[str] | None:
    """Differences between the fingerprint stored in a state file and ``fingerprint``; ``None`` if there is none."""
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
        return None
    return differences(with_legacy_fingerprint(state["fingerprint"]), fingerprint, prefix)


def _run_has_progress(run_dir: Path) -> bool:
    """Whether a model's cross-validation directory holds a finished fold, a saved epoch or a checkpoint."""
    for fold in run_dir.glob("fold_*"):
        if any((fold / name).exists() for name in ("result.json", "last_state.safetensors", "checkpoint")):
            return True
    return False


def check_resumable(out_dir: Path, record: Mapping[str, Any], expected: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse, changing nothing, a rerun whose settings differ from those of the work in ``out_dir``.

    ``record``: the given :func:`settings_record`; ``expected``: per model, the fingerprints a
    rerun would accept in ``bench.json``, ``cost.json`` (absent: no cost table) and the
    cross-validation's ``config.json`` (compared on the keys given).
    """
    stored = _read_json(out_dir / CONFIG_NAME)
    if (out_dir / CONFIG_NAME).exists() and not isinstance(stored, dict):
        raise MMILInputError(f"--out {out_dir}: {out_dir / CONFIG_NAME} is not a bench settings file; choose a fresh --out directory or pass --overwrite")
    if stored and ((out_dir / "results.csv").is_file() or _runs_have_progress(out_dir)):
        common = set((stored.get("config") or {}).get("models") or []) & set(expected)
        diffs = differences(_comparable(stored, common), _comparable(record, common))
        if diffs:
            raise _refusal(out_dir, f"holds bench results ({CONFIG_NAME}) made with", diffs)
    for name, fingerprints in expected.items():
        run_dir = out_dir / RUNS / name
        for file, prefix in (("bench.json", ""), ("cost.json", "cost.")):
            if file in fingerprints:
                diffs = state_differences(run_dir / file, fingerprints[file], prefix)
                if diffs:
                    raise _refusal(out_dir, f"holds results of {name} ({RUNS}/{name}/{file}) made with", diffs)
        started = (run_dir / "config.json").is_file() and not (run_dir / "bench.json").is_file() and _run_has_progress(run_dir)
        if started:
            given = fingerprints["config.json"]
            run_cfg = _read_json(run_dir / "config.json")
            run_cfg = run_cfg if isinstance(run_cfg, dict) else {}
            stored_train = run_cfg.get("train") if isinstance(run_cfg.get("train"), dict) else {}
            run_cfg = {k: run_cfg.get(k) for k in given} | {"train": {t: v for t, v in stored_train.items() if t in given["train"]}}
            diffs = differences(run_cfg, given)
            if diffs:
                raise _refusal(out_dir, f"holds a started cross-validation of {name} ({RUNS}/{name}) made with", diffs)


# ----------------------------------------------------------------------------- state records
def dataset_fingerprint(dataset) -> dict[str, Any]:
    """What identifies the data of a bench (so a rerun on other data is refused)."""
    ids = "\n".join(dataset.slide_ids) + "\n" + ",".join(map(str, np.asarray(dataset.labels).tolist()))
    return {
        "n_bags": len(dataset),
        "in_dim": int(dataset.in_dim),
        "n_classes": int(dataset.n_classes),
        "class_names": list(dataset.class_names),
        "ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
    }


def train_fingerprint(cfg: "TrainConfig") -> dict[str, Any]:
    """The training recipe without the options that do not change results."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_TRAIN_KEYS}


def model_fingerprint(name: str, cfg: "BenchConfig", data: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "model": name,
        "model_kwargs": cfg.model_kwargs.get(name, {}),
        "train": train_fingerprint(cfg.train),
        "folds": cfg.folds,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "use_splits": cfg.use_splits,
        "data": data,
    }


def cost_fingerprint(name: str, cfg: "BenchConfig", in_dim: int, n_classes: int, device: "torch.device") -> dict[str, Any]:
    """What the cost table of one model depends on (so a rerun with other cost settings is refused)."""
    return {
        "version": STATE_VERSION,
        "model": name,
        "model_kwargs": cfg.model_kwargs.get(name, {}),
        "in_dim": in_dim,
        "n_classes": n_classes,
        "sizes": sorted(int(s) for s in cfg.cost_sizes),
        "device": str(device),
        "precision": cfg.train.precision,
        "repeats": cfg.cost_repeats,
        "budget_s": cfg.cost_budget_s,
        "seed": cfg.seed,
    }


def expected_fingerprints(name: str, cfg: "BenchConfig", data_fp: dict[str, Any], device: "torch.device") -> dict[str, dict[str, Any]]:
    """Per state file of ``runs/<name>/``, the fingerprint a rerun with ``cfg`` accepts (see :func:`check_resumable`)."""
    train = {k: v for k, v in train_fingerprint(cfg.train).items() if k != "device"}  # cross-validation ignores the device
    out = {
        "bench.json": model_fingerprint(name, cfg, data_fp),
        "config.json": {"model_kwargs": cfg.model_kwargs.get(name, {}), "train": train, "folds": max(cfg.folds, 2), "repeats": cfg.repeats, "seed": cfg.seed, "use_splits": cfg.use_splits},
    }
    if cfg.cost_sizes:
        out["cost.json"] = cost_fingerprint(name, cfg, data_fp["in_dim"], data_fp["n_classes"], device)
    return out


def read_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` if it was made with ``fingerprint``; ``None`` if absent or unreadable
    (a torn or foreign file: that model is redone, its fold checkpoints reused)."""
    diffs = state_differences(path, fingerprint)
    if diffs is None:
        return None
    if diffs:
        raise MMILInputError(f"{path}: made with other settings (stored -> given: {'; '.join(diffs[:6])}); {HINT}")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- starting afresh
def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file() and not path.is_symlink()


def foreign_entries(out_dir: Path) -> list[Path]:
    """What in ``out_dir`` the bench did not write (``--overwrite`` leaves the directory alone if any)."""
    if not out_dir.is_dir():
        return []
    foreign = []
    for entry in sorted(out_dir.iterdir()):
        if _is_temp(entry) or (entry.name in BENCH_FILES and entry.is_file() and not entry.is_symlink()):
            continue
        if entry.name == RUNS and entry.is_dir() and not entry.is_symlink():
            for run_dir in sorted(entry.iterdir()):
                if not run_dir.is_dir() or run_dir.is_symlink():
                    foreign.append(run_dir)
                    continue
                for item in sorted(run_dir.iterdir()):
                    own_file = item.name in MODEL_FILES and item.is_file()
                    own_fold = item.name.startswith("fold_") and item.is_dir()
                    if item.is_symlink() or not (own_file or own_fold or _is_temp(item)):
                        foreign.append(item)
            continue
        foreign.append(entry)
    return foreign


def check_clearable(out_dir: Path) -> None:
    """Refuse ``--overwrite`` of a directory holding files the bench did not write."""
    foreign = foreign_entries(out_dir)
    if foreign:
        names = ", ".join(str(p.relative_to(out_dir)) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise MMILInputError(f"--overwrite: {out_dir} holds files mmil bench did not write ({names}); move them away or choose a fresh --out directory")


def remove_stale_temps(out_dir: Path) -> None:
    """Delete the temporary files a killed run left at the top of ``out_dir`` and anywhere under ``runs/``
    (folders the bench did not make are left alone)."""
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if _is_temp(entry):
                entry.unlink()
    remove_stale_temp_files(out_dir / RUNS)


def clear_bench_directory(out_dir: Path) -> None:
    """Delete everything the bench wrote in ``out_dir`` (call :func:`check_clearable` first)."""
    if not out_dir.is_dir():
        return
    for name in BENCH_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / RUNS).is_dir():
        shutil.rmtree(out_dir / RUNS)
    remove_stale_temps(out_dir)


def _runs_have_progress(out_dir: Path) -> bool:
    runs = out_dir / RUNS
    if not runs.is_dir():
        return False
    return any((d / "bench.json").is_file() or (d / "cost.json").is_file() or _run_has_progress(d) for d in runs.iterdir() if d.is_dir())


def has_progress(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds anything worth keeping: reports, a finished model or started training."""
    return any((out_dir / name).exists() for name in BENCH_FILES) or _runs_have_progress(out_dir)


def discard_if_empty(out_dir: Path, created: bool) -> None:
    """After a failed run: remove the directories it created when nothing worth keeping is in them."""
    if not created or not out_dir.is_dir() or has_progress(out_dir):
        return
    for d in sorted((p for p in out_dir.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
