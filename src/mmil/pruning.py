"""How far a trained slide classifier can be pruned: ``prunelimit`` on MIL models.

The one place where ``mmil`` meets ``prunelimit`` (which stays a general tool and
never imports ``mmil``). It adapts bags to ``prunelimit``'s ``(inputs, targets)``
batches and a MIL model to a plain ``inputs -> logits`` module:

* :class:`FixedGroupingLogits` calls the model with a fixed ``seed``, so random
  grouping is the same in every pass: the Hessian is then the Hessian of one
  fixed function of the weights, as Lanczos requires. It also keeps attention
  on the math kernel, the only one with a double backward.
* :func:`bag_batches` pads ``bags_per_batch`` bags into ``((x, mask), labels)``;
  every MIL model here is padding-invariant, so the batch-size-weighted mean over
  batches is the mean loss over bags.

The prunable set is ``prunelimit``'s default (all ``Linear``/``Conv`` weights:
input projection, attention projections and head for the MMIL-Transformer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data.bags import pad_bags
from .errors import MMILInputError
from .models.base import model_inputs


class FixedGroupingLogits(nn.Module):
    """``(x, mask) -> logits`` of a MIL model with a fixed grouping seed."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.seed = seed

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # The fused CPU/GPU attention kernels have no double backward; Hessian-vector
        # products need it, so attention runs on the (exact, slower) math path here.
        with sdpa_kernel(SDPBackend.MATH):
            return self.model(x, mask, **model_inputs(self.model, seed=self.seed)).logits


def bag_batches(dataset, bags_per_batch: int = 1, indices: Sequence[int] | None = None) -> list[tuple[tuple[Tensor, Tensor], Tensor]]:
    """Labelled bags of ``dataset`` as a fixed list of ``((x, mask), labels)`` batches."""
    if bags_per_batch < 1:
        raise MMILInputError(f"bags_per_batch must be >= 1, got {bags_per_batch}")
    order = list(range(len(dataset))) if indices is None else list(indices)
    bags = [dataset[i] for i in order]
    bags = [b for b in bags if b.label is not None and b.label >= 0]
    if not bags:
        raise MMILInputError(f"{getattr(dataset, 'source', 'dataset')}: no labelled bags; pruning limits need labels")
    batches = []
    for start in range(0, len(bags), bags_per_batch):
        batch = pad_bags(bags[start : start + bags_per_batch])
        batches.append(((batch.x, batch.mask), batch.labels))
    return batches


@dataclass
class PruneLimitResult:
    """Predicted and measured pruning limits of a MIL model (all ratios = removed fraction)."""

    predicted_ratio: float
    actual_ratio: float
    dense_accuracy: float
    epsilon: float
    num_prunable: int
    lanczos_steps: int
    num_probes: int
    near_zero_fraction: float
    regime: str
    curve: list[tuple[float, float, float]]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["predicted_kept_fraction"] = 1.0 - self.predicted_ratio
        d["actual_kept_fraction"] = 1.0 - self.actual_ratio
        return d


def prune_limit(
    model: nn.Module,
    train_dataset,
    test_dataset,
    *,
    seed: int = 0,
    lanczos_steps: int = 100,
    num_probes: int = 4,
    tolerance: float = 0.0,
    bags_per_batch: int = 1,
    progress: bool = False,
) -> PruneLimitResult:
    """Predict (SLQ + Gaussian width) and measure (one-shot global magnitude) the pruning limit.

    epsilon is the std of the per-batch training loss (batches of ``bags_per_batch``
    bags); the spectrum is that of the mean training loss over all bags; the prediction and its
    LOMP-regime check are ``prunelimit.predict_limit``'s; the actual threshold is the
    first-drop threshold of test accuracy with ``tolerance``.
    The model's weights are unchanged on return.
    """
    import prunelimit as pl

    net = FixedGroupingLogits(model, seed=seed).eval()
    loss_fn = nn.CrossEntropyLoss()
    train = bag_batches(train_dataset, bags_per_batch)
    test = bag_batches(test_dataset, bags_per_batch)
    eps = pl.loss_epsilon(net, loss_fn, train, progress=progress)
    op = pl.hessian_operator(net, loss_fn, train, progress=progress)
    spectrum = pl.slq(op, num_steps=lanczos_steps, num_probes=num_probes, seed=seed, progress=progress)
    prediction = pl.predict_limit(net, eps, spectrum)

    def eval_fn(m: nn.Module) -> tuple[float, float]:
        correct, loss_sum, n = 0, 0.0, 0
        for (x, mask), y in test:
            logits = m(x, mask)
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += float(loss_fn(logits, y)) * len(y)
            n += len(y)
        return correct / n, loss_sum / n

    search = pl.actual_threshold(net, eval_fn, tolerance=tolerance, progress=progress)
    return PruneLimitResult(
        predicted_ratio=float(prediction.predicted_ratio),
        actual_ratio=float(search.threshold),
        dense_accuracy=float(search.dense_accuracy),
        epsilon=float(eps),
        num_prunable=int(prediction.dim),
        lanczos_steps=int(spectrum.nodes.shape[1]),
        num_probes=int(spectrum.nodes.shape[0]),
        near_zero_fraction=prediction.near_zero_fraction,
        regime=prediction.lomp_message,
        curve=list(zip(search.ratios, search.accuracies, search.losses)),
    )
