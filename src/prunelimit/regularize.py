"""l1-regularized training (step 1 of LOMP) and plain evaluation.

Objective: ``L(w) + lam * ||w||_1`` over the prunable weights, minimised by SGD with
momentum; the learning-rate schedule advances once per epoch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from mmpl.progress import progress as progress_over
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .data import dataset_batch
from .errors import PruneLimitError

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    task_loss: float
    l1_norm: float
    objective: float
    train_accuracy: float


@dataclass
class TrainHistory:
    """Per-epoch records of :func:`train_l1` (losses are sample means over the epoch)."""

    lam: float
    epochs: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"lam": self.lam, "epochs": [asdict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainHistory":
        return cls(float(d["lam"]), [EpochRecord(**e) for e in d.get("epochs", [])])


def l1_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||w||_1 = sum_i |w_i|`` over all tensors in ``params``."""
    return sum(p.abs().sum() for p in params)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based) of ``epochs``.

    cosine: ``(1 + cos(pi * epoch / epochs)) / 2``; step: 0.1 from 50% and 0.01 from 75%
    of the epochs; constant: 1.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "step":
        return 0.01 if epoch >= 0.75 * epochs else 0.1 if epoch >= 0.5 * epochs else 1.0
    if schedule == "constant":
        return 1.0
    raise PruneLimitError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def _default_params(model: nn.Module) -> list[nn.Parameter]:
    from .params import prunable_parameters

    return prunable_parameters(model)


def train_l1(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: Dataset | tuple[torch.Tensor, torch.Tensor] | Iterable,
    lam: float,
    epochs: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    schedule: str = "cosine",
    params: Sequence[nn.Parameter] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callable[[int, EpochRecord, nn.Module], object] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``loss_fn(model(x), y) + lam * ||w||_1`` with SGD + momentum.

    ``w`` is ``params`` (default: :func:`prunelimit.prunable_parameters`, the Linear/Conv
    weights, the same set that is later pruned). The l1 term contributes ``lam * sign(w)``
    to the gradient (0 at exactly 0). ``weight_decay`` (l2) applies to all parameters.
    The learning rate follows ``schedule`` stepped once per epoch (see :func:`lr_factor`).

    ``train_data`` is a map-style dataset (or an ``(inputs, targets)`` tensor pair): it is
    shuffled each epoch by a generator seeded with ``seed``, and ``augment(x, generator)``
    is applied to training batches if given. Any other iterable of batches is used as is.
    Dropout randomness is seeded too, without touching the global RNG, so two calls with
    the same seed on the same initial model give identical weights.

    ``callback(epoch, record, model)`` runs after each epoch; returning ``True`` stops early.
    """
    _check_train_options(lam, epochs, schedule)
    device = torch.device(device)
    model.to(device)
    reg_params = list(_default_params(model) if params is None else params)
    train_data, map_style = _training_data(train_data)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    history = TrainHistory(float(lam))
    step = _Step(model, loss_fn, optimizer, reg_params, float(lam), device, augment if map_style else None, generator)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        epoch_iter = progress_over(range(epochs), progress, "train (l1)", leave=True)
        for epoch in epoch_iter:
            batches = _epoch_batches(train_data, batch_size, generator) if map_style else train_data
            record = _train_epoch(step, batches, epoch, lr * lr_factor(schedule, epoch, epochs))
            history.epochs.append(record)
            if hasattr(epoch_iter, "set_postfix"):
                epoch_iter.set_postfix(loss=f"{record.task_loss:.4f}", acc=f"{record.train_accuracy:.3f}")
            if callback is not None and callback(epoch, record, model) is True:
                break
    return history


def _training_data(train_data) -> tuple[Dataset | Iterable, bool]:
    """(data, map_style): a tensor pair becomes a TensorDataset; an empty map-style dataset is refused."""
    if isinstance(train_data, tuple) and len(train_data) == 2 and all(isinstance(t, torch.Tensor) for t in train_data):
        train_data = TensorDataset(*train_data)
    map_style = isinstance(train_data, Dataset) and hasattr(train_data, "__len__")
    if map_style and len(train_data) == 0:
        raise PruneLimitError("the training set is empty")
    return train_data, map_style


@dataclass
class _Step:
    """What one SGD step on the l1 objective needs."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    reg_params: list[nn.Parameter]
    lam: float
    device: torch.device
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    generator: torch.Generator


def _check_train_options(lam: float, epochs: int, schedule: str) -> None:
    if lam < 0 or not math.isfinite(lam):
        raise PruneLimitError(f"--lam must be a finite number >= 0, got {lam}")
    if epochs < 0:
        raise PruneLimitError(f"--epochs must be >= 0, got {epochs}")
    lr_factor(schedule, 0, max(epochs, 1))  # validates the schedule name early


def _train_epoch(step: _Step, batches: Iterable, epoch: int, lr: float) -> EpochRecord:
    """One pass of SGD steps over ``batches`` at learning rate ``lr``; task loss and accuracy are sample means."""
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    step.model.train()
    total_task = total_correct = 0.0
    seen = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(step.device), targets.to(step.device)
        if step.augment is not None:
            inputs = step.augment(inputs, step.generator)
        outputs = step.model(inputs)
        task = step.loss_fn(outputs, targets)
        objective = task + step.lam * l1_norm(step.reg_params) if step.lam > 0 else task
        if not torch.isfinite(objective):
            raise PruneLimitError(f"training loss became {objective.item()} in epoch {epoch + 1}; lower --lr or --lam")
        step.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        step.optimizer.step()
        n = len(targets)
        seen += n
        total_task += task.item() * n
        if outputs.ndim == 2 and targets.ndim == 1:
            total_correct += (outputs.argmax(1) == targets).sum().item()
    with torch.no_grad():
        norm = float(l1_norm(step.reg_params)) if step.reg_params else 0.0
    task_mean = total_task / max(seen, 1)
    return EpochRecord(epoch + 1, lr, task_mean, norm, task_mean + step.lam * norm, total_correct / max(seen, 1))


def _epoch_batches(dataset: Dataset, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(dataset), generator=generator)
    for start in range(0, len(order), batch_size):
        yield dataset_batch(dataset, order[start:start + batch_size])


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, data: Iterable, device: str | torch.device = "cpu") -> tuple[float, float]:
    """``(accuracy, mean loss)`` of ``model`` in eval mode over batches ``data`` (sample-weighted)."""
    was_training = model.training
    model.eval()
    correct = total_loss = 0.0
    seen = 0
    try:
        for inputs, targets in data:
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            n = len(targets)
            total_loss += loss_fn(outputs, targets).item() * n
            correct += (outputs.argmax(1) == targets).sum().item()
            seen += n
    finally:
        model.train(was_training)
    if seen == 0:
        raise PruneLimitError("cannot evaluate on an empty dataset")
    return correct / seen, total_loss / seen
