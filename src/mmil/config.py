"""Typed experiment configuration, loadable from YAML and saved beside every result.

A YAML file mirrors :class:`ExperimentConfig`::

    model: mmil
    model_kwargs: {num_subbags: 10, grouping: random, mask_ratio: 0.6}
    folds: 5
    repeats: 10
    train: {epochs: 200, lr: 2.0e-4, patience: 20, min_epochs: 50}

Unknown keys are errors naming the key, so a typo never silently falls back to
a default. ``2e-4`` (which YAML 1.1 reads as text) is accepted for float fields.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MMILInputError
from .io import write_json, write_text

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """The training recipe of one fold (spec section 3).

    Attributes:
        epochs: maximum number of epochs.
        lr, weight_decay: AdamW settings.
        accumulate: bags per optimiser step (one bag per forward pass; gradients
            of ``accumulate`` bags are averaged).
        patience: epochs without a lower validation loss before stopping.
        min_epochs: never stop before this epoch (CLAM's convention).
        class_weights: weight the cross-entropy by inverse class frequency,
            ``w_k = n / (K * n_k)``.
        seed: seeds the initial weights, the bag order and every stochastic
            forward pass (each a function of ``(seed, epoch, step)``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        precision: ``"fp32"`` or ``"bf16"`` (autocast for forward and loss).
        eval_repeats: stochastic passes averaged for the validation loss.
        val_fraction: share of each training part held out for early stopping
            when the data has no validation split.
        standardize: z-score features with statistics of the training bags;
            ``None`` = automatic (on for MIL-benchmark CSVs, whose features are
            raw measurements, off for slide features from an encoder).
        grad_clip: clip the gradient norm to this value (``None`` = off).
        num_workers: DataLoader workers reading bags in the background.
        progress: show progress bars (only on a terminal).
    """

    epochs: int = 200
    lr: float = 2e-4
    weight_decay: float = 1e-4
    accumulate: int = 1
    patience: int = 20
    min_epochs: int = 50
    class_weights: bool = False
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    eval_repeats: int = 1
    val_fraction: float = 0.15
    standardize: bool | None = None
    grad_clip: float | None = None
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`MMILInputError` for values out of range."""
        if self.epochs < 1:
            raise MMILInputError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise MMILInputError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise MMILInputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.accumulate < 1:
            raise MMILInputError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.patience < 1:
            raise MMILInputError(f"patience must be >= 1, got {self.patience}")
        if self.min_epochs < 0:
            raise MMILInputError(f"min_epochs must be >= 0, got {self.min_epochs}")
        if self.precision not in PRECISIONS:
            raise MMILInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_repeats < 1:
            raise MMILInputError(f"eval_repeats must be >= 1, got {self.eval_repeats}")
        if not 0.0 < self.val_fraction < 1.0:
            raise MMILInputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise MMILInputError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.num_workers < 0:
            raise MMILInputError(f"num_workers must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        kwargs = _typed_kwargs(cls, data, source)
        try:
            return cls(**kwargs)
        except MMILInputError as err:
            raise MMILInputError(f"{source}: {err}") from None


@dataclass
class ExperimentConfig:
    """Everything needed to reproduce a cross-validation run from its directory.

    Attributes:
        model: registered model name (see :func:`mmil.models.list_models`).
        model_kwargs: constructor options of the model (``in_dim`` and
            ``n_classes`` come from the data).
        train: the training recipe.
        folds: k of stratified k-fold (ignored with fixed splits).
        repeats: R stochastic evaluations of each test set (the paper uses 10);
            repeat r uses seed ``seed + r``.
        seed: seeds fold assignment and test-time evaluation.
        use_splits: use the split/fold columns of the label CSV when present.
        features, labels: the data the run used (recorded for reproduction).
    """

    model: str = "mmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = 5
    repeats: int = 10
    seed: int = 0
    use_splits: bool = True
    features: str | None = None
    labels: str | None = None

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise MMILInputError(f"folds must be >= 2, got {self.folds}")
        if self.repeats < 1:
            raise MMILInputError(f"repeats must be >= 1, got {self.repeats}")
        if not isinstance(self.model_kwargs, dict):
            raise MMILInputError(f"model_kwargs must be a mapping, got {type(self.model_kwargs).__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise MMILInputError(f"{source}: the top level must be a mapping of options, got {type(data).__name__}")
        data = dict(data)
        train = data.pop("train", None) or {}
        if not isinstance(train, dict):
            raise MMILInputError(f"{source}: `train` must be a mapping, got {type(train).__name__}")
        kwargs = _typed_kwargs(cls, data, source, skip=("train",))
        train_cfg = TrainConfig.from_dict(train, f"{source} (train)")
        try:
            return cls(train=train_cfg, **kwargs)
        except MMILInputError as err:
            raise MMILInputError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentConfig":
        """Read a YAML (or JSON) config; unknown keys raise :class:`MMILInputError`."""
        return cls.from_dict(read_yaml_mapping(path), str(path))

    def save(self, directory: str | Path) -> None:
        """Write ``config.yaml`` and ``config.json`` into ``directory`` (atomically)."""
        import yaml

        directory = Path(directory)
        d = self.to_dict()
        write_text(directory / "config.yaml", yaml.safe_dump(d, sort_keys=False))
        write_json(directory / "config.json", d)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` YAML (or JSON) file holding a mapping of options.

    Missing file, invalid YAML and a top level that is not a mapping each raise
    :class:`MMILInputError` naming the file. An empty file is an empty mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "syntax error"
        raise MMILInputError(f"{path}: not valid YAML ({first}); fix the file") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise MMILInputError(f"{path}: the top level must be a mapping of options, got {type(data).__name__}")
    return data


def _typed_kwargs(cls, data: dict[str, Any], source: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``data``'s keys against ``cls``'s fields and coerce values to the field types."""
    if not isinstance(data, dict):
        raise MMILInputError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    out = {}
    for key, value in data.items():
        if key not in names:
            raise MMILInputError(f"{source}: unknown key {key!r}; valid keys: {', '.join(names + list(skip))}")
        out[key] = _coerce(value, hints[key], f"{source}: {key}")
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce ``value`` to ``hint`` (int, float, bool, str, optional thereof, dict)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except MMILInputError as err:
                errors.append(str(err))
        raise MMILInputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise MMILInputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        raise MMILInputError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MMILInputError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise MMILInputError(f"{where}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise MMILInputError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise MMILInputError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MMILInputError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise MMILInputError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value
