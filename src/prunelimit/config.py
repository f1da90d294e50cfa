"""Run configuration: one typed dataclass, loadable from YAML, saved in every run directory.

Every option is declared once, as a :class:`RunConfig` field made with :func:`mmpl.config.option`:
its help text, its argparse type (the numeric range, see :func:`bounded`), choices and metavar.
The command line derives its flags from these fields (:func:`mmpl.config.add_config_flags`;
``cli=False`` fields are YAML-only), and :meth:`RunConfig.validate` checks YAML values and
stored config.yaml files against the same ranges.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import yaml
from mmpl.cliargs import ranged
from mmpl.config import flag_fields, flag_name, option, read_yaml_mapping
from mmpl.device import DEVICE_HELP

from .errors import PruneLimitError
from .regularize import SCHEDULES

P0_MODES = ("auto", "on", "off")

# Built-in datasets train for a few epochs only; docs/method/prunelimit.md §6 found the prediction
# reliable there only with strong l1 (lam >= 2e-4: within ~0.05; >= 1e-3: within ~0.01), at some
# cost in dense accuracy. These defaults sit inside that regime. Measured with lenet300 (seed 0):
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


def bounded(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], int | float]:
    """The argparse type of a numeric option (checked at parse time); ``.bound`` is its :class:`Bound`,
    which :meth:`RunConfig.validate` applies to values from YAML files and Python callers."""
    check = ranged(kind, low, None if kind is int else high, low_open=low_open, high_open=high_open)

    def parse(text: str):
        value = check(text)
        if kind is int and high is not None and value > high:  # the integer in full (seed: not 4.29e+09)
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = check.__name__
    parse.bound = Bound(kind, low, high, low_open, high_open)  # type: ignore[attr-defined]
    return parse


def lanczos_steps_arg(text: str) -> int | str:
    """The argparse type of --lanczos-steps: an integer >= 2 or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 steps, got {value}")
    return value


