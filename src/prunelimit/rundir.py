"""The run directory: file layout, step bookkeeping, opening (or refusing) it, starting it afresh.

    DIR/config.yaml        the resolved RunConfig (reproduces the run)
    DIR/model.safetensors  trained weights       DIR/model.json  how to rebuild the model
    DIR/train.json, spectrum.json, prediction.json, actual.json, report.json + PNGs

Only these names are ever written (atomically, through hidden ``.NAME.*.tmp`` files that a
resumed run removes when a killed writer left them). ``--overwrite`` deletes exactly these files
and refuses a directory that holds anything else.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from mmpl.config import read_yaml_mapping
from mmpl.device import resolve_device
from mmpl.fsio import TEMP_SUFFIX, remove_stale_temp_files
from mmpl.jsonio import dumps, read_json, write_json, write_text

from . import distributed
from .config import RunConfig, coerce_options, step_settings
from .errors import PruneLimitError

STEPS = ("train", "spectrum", "predict", "prune", "report")
RESULT_FILES = {
    "train": "train.json",
    "spectrum": "spectrum.json",
    "predict": "prediction.json",
    "prune": "actual.json",
    "report": "report.json",
}
# Required inputs of each step, and optional ones used when present (prune evaluates the model
# at the predicted ratio when a prediction exists).
REQUIRES = {"train": (), "spectrum": ("train",), "predict": ("train", "spectrum"), "prune": ("train",),
            "report": ("train", "spectrum", "predict", "prune")}
OPTIONAL = {"prune": ("predict",)}
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
MODEL_INFO_FILE = "model.json"
PRUNED_MODEL_FILE = "model_pruned.safetensors"
PLOT_FILES = {"spectrum": "spectrum.png", "width": "gaussian_width.png", "accuracy": "accuracy_vs_ratio.png"}
# Every file the pipeline writes into a run directory (and so the only ones --overwrite deletes).
PIPELINE_FILES = frozenset({CONFIG_FILE, MODEL_FILE, MODEL_INFO_FILE, PRUNED_MODEL_FILE,
                            *RESULT_FILES.values(), *PLOT_FILES.values()})
FRESH_HINT = "add --overwrite to delete its results and start afresh (--force only redoes steps of the same run)"


class RunDirectory:
    """File layout and step bookkeeping of one run directory.

    ``path`` is what the user gave (used in messages); files live under ``root``, which is the
    target of ``path`` when it is a symlink, so writes go through the link and the link stays.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.root = Path(os.path.realpath(self.path)) if self.path.is_symlink() else self.path

    def file(self, name: str) -> Path:
        return self.root / name

    def result_path(self, step: str) -> Path:
        return self.root / RESULT_FILES[step]

    def read_result(self, step: str) -> dict | None:
        path = self.result_path(step)
        if not path.is_file():
            return None
        data = read_json(path, PruneLimitError)
        if not isinstance(data, dict) or "stamp" not in data:
            raise PruneLimitError(f"{path} is not a prunelimit result file; delete it or use another --out")
        return data

    def stamp(self, step: str) -> str | None:
        result = self.read_result(step)
        return None if result is None else result["stamp"]

    def current_inputs(self, step: str) -> dict[str, str]:
        """Stamps of the results ``step`` is computed from (required ones must exist)."""
        inputs = {}
        for up in REQUIRES[step]:
            stamp = self.stamp(up)
            if stamp is None:
                raise PruneLimitError(
                    f"{self.path} has no {RESULT_FILES[up]} yet: run `prunelimit {up} --out {self.path}` "
                    f"(or `prunelimit run`) before `{step}`"
                )
            inputs[up] = stamp
        for up in OPTIONAL.get(step, ()):
            stamp = self.stamp(up)
            if stamp is not None:
                inputs[up] = stamp
        return inputs

    def status(self, step: str, config: RunConfig) -> tuple[bool, str]:
        """(done, why not): done iff the result exists, with these settings, from the current inputs."""
        result = self.read_result(step)
        if result is None:
            return False, "no result yet"
        wanted = _jsonable(step_settings(config, step))
        stored = result.get("settings", {})
        if stored != wanted:
            changed = sorted(k for k in set(wanted) | set(stored) if wanted.get(k) != stored.get(k))
            return False, "settings changed: " + ", ".join(f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        try:
            inputs = self.current_inputs(step)
        except PruneLimitError:
            return False, "inputs missing"
        if result.get("inputs", {}) != inputs:
            return False, "an earlier step was redone"
        return True, "done"

    def write_result(self, step: str, payload: dict, config: RunConfig, inputs: dict[str, str], seconds: float) -> dict:
        import time
        import uuid

        record = {
            "step": step,
            "stamp": uuid.uuid4().hex,
            "settings": step_settings(config, step),
            "inputs": inputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            **payload,
        }
        write_json(self.result_path(step), record)
        return record


def _jsonable(obj):
    """``obj`` as it reads back from a result file (the NaN policy of :mod:`mmpl.jsonio` applied)."""
    return json.loads(dumps(obj))


def check_upstream_current(run: RunDirectory, config: RunConfig, step: str, inputs: dict[str, str],
                           already: Sequence[str]) -> None:
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


def check_plan(run: RunDirectory, config: RunConfig, steps: Sequence[str], force: bool) -> None:
    """Up front, the input checks the pipeline makes for steps that build on results of earlier invocations."""
    for index, step in enumerate(steps):
        earlier = steps[:index]
        if any(up in earlier for up in REQUIRES[step]) or (not force and run.status(step, config)[0]):
            continue
        check_upstream_current(run, config, step, run.current_inputs(step), already=earlier)


# ============================================================================ opening
def open_run(out: str | os.PathLike, overrides: dict[str, Any] | None = None, *, must_exist: bool = False,
             fresh: bool = False) -> tuple[RunDirectory, RunConfig]:
    """The run directory and its configuration: stored ``config.yaml`` updated by ``overrides``.

    ``overrides`` holds options the user set explicitly (``None`` values are ignored). A run
    directory made for another model or dataset is refused, naming what differs; a new one (or
    one started afresh with ``fresh``, i.e. --overwrite) needs both. Everything is checked here,
    nothing is written: the resolved configuration is saved (by :func:`save_config`) only once a
    step succeeds, so a failed first step leaves nothing that would refuse the retry.
    """
    run = RunDirectory(out)
    overrides = {k: v for k, v in coerce_options(dict(overrides or {}), "options").items() if v is not None}
    if run.path.exists() and not run.path.is_dir():
        raise PruneLimitError(f"--out {run.path} exists and is not a directory; give a directory path")
    if fresh:
        check_clearable(run)
    config_path = run.file(CONFIG_FILE)
    stored = not fresh and config_path.is_file()
    if stored:
        config = _stored_config(run, config_path, overrides)
    else:
        if must_exist:
            raise PruneLimitError(f"{run.path} is not a prunelimit run directory (no {CONFIG_FILE}); start one with `prunelimit run` or `prunelimit train`")
        if not overrides.get("model") or not overrides.get("dataset"):
            what = f"--overwrite starts {run.path} afresh" if fresh else f"new run directory {run.path}"
            raise PruneLimitError(f"{what}: --model and --dataset are required")
        try:
            config = RunConfig(**overrides)
        except TypeError as err:
            raise PruneLimitError(str(err)) from None
    config = config.resolved()
    if stored:
        _check_model_info(run, config)
    _check_names(config)
    resolve_device(config.device, "--device" if "device" in overrides or not stored else f"{config_path}: option device",
                   error=PruneLimitError)
    return run, config


def _stored_config(run: RunDirectory, config_path: Path, overrides: dict[str, Any]) -> RunConfig:
    """config.yaml with ``overrides`` on top; refused when the model or dataset differ."""
    stored = RunConfig.from_dict(read_yaml_mapping(config_path, PruneLimitError, "run directory file"), str(config_path))
    stored.validate(str(config_path), keys={f.name for f in fields(RunConfig)} - set(overrides))
    differ = {k: (getattr(stored, k), overrides[k]) for k in ("model", "dataset")
              if k in overrides and overrides[k] != getattr(stored, k)}
    if differ:
        given = " and ".join(f"{k} {new!r}" for k, (_old, new) in differ.items())
        detail = "; ".join(f"{k}: {old!r} stored vs {new!r} given" for k, (old, new) in differ.items())
        raise PruneLimitError(
            f"run directory {run.path} holds a run of model {stored.model!r} on dataset {stored.dataset!r}, "
            f"not {given} ({detail}); choose another --out, or {FRESH_HINT}"
        )
    return dataclasses.replace(stored, **overrides)


def _check_model_info(run: RunDirectory, config: RunConfig) -> None:
    info_path = run.file(MODEL_INFO_FILE)
    if not info_path.is_file():
        return
    info = read_json(info_path)
    if not isinstance(info, dict) or info.get("model") != config.model or info.get("dataset") != config.dataset:
        info = info if isinstance(info, dict) else {}
        raise PruneLimitError(
            f"{info_path} describes model {info.get('model')!r} on {info.get('dataset')!r} but {run.file(CONFIG_FILE)} says "
            f"{config.model!r} on {config.dataset!r}; the run directory was mixed up: choose another --out, or {FRESH_HINT}"
        )


def _check_names(config: RunConfig) -> None:
    """Unknown zoo or dataset names fail before anything is written."""
    from .data import BUILTIN_DATASETS
    from .models import list_models

    if ":" not in config.model and config.model not in list_models():
        raise PruneLimitError(f"unknown model {config.model!r}; choose one of: {', '.join(list_models())}, or give 'package.module:factory'")
    if ":" not in config.dataset and config.dataset not in BUILTIN_DATASETS:
        raise PruneLimitError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(BUILTIN_DATASETS)}, or give 'package.module:factory'")


