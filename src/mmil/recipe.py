"""Parts of the training recipe (``docs/method/mmil.md`` §3): learning-rate schedule, bag augmentation, model selection.

Pure functions and one small state machine, so that each has closed-form tests:

* :func:`lr_factor`: linear warm-up, then constant or cosine decay, as a factor of the base rate.
* :func:`augment_bag`: per-step instance dropout (a random subset of the bag's instances, stored
  order kept) and Gaussian feature noise scaled by the bag's per-feature standard deviation.
* :func:`mix_in_negative`, :func:`negative_donors`: a training bag with a negative bag's instances inserted
  (negative mixing: what a whole slide shares stops predicting its label).
* :func:`pseudo_bags`: a bag split at random into K disjoint pseudo-bags that carry its label (DTFD-MIL's tier 1).
* :func:`epoch_order`: the bags of an epoch, shuffled, or drawn class-balanced.
* :func:`average_weights`, :func:`weights_swapped`: an exponential moving average of the weights over
  epochs, validated and kept in place of the last epoch's weights.
* :class:`ModelSelector`: which epoch's weights to keep and when to stop (see its docstring).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch

from .data.bags import Bag
from .errors import MMILInputError

SCHEDULES = ("constant", "cosine")
SELECTIONS = ("auc", "loss")
#: Cosine decay ends at this fraction of the base learning rate.
MIN_LR_FACTOR = 0.01
#: Two smoothed AUCs closer than this are a tie (broken by the validation loss).
AUC_TIE = 1e-9


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant", min_factor: float = MIN_LR_FACTOR) -> float:
    """Factor of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Then ``constant``: 1;
    ``cosine``: ``m + (1 - m) (1 + cos(pi t)) / 2`` with ``t = (step - W) / (total - W)``
    (1 at the end of the warm-up, ``m = min_factor`` at ``total_steps``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def kept_instances(n: int, drop: float) -> int:
    """Instances kept by :func:`augment_bag` from a bag of ``n``: ``max(1, ceil(n (1 - drop)))``."""
    return max(1, math.ceil(n * (1.0 - drop))) if n > 0 else 0


def augment_bag(bag: Bag, seed: int, instance_dropout: float = 0.0, feature_noise: float = 0.0) -> Bag:
    """A training-time copy of ``bag`` (the bag itself is not changed).

    ``instance_dropout``: keep :func:`kept_instances` instances, a uniformly random subset in
    stored order (coords and groups follow). ``feature_noise``: add ``sigma * s_j * e`` to
    feature j, ``e`` standard normal, ``s_j`` the bag's standard deviation of feature j
    (population formula), so the noise is in the features' own units. Draws come from a
    generator seeded by ``seed``.
    """
    if instance_dropout <= 0 and feature_noise <= 0:
        return bag
    g = torch.Generator().manual_seed(int(seed))
    x, coords, groups = bag.features, bag.coords, bag.groups
    n = x.shape[0]
    if instance_dropout > 0 and n > 1:
        kept = take_instances(bag, torch.randperm(n, generator=g)[: kept_instances(n, instance_dropout)])
        x, coords, groups = kept.features, kept.coords, kept.groups
    if feature_noise > 0 and x.shape[0] > 1:
        scale = x.float().std(dim=0, unbiased=False)
        x = x + feature_noise * scale * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return replace(bag, features=x, coords=coords, groups=groups)


def negative_donors(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Indices of the training bags negative mixing draws from: those of class 0, the negative class.

    Raises :class:`MMILInputError` unless there are two classes and at least two negative bags (a negative bag is
    mixed with another one, never with itself)."""
    if n_classes != 2:
        raise MMILInputError(f"--negative-mix needs two classes (class 0 = negative), the data have {n_classes}; set it to 0")
    donors = np.flatnonzero(np.asarray(labels) == 0)
    if len(donors) < 2:
        raise MMILInputError(f"--negative-mix needs at least two negative (class 0) training bags, there are {len(donors)}; set it to 0")
    return donors


def pick_donor(donors: np.ndarray, index: int, seed: int) -> int:
    """A uniformly random element of ``donors`` other than ``index`` (generator seeded by ``seed``)."""
    others = donors[donors != index]
    return int(others[np.random.default_rng(int(seed)).integers(len(others))])


def mix_in_negative(bag: Bag, donor: Bag, fraction: float, seed: int) -> Bag:
    """``bag`` with ``k = round(fraction * n)`` instances of the negative bag ``donor`` inserted at random positions.

    The ``k`` donor instances are a uniformly random subset of its ``m`` instances (drawn with replacement when
    ``k > m``), in stored order; the bag's own ``n`` instances all stay, in stored order, and the ``k`` insertion
    slots among the ``n + k`` are uniformly random. Coords and groups are merged the same way (``None`` unless both
    bags have them). Under the standard MIL assumption (a bag is positive iff it holds a positive instance) the
    label stays right for either class. What changes is what all of a slide's instances share (stain, tissue mix):
    positive bags now also carry negative slides' background, so that it no longer tells the classes apart (what an
    attention pool memorises on a small cohort; measured a partial help on setting B, docs/benchmarks.md).
    """
    n, m = bag.num_instances, donor.num_instances
    k = round(fraction * n)
    if k == 0 or m == 0:
        return bag
    g = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(m, generator=g)[:k].sort().values if k <= m else torch.randint(m, (k,), generator=g).sort().values
    slots = torch.zeros(n + k, dtype=torch.bool)
    slots[torch.randperm(n + k, generator=g)[:k]] = True

    def merged(own: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
        if own is None or other is None:
            return None
        out = own.new_empty((n + k, *own.shape[1:]))
        out[~slots], out[slots] = own, other[picked].to(own.dtype)
        return out

    return replace(bag, features=merged(bag.features, donor.features), coords=merged(bag.coords, donor.coords),
                   groups=merged(bag.groups, donor.groups))


def pseudo_bags(bag: Bag, k: int, seed: int) -> list[Bag]:
    """``bag`` split into ``min(k, n)`` disjoint pseudo-bags that each carry its label (DTFD-MIL).

    A uniformly random permutation of the ``n`` instances (generator seeded by ``seed``) is cut
    into parts of ``floor(n / k)`` or ``ceil(n / k)`` instances; each part keeps the stored order
    (coords and groups follow). ``k = 1`` returns ``[bag]``. A positive bag's tumour may miss a
    part, which then carries a wrong label: the reason DTFD-MIL distils, and the reason this is off by default.
    """
    n = bag.features.shape[0]
    if k <= 1 or n <= 1:
        return [bag]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return [take_instances(bag, idx) for idx in torch.tensor_split(order, min(k, n))]


def take_instances(bag: Bag, index: torch.Tensor) -> Bag:
    """The instances ``index`` of ``bag`` in stored order (coords and groups follow)."""
    index = index.sort().values
    return replace(bag, features=bag.features[index], coords=None if bag.coords is None else bag.coords[index],
                   groups=None if bag.groups is None else bag.groups[index])


def epoch_order(labels, rng, balanced: bool = False):
    """Indices of the bags of one epoch, as many as there are bags.

    ``balanced=False``: a permutation. ``balanced=True``: ``n`` draws with replacement with
    ``P(i) = 1 / (K n_{y_i})`` (K classes present, ``n_c`` bags of class c), so every class is drawn
    with probability ``1 / K`` per step whatever its share (CLAM's weighted sampler).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not balanced:
        return rng.permutation(n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    p = 1.0 / (len(counts) * counts[inverse])
    return rng.choice(n, size=n, replace=True, p=p / p.sum())


def average_weights(average: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """The moving average of the weights after an epoch: ``a_1 = w_1``, ``a_e = decay a_(e-1) + (1 - decay) w_e``.

    Floating tensors are averaged; integer ones (batch-norm counters) take the epoch's value. New
    tensors are returned; ``state`` (a model's ``state_dict()``) is not changed.
    """
    if average is None:
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: torch.lerp(average[k].to(v.dtype), v.detach(), 1.0 - decay) if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


@contextlib.contextmanager
def weights_swapped(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> Iterator[torch.nn.Module]:
    """``model`` holding ``state`` inside the block (its own weights are restored after); ``None``: unchanged."""
    if state is None:
        yield model
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        yield model
    finally:
        model.load_state_dict(own)


@dataclass
class ModelSelector:
    """Keeps the best epoch by a validation criterion and decides when to stop.

    ``criterion`` (higher is better) and ``tiebreak`` (higher is better) per epoch: for
    ``selection="auc"`` the validation AUC averaged over the last ``window`` epochs and minus the
    validation loss; for ``"loss"`` minus the loss (the recipe before issue 10) and no tie-break.
    Epoch ``e`` replaces the best epoch ``b`` when

    * ``b < min_epoch <= e`` (an early best is challenged): ``criterion_e >= criterion_b - margin``,
      i.e. an epoch before ``min_epoch`` is kept only if it is better than every later one by more
      than ``margin``;
    * otherwise: ``criterion_e > criterion_b + tol``, or ``|criterion_e - criterion_b| <= tol`` and
      ``tiebreak_e > tiebreak_b`` (``tol`` = 1e-9 for AUC, 0 for the loss).

    Stopping: after ``patience`` epochs without a new best, once ``epoch >= min_epochs`` (CLAM's
    convention) and ``criterion_b >= floor`` (:func:`chance_auc_bound`: a run whose best epoch is no
    better than chance has not started learning, and trains on). With ``selection="loss"``,
    ``min_epoch = 1`` and no floor this is exactly the old rule.
    """

    patience: int
    min_epochs: int
    min_epoch: int = 1
    margin: float = 0.0
    tol: float = 0.0
    floor: float = -math.inf
    best_criterion: float = -math.inf
    best_tiebreak: float = -math.inf
    best_epoch: int = 0
    counter: int = 0
    best_loss: float = math.inf

    def better(self, epoch: int, criterion: float, tiebreak: float) -> bool:
        """Whether epoch ``epoch`` with these values replaces the current best (see the class docstring)."""
        if self.best_epoch == 0:
            return True
        if self.best_epoch < self.min_epoch <= epoch:
            return criterion >= self.best_criterion - self.margin
        if criterion > self.best_criterion + self.tol:
            return True
        return abs(criterion - self.best_criterion) <= self.tol and tiebreak > self.best_tiebreak

    def update(self, epoch: int, criterion: float, tiebreak: float = -math.inf, loss: float = math.nan) -> bool:
        """Record an epoch; return True when it is the new best (its weights are to be kept)."""
        if self.better(epoch, criterion, tiebreak):
            self.best_criterion, self.best_tiebreak, self.best_epoch, self.counter = float(criterion), float(tiebreak), int(epoch), 0
            self.best_loss = float(loss)
            return True
        self.counter += 1
        return False

    def patience_spent(self, epoch: int) -> bool:
        """``patience`` epochs without a new best, and ``epoch >= min_epochs``: the stop rule before the floor."""
        return self.counter >= self.patience and epoch >= self.min_epochs

    def should_stop(self, epoch: int) -> bool:
        return self.patience_spent(epoch) and self.best_criterion >= self.floor

    def waiting_for_signal(self, epoch: int) -> bool:
        """Whether the stop rule would end the run at ``epoch`` but for the floor."""
        return self.patience_spent(epoch) and self.best_criterion < self.floor

    def to_dict(self) -> dict[str, Any]:
        return {"best_criterion": self.best_criterion, "best_tiebreak": self.best_tiebreak, "best_epoch": self.best_epoch,
                "counter": self.counter, "best_loss": self.best_loss}


def chance_auc_bound(labels: np.ndarray, z: float = 1.645) -> float:
    """The validation AUC an uninformed model exceeds by chance with probability about ``Phi(-z)`` (5 % for 1.645).

    Under H0 (scores independent of the labels, no ties) the Mann-Whitney AUC of ``n1`` positives and ``n0``
    negatives has mean 1/2 and variance ``(n1 + n0 + 1) / (12 n1 n0)``; the bound is
    ``1/2 + z sqrt((n + 1) / (12 n_k (n - n_k)))`` with ``n_k`` the smallest class (one-vs-rest: for more than two
    classes the largest of the per-class variances, so the bound is conservative). ``-inf`` (no floor) when a class
    is missing: the AUC is undefined and selection falls back to the loss.
    """
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    if counts.size < 2:
        return -math.inf
    n, n_k = int(counts.sum()), int(counts.min())
    return 0.5 + z * math.sqrt((n + 1) / (12 * n_k * (n - n_k)))


def signal_floor(labels: np.ndarray) -> tuple[float, str | None]:
    """``(floor, note)`` of the wait rule: :func:`chance_auc_bound` of the validation labels, or ``-inf`` with a note
    saying why when the bound exceeds 1. No AUC (at most 1) can then beat chance: a validation set that small (3 slides
    of which 1 positive: bound 1.17) carries no signal to wait for, and waiting would train every run to ``epochs``."""
    bound = chance_auc_bound(labels)
    if bound <= 1.0:
        return bound, None
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return -math.inf, (f"train.wait_for_signal off for this fold: its {int(counts.sum())} validation slides "
                       f"({int(counts.min())} in the smallest class) cannot show an AUC above chance ({bound:.2f} needed)")


def epoch_criterion(selection: str, history: list[dict[str, Any]], monitor: str, window: int) -> tuple[float, float, float]:
    """``(criterion, tiebreak, loss)`` of the last epoch in ``history`` for :class:`ModelSelector`.

    ``selection="auc"`` with a validation set: the mean validation AUC of the last ``window``
    epochs (fewer at the start; an undefined AUC falls back to the loss rule) and minus the loss.
    Otherwise minus the monitored loss.
    """
    loss = float(history[-1][monitor])
    if selection == "auc" and monitor == "val_loss":
        recent = [h.get("val_auc") for h in history[-max(1, window):]]
        recent = [float(a) for a in recent if a is not None and math.isfinite(a)]
        if recent and math.isfinite(float(history[-1].get("val_auc", math.nan))):
            return sum(recent) / len(recent), -loss, loss
    return -loss, -math.inf, loss
