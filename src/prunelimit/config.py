"""Run configuration: one typed dataclass, loadable from YAML, saved in every run directory."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
    def validate(self) -> "RunConfig":
        """Raise :class:`PruneLimitError` for any out-of-range value (one line, naming the option)."""
        def bad(option: str, why: str):
            raise PruneLimitError(f"{option}: {why}")

        if not self.model:
            bad("--model", "is required")
        if not self.dataset:
            bad("--dataset", "is required")
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam >= 0):
            bad("--lam", f"must be a finite number >= 0, got {self.lam}")
        if self.epochs is not None and self.epochs < 0:
            bad("--epochs", f"must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("--lr", f"must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.eps_batch_size < 1 or self.hessian_batch_size < 1:
            bad("batch sizes", "must be >= 1")
        if isinstance(self.lanczos_steps, str):
            if self.lanczos_steps != "auto":
                bad("--lanczos-steps", f"must be a positive integer or 'auto', got {self.lanczos_steps!r}")
        elif self.lanczos_steps < 2:
            bad("--lanczos-steps", f"must be >= 2, got {self.lanczos_steps}")
        if self.lanczos_max_steps < 2 or not self.lanczos_growth > 1.0:
            bad("lanczos_max_steps/lanczos_growth", "need lanczos_max_steps >= 2 and lanczos_growth > 1")
        if not self.lanczos_tol > 0:
            bad("lanczos_tol", f"must be > 0, got {self.lanczos_tol}")
        if self.probes < 1:
            bad("--probes", f"must be >= 1, got {self.probes}")
        if self.trace_samples < 1:
            bad("--trace-samples", f"must be >= 1, got {self.trace_samples}")
        if self.hessian_samples is not None and self.hessian_samples < 1:
            bad("--hessian-samples", f"must be >= 1, got {self.hessian_samples}")
        if self.p0 not in P0_MODES:
            bad("--p0", f"must be one of {', '.join(P0_MODES)}, got {self.p0!r}")
        if not 0.0 <= self.tolerance < 1.0:
            bad("--tolerance", f"is an accuracy drop as a fraction in [0, 1), got {self.tolerance}")
        if self.prune_ratio is not None and not 0.0 <= self.prune_ratio < 1.0:
            bad("--prune-ratio", f"pruning ratio must be in [0, 1), got {self.prune_ratio}")
        if not self.regime_tol > 0 or not 0.0 <= self.regime_min_share <= 1.0:
            bad("regime_tol/regime_min_share", "need regime_tol > 0 and regime_min_share in [0, 1]")
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
        return cls.from_dict(load_yaml_mapping(path), str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FLOAT_OPTIONS = {"lam", "lr", "momentum", "weight_decay", "lanczos_growth", "lanczos_tol", "p0_threshold", "regime_tol",
                  "regime_min_share", "tolerance", "prune_ratio"}
_INT_OPTIONS = {"seed", "epochs", "batch_size", "lanczos_max_steps", "probes", "trace_samples", "hessian_samples",
                "hessian_batch_size", "eps_batch_size"}
_BOOL_OPTIONS = {"augment", "save_pruned"}


def coerce_options(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check option names and convert values to the field types (YAML reads ``1e-3`` as a string).

    ``None`` is kept (it means "default"). Raises :class:`PruneLimitError` naming the option.
    """
    if not isinstance(data, dict):
        raise PruneLimitError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
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
            elif not isinstance(value, str):
                value = str(value)
        except (TypeError, ValueError):
            kind = ("a number" if key in _FLOAT_OPTIONS else "an integer" if key in _INT_OPTIONS
                    else "true or false" if key in _BOOL_OPTIONS else "an integer or 'auto'")
            raise PruneLimitError(f"{source}: option {key} must be {kind}, got {value!r}") from None
        out[key] = value
    return out


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding one mapping (``{}`` for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PruneLimitError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PruneLimitError(f"{path}: expected a mapping of options, got {type(data).__name__}")
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
