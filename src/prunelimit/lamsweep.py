"""``--lam auto``: the l1 strength picked by a short sweep on a validation split of the training data.

The prediction is only worth reading for a network that l1 training has not wrecked
(docs/method/prunelimit.md §6), so the default lambda is the largest one of :data:`LAM_GRID` whose
dense *validation* accuracy stays within ``max_drop`` of lambda = 0, and whose accuracy on the split
it was trained on (the fit split) does too. The second guard is there because the validation split
is small (288 samples on digits: a standard error of about 1.2 points, too coarse to see a 2-point
loss), while l1's loss of capacity shows first, and on 4x more samples, on the fit split: lenet300 on
digits, 30 epochs, lam 5e-3: validation 0.951 as at lam 0, fit 0.975 against 1.000, test 0.953
against 0.972. Lambdas are tried in ascending order and the sweep stops at the first one that
fails (dense accuracy falls as lambda grows, so larger ones are not tried). Every swept lambda starts from the run's
seeded initialisation (the same warm start, reused) and trains ``epochs`` epochs on 80 % of the
training set; the other 20 % (stratified, seeded) is the validation split. The test set is never
looked at. :func:`select_lambda` is the rule alone (any ``accuracy_of(lam)``), :func:`sweep_lambda`
the real sweep.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import BatchIterable, dataset_batch
from .errors import PruneLimitError

LAM_GRID = (0.0, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
VALIDATION_FRACTION = 0.2
MAX_SWEEP_EPOCHS = 30


@dataclass
class LamSweep:
    """The sweep behind ``--lam auto``: every tried lambda with its dense validation accuracy, and the pick."""

    chosen: float
    baseline_accuracy: float  # lambda = 0
    max_drop: float
    lams: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # validation split
    fit_accuracies: list[float] = field(default_factory=list)  # the split the sweep trained on (None: not given)
    baseline_fit_accuracy: float | None = None
    epochs: int = 0
    validation_size: int = 0
    seconds: float = 0.0

    @property
    def bar(self) -> float:
        return self.baseline_accuracy - self.max_drop

    def to_dict(self) -> dict:
        return {**asdict(self), "bar": self.bar}


def _pair(value) -> tuple[float, float | None]:
    return (float(value[0]), float(value[1])) if isinstance(value, (tuple, list)) else (float(value), None)


def select_lambda(accuracy_of: Callable[[float], float | tuple[float, float]], grid: Sequence[float] = LAM_GRID,
                  max_drop: float = 0.01) -> LamSweep:
    """The largest lambda of ``grid`` (ascending; 0 is added when missing) before the first one whose
    accuracy falls below accuracy(0) - max_drop; the lambdas after that failure are not evaluated.

    ``accuracy_of(lam)`` returns the validation accuracy, or (validation, fit-split) accuracies: then
    both must stay within ``max_drop`` of their lambda-0 values."""
    lams = sorted({0.0, *(float(x) for x in grid)})
    if lams[0] < 0 or not all(math.isfinite(x) for x in lams):
        raise PruneLimitError(f"the lambda grid must hold finite numbers >= 0, got {list(grid)}")
    if not 0.0 <= max_drop < 1.0:
        raise PruneLimitError(f"max_dense_drop must be a fraction in [0, 1), got {max_drop}")
    base, base_fit = _pair(accuracy_of(0.0))
    sweep = LamSweep(chosen=0.0, baseline_accuracy=base, max_drop=float(max_drop), lams=[0.0], accuracies=[base],
                     fit_accuracies=[base_fit], baseline_fit_accuracy=base_fit)
    for lam in lams[1:]:
        acc, fit = _pair(accuracy_of(lam))
        sweep.lams.append(lam)
        sweep.accuracies.append(acc)
        sweep.fit_accuracies.append(fit)
        fit_fails = fit is not None and base_fit is not None and fit < base_fit - max_drop - 1e-12
        if acc < sweep.bar - 1e-12 or fit_fails:
            break
        sweep.chosen = lam
    return sweep


class _Indexed(Dataset):
    """``dataset`` restricted to ``indices``, with the fast batch path of :func:`dataset_batch`."""

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, idx: torch.Tensor):
        return dataset_batch(self.dataset, self.indices[idx])

    def __getitem__(self, i: int):
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]


def validation_split(dataset: Dataset, seed: int, fraction: float = VALIDATION_FRACTION) -> tuple[Dataset, Dataset]:
    """(fit, validation): a seeded split of ``dataset``, stratified by label when every class has 2+ samples."""
    from sklearn.model_selection import train_test_split

    labels = dataset_batch(dataset, torch.arange(len(dataset)))[1].numpy()
    stratify = labels if np.bincount(labels).min(initial=2) >= 2 else None
    fit, val = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=stratify)
    if len(fit) == 0 or len(val) == 0:
        raise PruneLimitError(f"--lam auto needs a training set large enough for a validation split, got {len(labels)}")
    return _Indexed(dataset, np.sort(fit)), _Indexed(dataset, np.sort(val))


def sweep_epochs(cfg) -> int:
    """Epochs per swept lambda: ``lam_sweep_epochs``, else the run's epochs capped at :data:`MAX_SWEEP_EPOCHS`."""
    return int(cfg.lam_sweep_epochs) if cfg.lam_sweep_epochs is not None else min(int(cfg.epochs), MAX_SWEEP_EPOCHS)


def sweep_lambda(ctx, grid: Sequence[float] = LAM_GRID) -> LamSweep:
    """The sweep of ``--lam auto`` for the run of ``ctx`` (a :class:`~prunelimit.context.Context`)."""
    from .context import EVAL_BATCH_SIZE, loss_fn
    from .regularize import evaluate, train_l1

    cfg, bundle = ctx.config, ctx.bundle
    fit, val = validation_split(bundle.train, cfg.seed)
    val_batches = BatchIterable(val, EVAL_BATCH_SIZE, device=ctx.device)
    fit_batches = BatchIterable(fit, EVAL_BATCH_SIZE, device=ctx.device)
    epochs = sweep_epochs(cfg)
    start = time.perf_counter()

    def accuracy_of(lam: float) -> float:
        model = ctx.build_model(bundle.in_shape, bundle.num_classes)
        train_l1(model, loss_fn(), fit, lam, epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                 batch_size=cfg.batch_size, schedule=cfg.schedule, seed=cfg.seed, device=ctx.device, progress=False,
                 augment=bundle.augment if cfg.augment else None)
        acc = evaluate(model, loss_fn(), val_batches, ctx.device)[0]
        fit_acc = evaluate(model, loss_fn(), fit_batches, ctx.device)[0]
        ctx.log(f"lam sweep: lam = {lam:g}: validation accuracy {acc:.4f}, fit-split accuracy {fit_acc:.4f}")
        return acc, fit_acc

    sweep = select_lambda(accuracy_of, grid, cfg.max_dense_drop)
    sweep.epochs, sweep.validation_size, sweep.seconds = epochs, len(val), time.perf_counter() - start
    ctx.log(f"lam sweep: chose lam = {sweep.chosen:g} (validation accuracy >= {sweep.bar:.4f}; {len(sweep.lams)} "
            f"lambdas x {epochs} epochs, {sweep.seconds:.0f} s)")
    return sweep
