"""Run configuration: one typed dataclass, loadable from YAML, saved in every run directory."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import yaml

from .errors import PruneLimitError

P0_MODES = ("auto", "on", "off")

# Built-in datasets train for a few epochs only; spec §6 found the prediction reliable there
# only with strong l1 (lam >= 2e-4: within ~0.05; >= 1e-3: within ~0.01), at some cost in
# dense accuracy. These defaults sit inside that regime. Measured with lenet300 (seed 0):
# digits lam 2e-3, 30 epochs: dense 0.972, p* 0.967, actual 0.971 (lam 5e-4: dense 0.978,
# p* 0.839, actual 0.714); mnist5k lam 1e-3, 20 epochs: dense 0.916, p* 0.994, actual 0.966
# (0.991 with a 1-point tolerance). Deeper nets need less: fc5 on digits collapses to chance at 2e-3.
SMALL_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"lam": 2e-3, "epochs": 30},
    "mnist5k": {"lam": 1e-3, "epochs": 20},
}
LONG_SCHEDULE_EPOCHS = 160  # CIFAR-length schedule for every other dataset
FALLBACK_LAM = 5e-5  # the paper's value for the FC nets; used for user models


MAX_SEED = 2**32 - 2  # scikit-learn's split takes seeds below 2**32; the trace uses seed + 1


class Bound(NamedTuple):
    """The allowed range of one numeric option: ``low <= value <= high`` (``<`` where open)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """E.g. "an integer >= 1", "a finite number > 0", "a number in [0, 1)"."""
        noun = "an integer" if self.kind is int else "a finite number" if self.high is None else "a number"
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}" \
                if self.kind is float else f"{noun} from {self.low} to {self.high}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun


# Every numeric option and its range; the command line (parse time) and validate() (YAML, stored
# config.yaml, Python callers) both use this table.
BOUNDS: dict[str, Bound] = {
    "seed": Bound(int, 0, MAX_SEED),
    "lam": Bound(float, 0),
    "epochs": Bound(int, 1),
    "lr": Bound(float, 0, low_open=True),
    "momentum": Bound(float, 0, 1, high_open=True),
    "weight_decay": Bound(float, 0),
    "batch_size": Bound(int, 1),
    "lanczos_max_steps": Bound(int, 2),
    "lanczos_growth": Bound(float, 1, low_open=True),
    "lanczos_tol": Bound(float, 0, low_open=True),
    "probes": Bound(int, 1),
    "trace_samples": Bound(int, 1),
    "hessian_samples": Bound(int, 1),
    "hessian_batch_size": Bound(int, 1),
    "eps_batch_size": Bound(int, 1),
    "p0_threshold": Bound(float, 0),
    "regime_tol": Bound(float, 0, low_open=True),
    "regime_min_share": Bound(float, 0, 1),
    "tolerance": Bound(float, 0, 1, high_open=True),
    "prune_ratio": Bound(float, 0, 1, high_open=True),
}
# Fields where None means "the default for this model/dataset" (or "not used").
OPTIONAL_FIELDS = {"data_root", "lam", "epochs", "hessian_samples", "prune_ratio"}
# Fields that have a command-line flag (--data-root for data_root, ...); the others are YAML-only.
FLAG_OPTIONS = (
    "model", "dataset", "data_root", "seed", "device", "lam", "epochs", "lr", "batch_size", "weight_decay", "schedule",
    "augment", "lanczos_steps", "lanczos_max_steps", "probes", "trace_samples", "hessian_samples", "hessian_batch_size",
    "eps_batch_size", "p0", "tolerance", "prune_ratio", "save_pruned",
)


