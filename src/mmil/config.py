"""Typed experiment configuration, loadable from YAML and saved beside every result.

A YAML file mirrors :class:`ExperimentConfig`::

    model: mmil
    model_kwargs: {num_subbags: 10, grouping: random, mask_ratio: 0.6}
    folds: 5
    repeats: 10
    train: {epochs: 200, lr: 2.0e-4, patience: 20, min_epochs: 50}

Unknown keys are errors naming the key, so a typo never silently falls back to
a default. ``2e-4`` (which YAML 1.1 reads as text) is accepted for float fields.
Each field declares its ``mmil train`` flag, help text and range once
(:mod:`mmpl.config`): the same range refuses a bad flag and a bad YAML value.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpl.cliargs import Range, non_negative_float, non_negative_int, positive_float, positive_int
from mmpl.config import ConfigFile, check_fields, option
from mmpl.device import DEVICE_HELP
from mmpl.jsonio import write_json, write_text

from .errors import MMILInputError
from .precision import PRECISIONS
from .recipe import SCHEDULES, SELECTIONS

#: ``TrainConfig.center_slides`` choices.
CENTERINGS = ("auto", "median", "none")

__all__ = ["PRECISIONS", "ExperimentConfig", "TrainConfig"]


class RegisteredModels:
    """The ``--model`` choices: the model registry as it stands when the command line is parsed."""

    def __contains__(self, name: object) -> bool:
        from .models import list_models

        return name in list_models()

    def __iter__(self):
        from .models import list_models

        return iter(list_models())


@dataclass
class TrainConfig(ConfigFile):
    """The training recipe of one fold (``docs/method/mmil.md`` §3).

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
        precision: ``"auto"`` (:func:`mmil.precision.resolve_precision`), ``"fp32"`` or ``"bf16"`` (autocast for forward and loss).
        eval_repeats: stochastic passes averaged for the validation loss.
        val_fraction: share of each training part held out for early stopping
            when the data has no validation split.
        calib_fraction: share of each training fold held out for calibration only
            (:func:`mmil.data.splits.with_calibration_sets`); 0 = calibrate on the validation bags.
        temperature_prior: std of the prior log T ~ N(0, s^2) of the temperature fit
            (:func:`mmil.calibration.fit_temperature`); ``None`` = maximum likelihood.
        standardize: z-score features with statistics of the training bags;
            ``None`` = automatic (on for MIL-benchmark CSVs, whose features are
            raw measurements, off for slide features from an encoder).
        center_slides: ``"median"``: every bag's features minus the bag's per-feature median
            (:func:`mmil.data.dataset.center_on_median`), at training and inference; ``"auto"``: median
            for slide features, none for MIL-benchmark CSVs (small bags of raw measurements).
        grad_clip: clip the gradient norm to this value (``None`` = off, the default).
        selection, select_window, select_min_epoch, select_margin: which epoch's weights are
            kept (:class:`mmil.recipe.ModelSelector`; ``selection="loss"``, ``select_min_epoch=1``
            is the recipe before issue 10).
        wait_for_signal: with AUC selection, no early stop while the kept epoch's validation AUC is below
            :func:`mmil.recipe.chance_auc_bound` of the validation labels (measured in docs/benchmarks.md); off
            for a validation set too small for any AUC to beat that bound (:func:`mmil.recipe.signal_floor`).
        lr_schedule, warmup_epochs: linear warm-up, then constant or cosine decay (:func:`mmil.recipe.lr_factor`).
        instance_dropout, feature_noise: bag augmentation per training step (:func:`mmil.recipe.augment_bag`).
        negative_mix: insert ``round(f n)`` instances of a random negative (class 0) training bag into each training bag
            of ``n`` (:func:`mmil.recipe.mix_in_negative`; two classes only; 0 = off).
        balanced_sampling: draw the epoch's bags class-balanced (:func:`mmil.recipe.epoch_order`).
        weight_average: decay of a moving average of the weights over epochs, validated and kept
            (:func:`mmil.recipe.average_weights`; 0 = off; 0.8 by default, measured in docs/benchmarks.md).
        pseudo_bags: split each training bag into this many random pseudo-bags carrying its label (:func:`mmil.recipe.pseudo_bags`).
        num_workers: DataLoader workers reading bags in the background.
        workers: folds (bench: folds x models) run in this many processes (:mod:`mmil.parallel`); does not change results.
        progress: show progress bars (only on a terminal).
        log_every, tensorboard: per-epoch lines off a terminal, TensorBoard scalars (:mod:`mmil.train_log`).
    """

    config_error = MMILInputError  # what from_dict / from_yaml raise

    epochs: int = option(200, help="maximum epochs", type=positive_int, metavar="N")
    lr: float = option(2e-4, help="AdamW learning rate", type=positive_float)
    weight_decay: float = option(1e-4, help="AdamW weight decay", type=non_negative_float, metavar="WD")
    accumulate: int = option(1, help="bags per optimiser step (gradient accumulation)", type=positive_int, metavar="N")
    patience: int = option(20, help="epochs without a lower validation loss before stopping", type=positive_int, metavar="N")
    min_epochs: int = option(50, help="no early stopping before this epoch", type=non_negative_int, metavar="N")
    class_weights: bool = option(False, help="weight the loss by inverse class frequency")
    seed: int = option(0, help="seed of the initial weights, the bag order and the stochastic passes", type=non_negative_int)
    device: str = option("cpu", help=DEVICE_HELP)
    precision: str = option("auto", help="auto (bf16 only where the hardware has native bf16 matmul: CUDA, AMX, AVX512-BF16; else fp32), fp32, "
                                         "or bf16 autocast for training and evaluation", choices=PRECISIONS)
    eval_repeats: int = option(1, help="stochastic passes averaged for the validation loss", type=positive_int, cli=False)
    val_fraction: float = option(0.15, help="share of each training fold held out for early stopping",
                                 type=Range(float, 0, 1, low_open=True, high_open=True), metavar="FRACTION")
    calib_fraction: float = option(0.0, help="share of each training fold held out, untouched by training and early stopping, to fit the "
                                   "temperature and the conformal thresholds (0: the validation slides do; docs/calibration.md)",
                                   type=Range(float, 0, 1, high_open=True), metavar="FRACTION")
    temperature_prior: float | None = option(1.0, help="std of the normal prior on log T when the temperature is fitted (a MAP fit that "
                                             "keeps T near 1 on small calibration sets; null: maximum likelihood; docs/calibration.md)",
                                             type=positive_float, cli=False)
    standardize: bool | None = option(None, help="z-score features with training-fold statistics (null: on for MIL-benchmark CSVs only)", cli=False)
    center_slides: str = option("auto", help="subtract each slide's per-feature median from its instances before training and "
                                "inference (auto: on for slide features, off for MIL-benchmark CSVs; turn it off where the label is a "
                                "property of the whole slide's tissue, e.g. subtyping: docs/benchmarks.md)", choices=CENTERINGS)
    grad_clip: float | None = option(None, help="clip the gradient norm to this value (null: off; measured harmful with the cosine schedule, docs/benchmarks.md)", type=positive_float, cli=False)
    selection: str = option("auc", help="model selection: auc (smoothed validation AUC, loss as tie-break) or loss (lowest validation loss)",
                            choices=SELECTIONS, cli=False)
    select_window: int = option(3, help="epochs over which the validation AUC is averaged for selection", type=positive_int, cli=False)
    select_min_epoch: int = option(5, help="an epoch before this one is kept only if better than every later one by select_margin",
                                   type=positive_int, cli=False)
    select_margin: float = option(0.05, help="margin by which an epoch before select_min_epoch must win", type=non_negative_float, cli=False)
    wait_for_signal: bool = option(True, help="early stopping waits until the kept epoch's validation AUC beats what an uninformed model reaches by "
                                   "chance (one-sided 5 %%): a run that has not started learning trains on to --epochs")
    lr_schedule: str = option("constant", help="learning-rate schedule after the warm-up: constant or cosine (to 1% at the last epoch)",
                              choices=SCHEDULES, cli=False)
    warmup_epochs: float = option(0.0, help="linear learning-rate warm-up, in epochs", type=non_negative_float, cli=False)
    instance_dropout: float = option(0.25, help="share of a bag's instances dropped at random in each training step",
                                     type=Range(float, 0, 1, high_open=True), cli=False)
    feature_noise: float = option(0.1, help="Gaussian feature noise per training step, in units of the bag's feature std",
                                  type=non_negative_float, cli=False)
    negative_mix: float = option(0.0, help="insert FRACTION x n instances of a random negative (class 0) training slide into every training "
                                 "bag of n, each step, so that what a whole slide shares (stain, tissue mix) stops predicting its "
                                 "label (two classes; 0: off; docs/benchmarks.md)", type=Range(float, 0, 4), metavar="FRACTION")
    balanced_sampling: bool = option(False, help="draw each epoch's bags with replacement, every class equally often (CLAM's weighted "
                                     "sampler); off: each bag once, shuffled")
    weight_average: float = option(0.8, help="validate and keep a moving average of the weights over epochs, a_e = D a_(e-1) + (1 - D) w_e, "
                                   "instead of the last epoch's weights (0: off; 0.8 weighs about the last 5 epochs)", type=Range(float, 0, 1, high_open=True), metavar="D")
    pseudo_bags: int = option(1, help="split each training bag, every step, into K random pseudo-bags that carry its label "
                              "(DTFD-MIL; more, smaller training bags for small cohorts); 1: off", type=positive_int, metavar="K")
    num_workers: int = option(0, help="background workers reading bags", type=non_negative_int, metavar="N")
    workers: int = option(1, help="folds (and bench models) trained in K processes, the CPU threads split between them; under torchrun: "
                                  "K > 1 spreads the folds over the ranks, 1 trains each fold data-parallel on all ranks (mmil.ddp)",
                          type=positive_int, metavar="K")
    progress: bool = option(True, help="show progress bars (on a terminal)")
    log_every: int = option(1, help="off a terminal (a batch job's log), print one line every N epochs and at the last (0: none; "
                            "history.csv is written every epoch either way)", type=non_negative_int, metavar="N")
    tensorboard: bool = option(False, help="also write TensorBoard scalars to fold_k/tensorboard/ (needs the tensorboard package)")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Coerce the fields to their types; raise :class:`MMILInputError` for values out of range."""
        check_fields(self, error=MMILInputError)
        if self.tensorboard:
            from .train_log import require_tensorboard

            require_tensorboard("tensorboard (--tensorboard)")
        if self.precision not in PRECISIONS:
            raise MMILInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.selection not in SELECTIONS:
            raise MMILInputError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.lr_schedule not in SCHEDULES:
            raise MMILInputError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.center_slides not in CENTERINGS:
            raise MMILInputError(f"center_slides must be one of {', '.join(CENTERINGS)}, got {self.center_slides!r}")


