"""The settings of ``mmil bench`` (:class:`BenchConfig`): YAML keys are the field names, and each
field with a flag declares it once (:mod:`mmpl.config`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from mmpl.cliargs import Range, non_negative_int, positive_float, positive_int
from mmpl.config import ConfigFile, check_fields, option

from .config import TrainConfig
from .errors import MMILInputError
from .models import list_models

#: The models of issue 5, in the order tables list them (filtered by the registry).
DEFAULT_MODELS = ("mmil", "mean", "max", "abmil", "abmil-gated", "transmil", "dsmil", "clam-sb")
DEFAULT_COST_SIZES = (1_000, 10_000, 50_000, 100_000)


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


def size_arg(text: str) -> int:
    """The argparse type of ``--cost-sizes``: :func:`parse_size`, its error as argparse's one line."""
    try:
        return parse_size(text)
    except MMILInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_model_list(text: str) -> list[str]:
    """``"abmil, dsmil"`` -> ``["abmil", "dsmil"]`` (``"all"`` = every registered model)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list_models()
    if not names:
        raise MMILInputError("--models is empty; give a comma-separated list such as abmil,dsmil")
    return names


@dataclass
class BenchConfig(ConfigFile):
    """Settings of one bench run (YAML keys are the field names).

    Attributes:
        models: registry names to compare, in table order (a comma-separated text is split).
        model_kwargs: per-model constructor options, ``{name: {option: value}}``.
        train: the training recipe shared by every model.
        folds: k of the stratified k-fold (ignored with fixed splits).
        repeats: stochastic evaluations of each test fold (seeds ``seed..seed+R-1``).
        seed: seeds folds, weights and evaluation (the same for every model).
        use_splits: use split columns of the label CSV when present.
        cost_sizes: bag sizes ``N`` of the cost table (empty = no cost table); ``10k`` = 10 000.
        cost_repeats: timed forward passes per size (the median is reported).
        cost_budget_s: once one forward pass of a model takes longer than this,
            its larger sizes are skipped (recorded with status ``over budget``).
    """

    config_error = MMILInputError

    models: list[str] | str = option(default_factory=list, metavar="NAMES",
                                     help="comma-separated registry names ('all' = every registered model)")
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = option(5, help="k of stratified k-fold cross-validation (ignored with fixed splits)", type=Range(int, 2), metavar="K")
    repeats: int = option(1, help="stochastic evaluations of each test fold, seeds S..S+R-1", type=positive_int, metavar="R")
    seed: int = option(0, help="seed of folds, initial weights and evaluation, the same for every model", type=non_negative_int)
    use_splits: bool = option(True, help="use the split column of the label CSV when present", cli=False)
    cost_sizes: list[int | str] = option(default_factory=lambda: list(DEFAULT_COST_SIZES), type=size_arg, nargs="*", metavar="N",
                                         help="bag sizes of the cost table, e.g. 1k 10k 0.1m (give the flag alone to skip the cost table)")
    cost_repeats: int = option(3, help="timed forward passes per bag size (the median is reported)", type=positive_int, cli=False)
    cost_budget_s: float = option(60.0, flag="--cost-budget", type=positive_float, metavar="SECONDS",
                                  help="skip a model's larger bag sizes once one forward pass takes longer than this")

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = parse_model_list(self.models)
        if not self.models:
            self.models = [m for m in DEFAULT_MODELS if m in list_models()] or list_models()
        self.check()

    def check(self) -> None:
        """Raise :class:`MMILInputError` for unknown models or values of the wrong type or out of range."""
        check_fields(self, error=MMILInputError)
        if not isinstance(self.models, list):
            raise MMILInputError(f"models must be a list of model names (--models), got {self.models!r}")
        known = list_models()
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise MMILInputError(f"unknown model(s) {', '.join(map(repr, unknown))} in --models; choose from: {', '.join(known)}")
        if len(set(self.models)) != len(self.models):
            raise MMILInputError(f"--models lists a model twice: {', '.join(self.models)}")
        if not all(isinstance(v, dict) for v in self.model_kwargs.values()):
            raise MMILInputError("model_kwargs must map model names to mappings of options, e.g. {abmil: {embed_dim: 256}}")
        stray = [m for m in self.model_kwargs if m not in known]
        if stray:
            raise MMILInputError(f"model_kwargs names unknown model(s) {', '.join(map(repr, stray))}; choose from: {', '.join(known)}")
        if not isinstance(self.train, TrainConfig):
            raise MMILInputError(f"train must be a mapping of training options, got {self.train!r}")
        self.cost_sizes = [parse_size(n) for n in self.cost_sizes]
