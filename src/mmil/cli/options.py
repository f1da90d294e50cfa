"""The options of the commands that have no library config of their own, declared as config fields.

Each dataclass below is one command's (or one group's) options; its flags, help texts,
defaults and ranges come from the fields (:func:`mmpl.config.add_config_flags`), and the
values given are read back with :func:`mmil.cli.common.options_from_args`.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpl.config import option
from mmpl.device import DEVICE_HELP

from ..config import PRECISIONS
from ..options import FRACTION, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE_INT, Range

GROUPINGS_HELP = ("random, sequential, embedding (k-means on projected features), coords (k-means on patch coordinates) "
                  "or index (precomputed `groups` in the bag files)")


@dataclass
class ModelOptions:
    """Constructor options of the model of ``mmil train`` (only those given reach the model)."""

    num_subbags: int | None = option(None, help="G, sub-bags per bag (MMIL)", type=POSITIVE_INT, metavar="G")
    grouping: str | None = option(None, help=f"how instances are grouped into sub-bags (MMIL): {GROUPINGS_HELP}")
    embed_dim: int | None = option(None, help="embedding width D", type=POSITIVE_INT, metavar="D")
    num_layers: int | None = option(None, help="number of attention layers (MMIL, TransMIL)", type=POSITIVE_INT, metavar="N")
    heads: int | None = option(None, help="attention heads", type=POSITIVE_INT, metavar="N")
    head_dim: int | None = option(None, help="width of each attention head (MMIL)", type=POSITIVE_INT, metavar="N")
    num_msg: int | None = option(None, help="message tokens per sub-bag (MMIL)", type=POSITIVE_INT, metavar="N")
    mask_ratio: float | None = option(None, help="fraction of sub-bags dropped during training (MMIL; the paper uses 0.6 with G=10)",
                                      type=OPEN_FRACTION, metavar="FRACTION")
    max_subbag_size: int | None = option(None, help="cap on instances per sub-bag (MMIL; without one nothing is dropped)",
                                         type=POSITIVE_INT, metavar="N")
    dropout: float | None = option(None, help="dropout rate of the model", type=OPEN_FRACTION, metavar="RATE")
    attn_dropout: float | None = option(None, help="dropout on attention weights (0.1 reproduces the release; 0 keeps the fused CPU kernel)",
                                        type=OPEN_FRACTION, metavar="RATE")


@dataclass
class ModelOverrides:
    """Inference-time model options that do not change the weights (``evaluate``, ``predict``, ``heatmap``)."""

    grouping: str | None = option(None, help=f"override the checkpoint's grouping (MMIL): {GROUPINGS_HELP}")
    num_subbags: int | None = option(None, help="override the checkpoint's number of sub-bags (MMIL)", type=POSITIVE_INT, metavar="G")


@dataclass
class EvaluateOptions:
    """Options of ``mmil evaluate``."""

    repeats: int = option(10, help="R stochastic evaluations, seeds seed..seed+R-1", type=POSITIVE_INT, metavar="R")
    seed: int = option(0, help="first evaluation seed", type=NON_NEGATIVE_INT)
    precision: str = option("fp32", help="fp32, or bf16 autocast for inference", choices=PRECISIONS)
    device: str = option("cpu", help=DEVICE_HELP)


@dataclass
class PredictOptions(EvaluateOptions):
    """Options of ``mmil predict``."""

    repeats: int = option(1, help="average probabilities over R runs with seeds seed..seed+R-1", type=POSITIVE_INT, metavar="R")
    seed: int = option(0, help="seed of the (first) stochastic run", type=NON_NEGATIVE_INT)


@dataclass
class PruneLimitOptions:
    """Options of ``mmil prune-limit``."""

    lanczos_steps: int = option(100, help="Lanczos steps m", type=Range(int, 2), metavar="M")
    probes: int = option(4, help="Rademacher probes", type=POSITIVE_INT, metavar="N")
    tolerance: float = option(0.0, help="accuracy drop (fraction) allowed before the actual threshold", type=OPEN_FRACTION, metavar="FRACTION")
    bags_per_batch: int = option(1, help="bags per padded batch for epsilon and the Hessian", type=POSITIVE_INT, metavar="N")
    seed: int = option(0, help="grouping and probe seed", type=NON_NEGATIVE_INT)


@dataclass
class ImportOptions:
    """Options of ``mmil import-checkpoint`` (besides the file, its feature dimension and the class names)."""

    num_subbags: int = option(10, help="G used at inference (released: 10 for CAMELYON16, 4 for TCGA)", type=POSITIVE_INT, metavar="G")
    grouping: str = option("random", help=f"grouping used at inference: {GROUPINGS_HELP}")
    n_classes: int | None = option(None, help="number of classes", type=Range(int, 2), metavar="C")
    heads: int | None = option(None, help="attention heads (heads x head-dim must match the weights)", type=POSITIVE_INT, metavar="N")
    head_dim: int | None = option(None, help="width of each head", type=POSITIVE_INT, metavar="N")


@dataclass
class SynthOptions:
    """Options of ``mmil synth`` (besides ``--positive-fraction LO HI``)."""

    n_slides: int = option(40, help="number of slides", type=POSITIVE_INT, metavar="N")
    seed: int = option(0, help="seed (same seed -> same files)", type=NON_NEGATIVE_INT)
    in_dim: int = option(128, help="feature dimension", type=POSITIVE_INT, metavar="C")
    min_instances: int = option(200, help="fewest instances per slide", type=POSITIVE_INT, metavar="N")
    max_instances: int = option(20000, help="most instances per slide (sizes are log-uniform)", type=POSITIVE_INT, metavar="N")
    positive_rate: float = option(0.5, help="share of positive slides", type=FRACTION, metavar="FRACTION")
    signal: float = option(4.0, help="shift of tumour instances along the tumour direction, in noise standard deviations",
                           type=NON_NEGATIVE_FLOAT)
    slides_per_case: int = option(1, help="slides per patient (case_id), for patient-level folds", type=POSITIVE_INT, metavar="N")


#: Defaults shown in the help where the field's default is "not given".
IMPORT_DEFAULTS = {"n_classes": "read from the weights", "heads": "8", "head_dim": "attention width / heads"}