def option_label(key: str) -> str:
    """How a message names an option given without a file: its flag, or "option KEY" for YAML-only ones."""
    return "--" + key.replace("_", "-") if key in FLAG_OPTIONS else f"option {key}"


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for option ``key`` ("must be ..., got ..."), or None when it is."""
    from .regularize import SCHEDULES

    if key in ("model", "dataset", "device"):
        return None if isinstance(value, str) and value else "is required (a non-empty name)"
    if value is None and key in OPTIONAL_FIELDS:
        return None
    bound = BOUNDS.get(key)
    if bound is not None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bound.holds(value)
        return None if ok else f"must be {bound.describe()}, got {value!r}"
    if key == "lanczos_steps":
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2)
        return None if ok else f"must be an integer >= 2 or 'auto', got {value!r}"
    choices = {"p0": P0_MODES, "schedule": SCHEDULES}.get(key)
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    if key in ("augment", "save_pruned") and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    return None


@dataclass
class RunConfig:
    """Everything a `prunelimit run` depends on. ``None`` means "the default for this model/dataset"."""

    model: str
    dataset: str
    data_root: str | None = None
    seed: int = 0
    device: str = "cpu"
    # training (LOMP step 1)
    lam: float | None = None
    epochs: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: str = "cosine"
    augment: bool = True
    # curvature
    # "auto": grow each probe's Lanczos run, checking p* at m = 50, 100, 200, ... (x lanczos_growth)
    # until it moves less than `lanczos_tol` (spec §6) or `lanczos_max_steps` is reached.
    lanczos_steps: int | str = "auto"
    lanczos_max_steps: int = 800
    lanczos_growth: float = 2.0
    lanczos_tol: float = 0.005
    probes: int = 2
    trace_samples: int = 20
    hessian_samples: int | None = None
    hessian_batch_size: int = 512
    eps_batch_size: int = 128
    p0: str = "auto"
    p0_threshold: float = 1e-7
    # LOMP regime: the share of prunable weights with |w| < regime_tol must reach
    # regime_min_share * p*, else the report warns that the prediction is likely too high.
    regime_tol: float = 1e-3
    regime_min_share: float = 0.5
    # actual threshold
    tolerance: float = 0.0
    save_pruned: bool = False
    prune_ratio: float | None = None

    # ------------------------------------------------------------------ checks and defaults
    def validate(self, source: str | None = None, keys: Iterable[str] | None = None) -> "RunConfig":
        """Raise :class:`PruneLimitError` for the first out-of-range value (one line naming it).

        ``source`` names where the values came from (a YAML file: "FILE: option KEY ..."); without
        it the message names the command-line flag ("--epochs ..."). ``keys`` limits the check to
        those fields (the ones a file actually set). The ranges are :data:`BOUNDS`, the same ones
        the command line enforces at parse time.
        """
        wanted = None if keys is None else set(keys)
        for f in fields(self):
            if wanted is not None and f.name not in wanted:
                continue
            problem = option_problem(f.name, getattr(self, f.name))
            if problem:
                where = f"{source}: option {f.name}" if source else option_label(f.name)
                raise PruneLimitError(f"{where} {problem}")
        return self

    def resolved(self) -> "RunConfig":
        """A copy with ``lam`` and ``epochs`` filled from the dataset/model defaults."""
        from .models import model_spec

        out = dataclasses.replace(self)
        small = SMALL_DATASET_DEFAULTS.get(self.dataset, {})
        if out.lam is None:
            spec = model_spec(self.model)
            out.lam = small.get("lam", spec.default_lam if spec is not None else FALLBACK_LAM)
        if out.epochs is None:
            out.epochs = small.get("epochs", LONG_SCHEDULE_EPOCHS)
        return out.validate()

    def use_p0(self, model=None) -> bool:
        """Whether the null-mass correction is applied: ``auto`` = on for conv nets, off for FC nets (spec §3).

        For a user model (import path) ``auto`` looks for Conv layers in ``model``.
        """
        if self.p0 != "auto":
            return self.p0 == "on"
        from .models import model_spec

        spec = model_spec(self.model)
        if spec is not None:
            return bool(spec.uses_conv)
        if model is None:
            return False
        from torch import nn

        return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        data = coerce_options(data, source)
        try:
            return cls(**{"model": data.pop("model", ""), "dataset": data.pop("dataset", ""), **data})
        except TypeError as err:
            raise PruneLimitError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_yaml_mapping(path, "config"), str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FLOAT_OPTIONS = {k for k, b in BOUNDS.items() if b.kind is float}
_INT_OPTIONS = {k for k, b in BOUNDS.items() if b.kind is int}
_BOOL_OPTIONS = {"augment", "save_pruned"}


def coerce_options(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check option names and convert values to the field types (YAML reads ``1e-3`` as a string).

    ``None`` is kept (it means "default"). Raises :class:`PruneLimitError` naming the option.
    """
    if not isinstance(data, dict):
        raise PruneLimitError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise PruneLimitError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for key, value in data.items():
        try:
            if value is None:
                pass
            elif key in _FLOAT_OPTIONS:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif key in _INT_OPTIONS:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif key in _BOOL_OPTIONS:
                if not isinstance(value, bool):
                    raise ValueError
            elif key == "lanczos_steps":
                if isinstance(value, str) and value != "auto":
                    value = int(value)
                elif isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise ValueError
            elif isinstance(value, (list, dict, bool)):
                raise ValueError
            elif not isinstance(value, str):
                value = str(value)
        except (TypeError, ValueError):
            kind = ("a number" if key in _FLOAT_OPTIONS else "an integer" if key in _INT_OPTIONS
                    else "true or false" if key in _BOOL_OPTIONS else "an integer or 'auto'" if key == "lanczos_steps"
                    else "a text value")
            raise PruneLimitError(f"{source}: option {key} must be {kind}, got {value!r}") from None
        out[key] = value
    return out


def load_yaml_mapping(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """Read a YAML file holding one mapping (``{}`` for an empty file); errors name ``option`` and the file."""
    path = Path(path)
    if not path.exists():
        raise PruneLimitError(f"{option} {path}: no such config file; give the path of a YAML file of options")
    if not path.is_file():
        raise PruneLimitError(f"{option} {path} is not a regular file; give the path of a YAML file of options")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PruneLimitError(f"{option} {path}: not a UTF-8 text file; give a YAML file of options") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PruneLimitError(f"{option} {path}: not valid YAML ({what}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PruneLimitError(f"{option} {path}: expected a mapping of options (key: value lines), got {type(data).__name__}")
    return data


# Which options each step's result depends on: a finished step is redone when one changes.
STEP_SETTINGS: dict[str, tuple[str, ...]] = {
    "train": ("model", "dataset", "seed", "lam", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "augment"),
    "spectrum": ("lanczos_steps", "lanczos_max_steps", "lanczos_growth", "lanczos_tol", "probes", "trace_samples", "hessian_samples", "eps_batch_size", "p0", "p0_threshold"),
    "predict": ("regime_tol", "regime_min_share"),
    "prune": ("tolerance", "save_pruned", "prune_ratio"),
    "report": (),
}


def step_settings(config: RunConfig, step: str) -> dict[str, Any]:
    """The options ``step`` depends on, as stored in its result file."""
    data = config.to_dict()
    return {k: data[k] for k in STEP_SETTINGS[step]}