def save_config(run: RunDirectory, config: RunConfig) -> None:
    """Write config.yaml (atomically) when it differs from what is stored; rank 0 only.

    Called after a step succeeds, so a run that fails in its first step leaves no directory behind.
    """
    if distributed.world()[0] != 0:
        return
    path = run.file(CONFIG_FILE)
    text = config.to_yaml()
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


# ============================================================================ starting afresh
def _stale_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file() and not path.is_symlink()


def foreign_files(run: RunDirectory) -> list[str]:
    """Names in the run directory that the pipeline did not write (directories end in "/")."""
    if not run.root.is_dir():
        return []
    names = []
    for path in sorted(run.root.iterdir()):
        ours = path.name in PIPELINE_FILES and path.is_file() and not path.is_symlink()
        if not ours and not _stale_temp(path):
            names.append(path.name + ("/" if path.is_dir() else ""))
    return names


def check_clearable(run: RunDirectory) -> None:
    """--overwrite deletes only what the pipeline wrote: refuse a directory holding anything else."""
    foreign = foreign_files(run)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PruneLimitError(f"--overwrite: {run.path} holds files prunelimit did not write ({shown}); "
                              "move them away or choose another --out (nothing was deleted)")


def clear_run_directory(run: RunDirectory) -> list[str]:
    """Delete the pipeline's files (and stale temporary files) from the run directory; return their names."""
    check_clearable(run)
    removed = []
    for name in sorted(PIPELINE_FILES):
        path = run.file(name)
        if path.is_file():
            path.unlink()
            removed.append(name)
    remove_stale_temp_files(run.root)
    return removed
