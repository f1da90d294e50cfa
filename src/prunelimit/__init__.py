"""How sparse can a network be pruned: l1 training, one-shot pruning, SLQ and the predicted limit.

Stable API (names may gain arguments, not lose these):

- prunable_parameters(model): the default prunable set (Linear/Conv weights)
- train_l1(model, loss_fn, train_data, lam, epochs, ...): l1-regularized training
- hessian_operator(model, loss_fn, batches, params=None): the Hessian operator the estimators take
- slq(op, ...), hutchinson_trace(op, ...), hessian_rows(op, ...), hessian_rows_null_mass(op, ...): curvature
- loss_epsilon(model, loss_fn, batches): epsilon, the spread of the per-batch loss
- predict_limit(weights_or_model, epsilon, spectrum, p0=..., trace=...): the predicted limit
  (predict_threshold is the same function under its first name)
- prune_global(model, ratio), actual_threshold(model, eval_fn, tolerance=0.0): pruning
- create_model / list_models / load_dataset: the zoo and the datasets
- run_pipeline(out, overrides): the whole `prunelimit run` from Python
"""
from .data import DatasetBundle, load_dataset
from .epsilon import loss_epsilon
from .errors import PruneLimitError
from .estimators import SpectrumEstimate, TraceEstimate, hessian_rows, hessian_rows_null_mass, hutchinson_trace, slq
from .geometry import gaussian_width_ratio, radius_curve
from .hessian import HessianOperator, hessian_operator
from .models import create_model, list_models, register_model
from .params import prunable_parameters
from .pipeline import run_pipeline
from .prediction import ThresholdPrediction, predict_limit, predict_threshold
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
    "hessian_operator",
    "hessian_rows",
    "hessian_rows_null_mass",
    "hutchinson_trace",
    "list_models",
    "load_dataset",
    "loss_epsilon",
    "predict_limit",
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
