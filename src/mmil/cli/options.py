"""The options of the commands that have no library config of their own, declared as config fields.

Each dataclass below is one command's (or one group's) options; its flags, help texts,
defaults and ranges come from the fields (:func:`mmpl.config.add_config_flags`), and the
values given are read back with :func:`mmil.cli.common.options_from_args`.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpl.cliargs import Range, fraction, non_negative_float, non_negative_int, open_fraction, positive_float, positive_int
from mmpl.config import option
from mmpl.device import DEVICE_HELP

from ..config import PRECISIONS

GROUPINGS_HELP = ("random, sequential, embedding (k-means on projected features), coords (k-means on patch coordinates) "
                  "or index (precomputed `groups` in the bag files)")


@dataclass
class ModelOptions:
    """Constructor options of the model of ``mmil train`` (only those given reach the model)."""

    num_subbags: int | None = option(None, help="G, sub-bags per bag (MMIL)", type=positive_int, metavar="G")
    grouping: str | None = option(None, help=f"how instances are grouped into sub-bags (MMIL): {GROUPINGS_HELP}")
    embed_dim: int | None = option(None, help="embedding width D", type=positive_int, metavar="D")
    num_layers: int | None = option(None, help="number of attention layers (MMIL, TransMIL)", type=positive_int, metavar="N")
    heads: int | None = option(None, help="attention heads", type=positive_int, metavar="N")
    head_dim: int | None = option(None, help="width of each attention head (MMIL)", type=positive_int, metavar="N")
    num_msg: int | None = option(None, help="message tokens per sub-bag (MMIL)", type=positive_int, metavar="N")
    mask_ratio: float | None = option(None, help="fraction of sub-bags dropped during training (MMIL; the paper uses 0.6 with G=10)",
                                      type=open_fraction, metavar="FRACTION")
    max_subbag_size: int | None = option(None, help="cap on instances per sub-bag (MMIL; without one nothing is dropped)",
                                         type=positive_int, metavar="N")
    dropout: float | None = option(None, help="dropout rate of the model", type=open_fraction, metavar="RATE")
    attn_dropout: float | None = option(None, help="dropout on attention weights (0.1 reproduces the release; 0 keeps the fused CPU kernel)",
                                        type=open_fraction, metavar="RATE")


@dataclass
class ModelOverrides:
    """Inference-time model options that do not change the weights (``evaluate``, ``predict``, ``heatmap``)."""

    grouping: str | None = option(None, help=f"override the checkpoint's grouping (MMIL): {GROUPINGS_HELP}")
    num_subbags: int | None = option(None, help="override the checkpoint's number of sub-bags (MMIL)", type=positive_int, metavar="G")


@dataclass
class EvaluateOptions:
    """Options of ``mmil evaluate``."""

    repeats: int = option(10, help="R stochastic evaluations, seeds seed..seed+R-1", type=positive_int, metavar="R")
    seed: int = option(0, help="first evaluation seed", type=non_negative_int)  # the flag: the common --seed
    precision: str = option("auto", help="auto (bf16 only with native bf16 matmul, else fp32), fp32, or bf16 autocast for inference", choices=PRECISIONS)
    device: str = option("auto", help=DEVICE_HELP)  # the flag: the common --device
    temperature: bool = option(True, help="apply the temperature fitted on the fold's validation slides (stored in the checkpoint)")
    conformal_alpha: float | None = option(None, help="miscoverage alpha of split-conformal prediction sets from the checkpoint's "
                                           "validation scores (sets cover the true class with probability >= 1 - alpha)",
                                           type=Range(float, 0, 1, low_open=True, high_open=True), metavar="ALPHA")
    mondrian: bool = option(False, help="class-conditional (Mondrian) conformal thresholds: coverage >= 1 - alpha within each class")
    refuse_training_slides: bool = option(False, help="stop (exit 2) instead of warning when asked to score slides the checkpoint "
                                          "was trained or validated on (recorded in its slides.json)")


@dataclass
class PredictOptions(EvaluateOptions):
    """Options of ``mmil predict``."""

    repeats: int = option(1, help="average probabilities over R runs with seeds seed..seed+R-1", type=positive_int, metavar="R")
    seed: int = option(0, help="seed of the (first) stochastic run", type=non_negative_int)


@dataclass
class PruneLimitOptions:
    """Options of ``mmil prune-limit``."""

    lanczos_steps: int = option(100, help="Lanczos steps m", type=Range(int, 2), metavar="M")
    probes: int = option(4, help="Rademacher probes", type=positive_int, metavar="N")
    tolerance: float = option(0.0, help="accuracy drop (fraction) allowed before the actual threshold", type=open_fraction, metavar="FRACTION")
    bags_per_batch: int = option(1, help="bags per padded batch for epsilon and the Hessian", type=positive_int, metavar="N")
    seed: int = option(0, help="grouping and probe seed", type=non_negative_int)


@dataclass
class ImportOptions:
    """Options of ``mmil import-checkpoint`` (besides the file and the class names)."""

    in_dim: int | None = option(None, help="feature dimension C the checkpoint was trained on (1024 for CLAM ResNet-50, 512 for DSMIL ResNet-18)",
                                type=positive_int, metavar="C", required=True)
    num_subbags: int = option(10, help="G used at inference (released: 10 for CAMELYON16, 4 for TCGA)", type=positive_int, metavar="G")
    grouping: str = option("random", help=f"grouping used at inference: {GROUPINGS_HELP}")
    n_classes: int | None = option(None, help="number of classes", type=Range(int, 2), metavar="C")
    heads: int | None = option(None, help="attention heads (heads x head-dim must match the weights)", type=positive_int, metavar="N")
    head_dim: int | None = option(None, help="width of each head", type=positive_int, metavar="N")


@dataclass
class SynthOptions:
    """Options of ``mmil synth``."""

    n_slides: int = option(40, help="number of slides", type=positive_int, metavar="N")
    seed: int = option(0, help="seed (same seed -> same files)", type=non_negative_int)
    in_dim: int = option(128, help="feature dimension", type=positive_int, metavar="C")
    min_instances: int = option(200, help="fewest instances per slide", type=positive_int, metavar="N")
    max_instances: int = option(20000, help="most instances per slide (sizes are log-uniform)", type=positive_int, metavar="N")
    positive_rate: float = option(0.5, help="share of positive slides", type=fraction, metavar="FRACTION")
    signal: float = option(4.0, help="shift of tumour instances along the tumour direction, in noise standard deviations",
                           type=non_negative_float)
    slides_per_case: int = option(1, help="slides per patient (case_id), for patient-level folds", type=positive_int, metavar="N")
    positive_fraction: tuple[float, float] = option((0.01, 0.10), help="range of the tumour share of a positive slide's instances",
                                                    type=Range(float, 0, 1, low_open=True), nargs=2, metavar=("LO", "HI"))
    preset: str = option("default", help="default (the generator above) or camelyon-like (six tissue types, CAMELYON16-like tumour "
                         "fractions, 1k-20k instances times --scale); both write oracle.json, the AUC of an instance-level oracle", choices=("default", "camelyon-like"))
    scale: float = option(1.0, help="camelyon-like: multiply the bag sizes (1k-20k) by this (e.g. 0.05 on a CPU)", type=positive_float)


#: Defaults shown in the help where the field's default is "not given".
IMPORT_DEFAULTS = {"n_classes": "read from the weights", "heads": "8", "head_dim": "attention width / heads"}