@dataclass
class RunConfig:
    """Everything a `prunelimit run` depends on. ``None`` means "the default for this model/dataset"."""

    model: str = option(help="zoo model (see `prunelimit list-models`) or package.module:factory")
    dataset: str = option(help="digits, mnist5k, mnist, cifar10, cifar100 or package.module:factory")
    data_root: str | None = option(
        None, metavar="PATH", help="folder with local datasets in torchvision's layout (never downloaded); the CIFAR "
        "files are Python pickles, which can run code: use only files from the official archive")
    seed: int = option(0, type=bounded(int, 0, MAX_SEED), help="seed of the split, initialisation, shuffling and probes")
    device: str = option("cpu", help=DEVICE_HELP)
    # training (LOMP step 1)
    lam: float | None = option(None, type=bounded(float, 0), help="l1 strength lambda")
    epochs: int | None = option(None, type=bounded(int, 1), help="training epochs")
    lr: float = option(0.05, type=bounded(float, 0, low_open=True), help="SGD learning rate")
    momentum: float = option(0.9, type=bounded(float, 0, 1, high_open=True), cli=False, help="SGD momentum")
    weight_decay: float = option(0.0, type=bounded(float, 0), help="l2 weight decay on all parameters")
    batch_size: int = option(128, type=bounded(int, 1), help="training batch size")
    schedule: str = option("cosine", choices=SCHEDULES, metavar="{" + ",".join(SCHEDULES) + "}",
                           help="learning-rate schedule, stepped per epoch")
    augment: bool = option(True, help="random crop/flip for CIFAR training (never used for the Hessian anyway)")
    # curvature: "auto" grows each probe's Lanczos run, checking p* at m = 50, 100, 200, ...
    # (x lanczos_growth) until it moves less than `lanczos_tol` (docs/method/prunelimit.md §3.2)
    # or `lanczos_max_steps` is reached.
    lanczos_steps: int | str = option(
        "auto", type=lanczos_steps_arg, metavar="M|auto",
        help="Lanczos steps per probe; auto grows m = 50, 100, 200, ... until p* moves < 0.005")
    lanczos_max_steps: int = option(800, type=bounded(int, 2), help="cap on m in auto mode")
    lanczos_growth: float = option(2.0, type=bounded(float, 1, low_open=True), cli=False,
                                   help="auto mode: factor between the step counts at which p* is checked")
    lanczos_tol: float = option(0.005, type=bounded(float, 0, low_open=True), cli=False,
                                help="auto mode: p* has settled when it moves less than this")
    probes: int = option(2, type=bounded(int, 1), help="Rademacher probes for SLQ")
    trace_samples: int = option(20, type=bounded(int, 1), help="Hutchinson samples for Tr(H)")
    hessian_samples: int | None = option(
        None, type=bounded(int, 1), metavar="N", help="use a fixed seeded subset of N training samples for Hessian "
        "products (epsilon always uses the whole training set, forward passes only)")
    hessian_batch_size: int = option(512, type=bounded(int, 1), help="batch size of Hessian passes; memory only, not the result")
    eps_batch_size: int = option(128, type=bounded(int, 1), help="batch size whose per-batch loss spread is epsilon; the paper uses 128")
    p0: str = option("auto", choices=P0_MODES, metavar="{" + ",".join(P0_MODES) + "}",
                     help="null-mass correction from Hessian rows: auto = on for conv nets, off for FC nets")
    p0_threshold: float = option(1e-7, type=bounded(float, 0), cli=False, help="a Hessian row whose L1 norm is below this is null")
    # LOMP regime: the share of prunable weights with |w| < regime_tol must reach
    # regime_min_share * p*, else the report warns that the prediction is likely too high.
    regime_tol: float = option(1e-3, type=bounded(float, 0, low_open=True), cli=False, help="|w| below this is near zero")
    regime_min_share: float = option(0.5, type=bounded(float, 0, 1), cli=False,
                                     help="the near-zero share needed for the LOMP regime, as a fraction of p*")
    # actual threshold
    tolerance: float = option(0.0, type=bounded(float, 0, 1, high_open=True),
                              help="accuracy drop (fraction, e.g. 0.01 = 1 point) allowed before the actual threshold")
    save_pruned: bool = option(False, help="save the pruned model (masks made permanent) as model_pruned.safetensors")
    prune_ratio: float | None = option(
        None, type=bounded(float, 0, 1, high_open=True), metavar="P",
        help="also evaluate (and with --save-pruned save) the model pruned at ratio P in [0, 1) instead of at p*")

    # ------------------------------------------------------------------ checks and defaults
    def validate(self, source: str | None = None, keys: Iterable[str] | None = None) -> "RunConfig":
        """Raise :class:`PruneLimitError` for the first out-of-range value (one line naming it).

        ``source`` names where the values came from (a YAML file: "FILE: option KEY ..."); without
        it the message names the command-line flag ("--epochs ..."). ``keys`` limits the check to
        those fields (the ones a file actually set). The ranges are the fields' :func:`bounded`
        types, the same ones the command line enforces at parse time.
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
        """Whether the null-mass correction is applied: ``auto`` = on for conv nets, off for FC nets
        (docs/method/prunelimit.md §3.3). For a user model (import path) ``auto`` looks for Conv layers in ``model``.
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
        return cls.from_dict(read_options_file(path, "config"), str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FIELDS = {f.name: f for f in fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)
_FLAGS = {f.name: flag_name(f) for f in flag_fields(RunConfig)}


def help_defaults() -> dict[str, str]:
    """How --help shows the defaults that depend on the model or dataset (fields whose default is None)."""
    small = SMALL_DATASET_DEFAULTS.items()
    return {
        "lam": ", ".join(f"{v['lam']:g} on {k}" for k, v in small) + ", the paper's per-model value otherwise",
        "epochs": ", ".join(f"{v['epochs']} on {k}" for k, v in small) + f", {LONG_SCHEDULE_EPOCHS} otherwise",
        "hessian_samples": "all",
    }


def bound_of(key: str) -> Bound | None:
    """The range of numeric option ``key`` (from its :func:`bounded` type), or None."""
    return getattr(_FIELDS[key].metadata.get("type"), "bound", None)


def option_label(key: str) -> str:
    """How a message names an option given without a file: its flag, or "option KEY" for YAML-only ones."""
    return _FLAGS.get(key, f"option {key}")


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for option ``key`` ("must be ..., got ..."), or None when it is."""
    if key in ("model", "dataset", "device"):
        return None if isinstance(value, str) and value else "is required (a non-empty name)"
    if value is None and type(None) in typing.get_args(_HINTS[key]):  # None: the default for this model/dataset
        return None
    bound = bound_of(key)
    if bound is not None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bound.holds(value)
        return None if ok else f"must be {bound.describe()}, got {value!r}"
    if key == "lanczos_steps":
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2)
        return None if ok else f"must be an integer >= 2 or 'auto', got {value!r}"
    choices = _FIELDS[key].metadata.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    if _HINTS[key] is bool and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    return None


def coerce_options(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check option names and convert values to the field types (YAML reads ``1e-3`` as a string).

    ``None`` is kept (it means "default"). Raises :class:`PruneLimitError` naming the option.
    """
    if not isinstance(data, dict):
        raise PruneLimitError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - set(_FIELDS))
    if unknown:
        raise PruneLimitError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    return {key: _coerce(key, value, source) for key, value in data.items()}


_KIND_TEXT = {float: "a number", int: "an integer", bool: "true or false", str: "a text value"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """``value`` as option ``key``'s type; strict: a bool is not a number, "5.0" is not an integer, "yes" not a bool."""
    kinds = [a for a in typing.get_args(_HINTS[key]) if a is not type(None)] or [_HINTS[key]]
    kind = kinds[0] if len(kinds) == 1 else tuple(kinds)  # lanczos_steps: (int, str), an integer or 'auto'
    try:
        if value is None:
            return None
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is int and not isinstance(value, bool) and not (isinstance(value, float) and not value.is_integer()):
            return int(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind == (int, str) and isinstance(value, (int, str)) and not isinstance(value, bool):
            return value if value == "auto" or not isinstance(value, str) else int(value)
        if kind is str and not isinstance(value, (list, dict, bool)):
            return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        pass
    what = _KIND_TEXT.get(kind, "an integer or 'auto'")
    raise PruneLimitError(f"{source}: option {key} must be {what}, got {value!r}") from None


def read_options_file(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """The mapping of options in a YAML file (``{}`` when empty); errors name ``option`` and the file."""
    try:
        return read_yaml_mapping(path, PruneLimitError)
    except PruneLimitError as err:
        where = _yaml_error_position(path) if "not valid YAML" in str(err) else ""
        raise PruneLimitError(f"{option} {err}{where}") from None


def _yaml_error_position(path: str | Path) -> str:
    """" at line L, column C" of a YAML syntax error (mmpl.config's message names the problem, not the place)."""
    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            return f" at line {mark.line + 1}, column {mark.column + 1}"
    except (OSError, UnicodeDecodeError):
        pass
    return ""


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
