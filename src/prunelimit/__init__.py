"""How sparse can a network be pruned: l1 training, one-shot pruning, SLQ and the predicted limit.

Stable API (names may gain arguments, not lose these):

- prunable_parameters(model): the default prunable set (Linear/Conv weights)
- train_l1(model, loss_fn, train_data, lam, epochs, ...): l1-regularized training
- slq, hutchinson_trace, hessian_rows_null_mass, loss_epsilon, HessianOperator: curvature
- predict_threshold(weights_or_model, epsilon, spectrum, p0=0.0): the predicted limit
- prune_global(model, ratio), actual_threshold(model, eval_fn, tolerance=0.0): pruning
- create_model / list_models / load_dataset: the zoo and the datasets
- run_pipeline(out, overrides): the whole `prunelimit run` from Python
"""
from .data import DatasetBundle, load_dataset
from .errors import PruneLimitError
from .geometry import ThresholdPrediction, gaussian_width_ratio, predict_threshold, radius_curve
from .hessian import (
    HessianOperator,
    SpectrumEstimate,
    TraceEstimate,
    hessian_rows_null_mass,
    hutchinson_trace,
    loss_epsilon,
    slq,
)
from .models import create_model, list_models, register_model
from .params import prunable_parameters
from .pipeline import run_pipeline
from .prune import ThresholdSearch, actual_threshold, prune_global, remove_masks
from .regularize import TrainHistory, train_l1

__version__ = "0.1.0"

__all__ = [
    "DatasetBundle",
    "HessianOperator",
    "PruneLimitError",
    "SpectrumEstimate",
    "ThresholdPrediction",
    "ThresholdSearch",
    "TraceEstimate",
    "TrainHistory",
    "actual_threshold",
    "create_model",
    "gaussian_width_ratio",
    "hessian_rows_null_mass",
    "hutchinson_trace",
    "list_models",
    "load_dataset",
    "loss_epsilon",
    "predict_threshold",
    "prunable_parameters",
    "prune_global",
    "radius_curve",
    "register_model",
    "remove_masks",
    "run_pipeline",
    "slq",
    "train_l1",
]