#: Training options added after runs were first stored, each with the value that reproduces how a run made before it
#: existed trained and calibrated (the recipe of configs/mmil_recipe_v1.yaml, maximum-likelihood temperature).
LEGACY_TRAIN_VALUES: dict[str, Any] = {
    "center_slides": "none", "selection": "loss", "select_window": 3, "select_min_epoch": 1, "select_margin": 0.05,
    "lr_schedule": "constant", "warmup_epochs": 0.0, "instance_dropout": 0.0, "feature_noise": 0.0,
    "balanced_sampling": False, "weight_average": 0.0, "pseudo_bags": 1, "calib_fraction": 0.0, "temperature_prior": None,
    "wait_for_signal": False, "negative_mix": 0.0,
}


def with_legacy_train_values(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run's training settings, every option the run predates set to its value then (:data:`LEGACY_TRAIN_VALUES`).

    Resume checks compare stored settings through this, so a run written by an older version resumes under the settings
    it ran with, and a refusal names the old value (``center_slides: none -> auto``) instead of "(unset)".
    """
    return {**LEGACY_TRAIN_VALUES, **stored}


def with_legacy_fingerprint(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run fingerprint (a dict with a ``train`` part) with :func:`with_legacy_train_values` applied to it."""
    return {**stored, "train": with_legacy_train_values(stored["train"])} if isinstance(stored.get("train"), dict) else dict(stored)


@dataclass
class ExperimentConfig(ConfigFile):
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
        splits_dir: folder of CLAM split files ``splits_0.csv ... splits_{k-1}.csv``
            (columns ``train,val,test``); when given, they define the folds
            (:func:`mmil.data.layouts.read_clam_split_dir`).
        features, labels: the data the run used (recorded for reproduction).
    """

    config_error = MMILInputError

    model: str = option("mmil", help="registered model: %(choices)s", choices=RegisteredModels(), metavar="MODEL")
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = option(5, help="k of stratified k-fold (ignored with a fixed split)", type=Range(int, 2), metavar="K")
    repeats: int = option(10, help="R stochastic evaluations of each test fold, seeds seed..seed+R-1 (10 is the paper's protocol)",
                          type=positive_int, metavar="R")
    seed: int = option(0, help="seed of folds, training and evaluation", type=non_negative_int)
    use_splits: bool = option(True, help="use the split or fold column of the label CSV when present", cli=False)
    splits_dir: str | None = option(None, metavar="DIR",
                                    help="folder of CLAM split files splits_0.csv ... splits_{k-1}.csv (columns train,val,test): fold k trains on "
                                    "train, stops early on val and tests on test (instead of --folds and the label CSV's split/fold column)")
    features: str | None = None
    labels: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, error=MMILInputError)

    def save(self, directory: str | Path) -> None:
        """Write ``config.yaml`` and ``config.json`` into ``directory`` (atomically)."""
        import yaml

        directory = Path(directory)
        d = self.to_dict()
        write_text(directory / "config.yaml", yaml.safe_dump(d, sort_keys=False))
        write_json(directory / "config.json", d)
