"""Run configuration: one typed dataclass, loadable from YAML, saved in every run directory.

Every option is declared once, as a :class:`RunConfig` field made with :func:`mmpl.config.option`:
its help text, its argparse type (the numeric range: a :class:`mmpl.cliargs.Range`), choices and metavar.
The command line derives its flags from these fields (:func:`mmpl.config.add_config_flags`;
``cli=False`` fields are YAML-only), and :meth:`RunConfig.validate` checks YAML values and
stored config.yaml files against the same ranges.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import yaml
from mmpl.cliargs import MAX_SEED as CLI_MAX_SEED, Range
from mmpl.config import coerce, flag_fields, flag_name, option, read_yaml_mapping
from mmpl.device import DEVICE_HELP

from .errors import PruneLimitError
from .geometry import LOMP_MIN_SHARE
from .regularize import SCHEDULES

P0_MODES = ("auto", "on", "off")

# Built-in datasets train for a few epochs only. lam defaults to "auto" everywhere: a fixed strong l1
# (the former digits default 2e-3) sent fc5 on digits to chance, so the l1 strength is chosen per
# model and dataset by a short sweep on a validation split (prunelimit.lamsweep; docs/fidelity.md).
SMALL_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 30},
    "mnist5k": {"epochs": 20},
}
LONG_SCHEDULE_EPOCHS = 160  # CIFAR-length schedule for every other dataset
FALLBACK_LAM = 5e-5  # the paper's value for the FC nets; used for user models


MAX_SEED = CLI_MAX_SEED  # scikit-learn's split takes seeds below 2**32; the trace uses seed + 1


# The argparse type of --lam: a finite number >= 0 or ``auto`` (the sweep of :mod:`prunelimit.lamsweep`).
lam_arg = Range(float, 0, words=("auto",))
CRITERIA = ("first-drop", "released")


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
    seed: int = option(0, type=Range(int, 0, MAX_SEED), help="seed of the split, initialisation, shuffling and probes")
    device: str = option("auto", help=DEVICE_HELP)
    # training (LOMP step 1)
    lam: float | str | None = option(
        "auto", type=lam_arg, metavar="LAM|auto",
        help="l1 strength lambda; auto = the largest of a short sweep whose dense validation accuracy stays within "
        "--max-dense-drop of lambda = 0 (docs/method/prunelimit.md §2)")
    max_dense_drop: float = option(0.01, type=Range(float, 0, 1, high_open=True),
                                   help="--lam auto: allowed drop of dense validation accuracy (fraction, 0.01 = 1 point)")
    lam_sweep_epochs: int | None = option(None, type=Range(int, 1), metavar="N",
                                          help="--lam auto: epochs per swept lambda (default: the run's epochs, at most 30)")
    chance_margin: float = option(0.05, type=Range(float, 0, 1), cli=False,
                                  help="dense test accuracy below 1/classes + this stops the run (training failed)")
    epochs: int | None = option(None, type=Range(int, 1), help="training epochs")
    lr: float = option(0.05, type=Range(float, 0, low_open=True), help="SGD learning rate")
    momentum: float = option(0.9, type=Range(float, 0, 1, high_open=True), cli=False, help="SGD momentum")
    weight_decay: float = option(0.0, type=Range(float, 0), help="l2 weight decay on all parameters")
    batch_size: int = option(128, type=Range(int, 1), help="training batch size")
    schedule: str = option("cosine", choices=SCHEDULES, metavar="{" + ",".join(SCHEDULES) + "}",
                           help="learning-rate schedule, stepped per epoch")
    augment: bool = option(True, help="random crop/flip for CIFAR training (never used for the Hessian anyway)")
    # curvature: "auto" grows each probe's Lanczos run, checking p* at m = 50, 100, 200, ...
    # (x lanczos_growth) until it moves less than `lanczos_tol` (docs/method/prunelimit.md §3.2)
    # or `lanczos_max_steps` is reached.
    lanczos_steps: int | str = option(
        "auto", type=lanczos_steps_arg, metavar="M|auto",
        help="Lanczos steps per probe; auto grows m = 50, 100, 200, ... until p* moves < 0.005")
    lanczos_max_steps: int = option(800, type=Range(int, 2), help="cap on m in auto mode")
    lanczos_growth: float = option(2.0, type=Range(float, 1, low_open=True), cli=False,
                                   help="auto mode: factor between the step counts at which p* is checked")
    lanczos_tol: float = option(0.005, type=Range(float, 0, low_open=True), cli=False,
                                help="auto mode: p* has settled when it moves less than this (or less than lanczos_rel_tol "
                                "x the width of its eps/2..2 eps interval, whichever is larger)")
    lanczos_rel_tol: float = option(0.25, type=Range(float, 0), cli=False,
                                    help="auto mode: settled when p* moves less than this fraction of its sensitivity interval")
    lanczos_max_seconds: float = option(120.0, type=Range(float, 0, low_open=True),
                                        help="auto mode: time budget of all Lanczos runs together (seconds)")
    lanczos_max_memory_mb: float = option(1024.0, type=Range(float, 0, low_open=True),
                                          help="memory budget of one Lanczos basis (MiB); caps m at budget / (8 D)")
    probes: int = option(2, type=Range(int, 1), help="Rademacher probes for SLQ")
    trace_samples: int = option(20, type=Range(int, 1), help="Hutchinson samples for Tr(H)")
    hessian_samples: int | None = option(
        None, type=Range(int, 1), metavar="N", help="use a fixed seeded subset of N training samples for Hessian "
        "products (epsilon always uses the whole training set, forward passes only)")
    hessian_batch_size: int = option(512, type=Range(int, 1), help="batch size of Hessian passes; memory only, not the result")
    eps_batch_size: int = option(128, type=Range(int, 1), help="batch size whose per-batch loss spread is epsilon; the paper uses 128")
    p0: str = option("auto", choices=P0_MODES, metavar="{" + ",".join(P0_MODES) + "}",
                     help="null-mass correction from Hessian rows: auto = on for conv nets, off for FC nets")
    p0_threshold: float = option(1e-7, type=Range(float, 0), cli=False, help="a Hessian row whose L1 norm is below this is null")
    # LOMP regime: the share of prunable weights with |w| < regime_tol must reach
    # regime_min_share * p*, else the report warns that the prediction is unreliable (0.7: docs/fidelity.md).
    regime_tol: float = option(1e-3, type=Range(float, 0, low_open=True), cli=False, help="|w| below this is near zero")
    regime_min_share: float = option(LOMP_MIN_SHARE, type=Range(float, 0, 1), cli=False,
                                     help="the near-zero share needed for the LOMP regime, as a fraction of p*")
    # actual threshold
    tolerance: float = option(0.01, type=Range(float, 0, 1, high_open=True),
                              help="accuracy drop (fraction, 0.01 = 1 point) allowed before the actual threshold")
    criterion: str = option("first-drop", choices=CRITERIA, metavar="{" + ",".join(CRITERIA) + "}",
                            help="the headline actual threshold: first-drop (the first ratio whose test accuracy falls "
                            "below dense - tolerance) or released (the criterion of the authors' released code: the "
                            "largest ratio whose accuracy is still above dense; both are always reported)")
    save_pruned: bool = option(False, help="save the pruned model (masks made permanent) as model_pruned.safetensors")
    prune_ratio: float | None = option(
        None, type=Range(float, 0, 1, high_open=True), metavar="P",
        help="also evaluate (and with --save-pruned save) the model pruned at ratio P in [0, 1) instead of at p*")

    # ------------------------------------------------------------------ checks and defaults
    def validate(self, source: str | None = None, keys: Iterable[str] | None = None) -> "RunConfig":
        """Raise :class:`PruneLimitError` for the first out-of-range value (one line naming it).

        ``source`` names where the values came from (a YAML file: "FILE: option KEY ..."); without
        it the message names the command-line flag ("--epochs ..."). ``keys`` limits the check to
        those fields (the ones a file actually set). The ranges are the fields' :class:`~mmpl.cliargs.Range`
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
        """A copy with ``lam`` (None: ``auto``) and ``epochs`` filled from the dataset defaults."""
        out = dataclasses.replace(self)
        small = SMALL_DATASET_DEFAULTS.get(self.dataset, {})
        if out.lam is None:
            out.lam = "auto"
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
        return cls.from_dict(read_yaml_mapping(path, PruneLimitError, "config"), str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FIELDS = {f.name: f for f in fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)
_FLAGS = {f.name: flag_name(f) for f in flag_fields(RunConfig)}


def help_defaults() -> dict[str, str]:
    """How --help shows the defaults that depend on the model or dataset (fields whose default is None)."""
    small = SMALL_DATASET_DEFAULTS.items()
    return {
        "epochs": ", ".join(f"{v['epochs']} on {k}" for k, v in small) + f", {LONG_SCHEDULE_EPOCHS} otherwise",
        "hessian_samples": "all",
    }


def bound_of(key: str) -> Range | None:
    """The range of numeric option ``key`` (its argparse type), or None."""
    kind = _FIELDS[key].metadata.get("type")
    return kind if isinstance(kind, Range) else None


def option_label(key: str) -> str:
    """How a message names an option given without a file: its flag, or "option KEY" for YAML-only ones."""
    return _FLAGS.get(key, f"option {key}")


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for option ``key`` ("must be ..., got ..."), or None when it is."""
    if key in ("model", "dataset", "device"):
        return None if isinstance(value, str) and value else "is required (a non-empty name)"
    if value is None and type(None) in typing.get_args(_HINTS[key]):  # None: the default for this model/dataset
        return None
    if key == "lam" and value == "auto":
        return None
    bound = bound_of(key)
    if bound is not None:
        return None if bound.contains(value) else f"must be {bound.describe()}, got {value!r}"
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
    """Check option names and convert values to the field types with :func:`mmpl.config.coerce` (strict: a
    bool is not a number, 5.0 is not an integer, "yes" not a bool; YAML reads ``1e-3`` as a string).

    ``None`` is kept (it means "default"). Raises :class:`PruneLimitError` naming the option.
    """
    if not isinstance(data, dict):
        raise PruneLimitError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - set(_FIELDS))
    if unknown:
        raise PruneLimitError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    return {key: None if value is None else coerce(value, _HINTS[key], f"{source}: option {key}", PruneLimitError)
            for key, value in data.items()}


# Which options each step's result depends on: a finished step is redone when one changes.
STEP_SETTINGS: dict[str, tuple[str, ...]] = {
    "train": ("model", "dataset", "seed", "lam", "max_dense_drop", "lam_sweep_epochs", "chance_margin", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "augment"),
    "spectrum": ("lanczos_steps", "lanczos_max_steps", "lanczos_growth", "lanczos_tol", "lanczos_rel_tol", "lanczos_max_seconds", "lanczos_max_memory_mb", "probes", "trace_samples", "hessian_samples", "eps_batch_size", "p0", "p0_threshold"),
    "predict": ("regime_tol", "regime_min_share"),
    "prune": ("tolerance", "criterion", "save_pruned", "prune_ratio"),
    "report": (),
}


def step_settings(config: RunConfig, step: str) -> dict[str, Any]:
    """The options ``step`` depends on, as stored in its result file."""
    data = config.to_dict()
    return {k: data[k] for k in STEP_SETTINGS[step]}
