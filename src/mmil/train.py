"""The one training loop: any registered MIL model, one fold (``docs/method/mmil.md`` §3).

Recipe: cross-entropy on bag labels via ``model.loss`` (so auxiliary losses of
DSMIL/CLAM count), AdamW, one bag per forward pass with optional gradient
accumulation, bag augmentation, warm-up and cosine decay, gradient clipping
(:mod:`mmil.recipe`), early stopping (patience, never before ``min_epochs``),
the best model by :class:`mmil.recipe.ModelSelector` kept as a checkpoint directory.

Monitoring: with a validation set, the smoothed validation AUC with the
validation cross-entropy as tie-break (``selection="auc"``) or the cross-entropy
alone (``"loss"``; probabilities averaged over ``eval_repeats`` seeded passes;
class-weighted when ``class_weights`` is on); without one (``dataset_val``
empty or ``None``) the epoch's mean training loss. :func:`mmil.crossval.cross_validate`
always carves a validation set from each training fold.

Reproducibility and resumption: every random choice is a pure function of
``(seed, epoch, step)``: the initial weights (``seed``), the bag order of an
epoch, the global torch RNG (re-seeded at the start of every epoch, for
dropout, on a private copy that is restored when the fold returns) and the
``seed`` passed to each forward pass (grouping, masking). So the state saved
after each epoch (:mod:`mmil.train_state`) is all a resumed run needs to
continue exactly where an interrupted one stopped: same seed -> same weights,
killed or not.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mmpl.jsonio import write_json
from mmpl.progress import progress, progress_bar
from torch import nn

from . import ddp
from .checkpoint import WEIGHTS_NAME, save_checkpoint
from .config import TrainConfig
from .data.bags import Bag
from .data.dataset import KIND_BENCHMARK, BagDataset, feature_moments
from .errors import MMILInputError
from .evaluate import classification_metrics, forward_bag, predict_probs, resolve_device
from .models import create_model
from .recipe import (ModelSelector, augment_bag, average_weights, epoch_criterion, epoch_order, lr_factor, mix_in_negative,
                     negative_donors, pick_donor, pseudo_bags, signal_floor, weights_swapped)
from .rng import derived_seed, private_rng, seed_global_rng  # noqa: F401 - derived_seed re-exported
from .train_log import EpochLog
from .train_state import (  # noqa: F401 - LAST_STATE_NAME and RESUMABLE_CHANGES re-exported
    LAST_STATE_NAME,
    RESUMABLE_CHANGES,
    check_fingerprint,
    fingerprint,
    load_last_state,
    restore,
    save_last_state,
    saved_average,
)

CHECKPOINT_DIRNAME = "checkpoint"


@dataclass
class FoldTrainResult:
    """Outcome of :func:`train_fold`.

    Attributes:
        checkpoint_dir: the best model (lowest monitored loss).
        best_epoch: 1-based epoch of the best model.
        epochs_run: epochs completed (including those of an interrupted run).
        train_seconds: wall time spent training, summed over resumptions.
        history: one dict per epoch (``epoch, train_loss, train_accuracy,
            val_loss, val_auc, val_accuracy, seconds``).
        stopped_early: True when early stopping ended the run.
        best_loss: the monitored loss at ``best_epoch``.
        monitor: ``"val_loss"`` or ``"train_loss"``.
        standardization: ``(mean, std)`` applied to the features, or ``None``.
    """

    checkpoint_dir: Path
    best_epoch: int
    epochs_run: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    best_loss: float = float("inf")
    monitor: str = "val_loss"
    standardization: tuple[np.ndarray, np.ndarray] | None = None


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on torch's fused kernel where it has one for the parameters' device (CPU since torch 2.4, CUDA),
    else its ``foreach`` path: the same update, 3.5-4.5x faster than the per-tensor loop on a CPU (issue 12)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def class_weight_vector(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``w_k = n / (K * n_k)`` (scikit-learn's "balanced")."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [k for k in range(n_classes) if counts[k] == 0]
        raise MMILInputError(f"class(es) {missing} have no training bag; class weights are undefined")
    return torch.tensor(len(labels) / (n_classes * counts), dtype=torch.float32)


def nll_of_probs(probs: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Cross-entropy of probabilities: ``sum_i w_{y_i} (-log p_i[y_i]) / sum_i w_{y_i}``
    (``w = 1`` without weights; probabilities clipped at 1e-12)."""
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y], 1e-12, None)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)[y]
    return float((w * -np.log(p)).sum() / w.sum())


def resolve_centering(cfg: TrainConfig, dataset: BagDataset) -> bool:
    """``cfg.center_slides`` as a yes/no for ``dataset``: auto = on except for MIL-benchmark CSV features."""
    return cfg.center_slides == "median" or (cfg.center_slides == "auto" and dataset.kind != KIND_BENCHMARK)


def resolve_standardize(cfg: TrainConfig, dataset: BagDataset) -> bool:
    """``cfg.standardize``, or automatically: on for MIL-benchmark CSV features."""
    return bool(cfg.standardize) if cfg.standardize is not None else dataset.kind == KIND_BENCHMARK


def _identity(items):
    return items


def _skip_loader_draws(count: int = 2) -> None:
    """Advance the global RNG past the DataLoader base seeds earlier versions drew from it.

    Each DataLoader iterator draws one int64 base seed from its generator. The loader of an
    epoch has its own generator, so how many iterators a progress bar opens (tqdm's asyncio
    wrapper opens one of its own) no longer moves the dropout stream; earlier versions drew
    two base seeds from the global RNG per epoch, and skipping them keeps every seed's
    weights what they were.
    """
    for _ in range(count):
        torch.empty((), dtype=torch.int64).random_()


@dataclass
class _FoldState:
    """What the epochs change, and the resume state restores."""

    stopper: ModelSelector
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 1
    train_seconds: float = 0.0
    stopped_early: bool = False
    standardization: tuple[np.ndarray, np.ndarray] | None = None
    average: dict[str, torch.Tensor] | None = None  # the weights' moving average (cfg.weight_average > 0)


class _FoldTrainer:
    """One fold's model, optimizer and state; :meth:`run` trains it epoch by epoch (see :func:`train_fold`)."""

    def __init__(self, dataset_train: BagDataset, dataset_val: BagDataset | None, model_name: str, model_kwargs: dict[str, Any],
                 cfg: TrainConfig, out_dir: Path, device: torch.device, extra: dict[str, Any] | None):
        self.train_set, self.val_set, self.model_name, self.cfg, self.device = dataset_train, dataset_val, model_name, cfg, device
        self.state_path, self.ckpt_dir = out_dir / LAST_STATE_NAME, out_dir / CHECKPOINT_DIRNAME
        self.weights = class_weight_vector(dataset_train.labels, dataset_train.n_classes) if cfg.class_weights else None
        self.donors = negative_donors(dataset_train.labels, dataset_train.n_classes) if cfg.negative_mix > 0 else None
        kwargs = {k: v for k, v in model_kwargs.items() if k not in ("in_dim", "n_classes")}
        seed_global_rng(cfg.seed, device)
        try:
            self.model = create_model(model_name, in_dim=dataset_train.in_dim, n_classes=dataset_train.n_classes, **kwargs)
        except TypeError as err:
            raise MMILInputError(f"{err}; check the model options") from None
        self.full_kwargs = dict(self.model.init_kwargs)
        self.model.to(device)
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
        val_ids = [] if dataset_val is None else dataset_val.slide_ids
        self.fingerprint = fingerprint(model_name, self.full_kwargs, cfg, dataset_train.slide_ids, val_ids)
        self.monitor = "val_loss" if dataset_val is not None else "train_loss"
        self.state = self._resume_or_start()
        self.extra = extra
        # Data-parallel under torchrun with --workers 1 (mmil.ddp); with --workers K each rank trains its own folds.
        self.rank, self.world = ddp.rank_world() if cfg.workers == 1 else (0, 1)
        self.net = ddp.wrap_model(self.model, device) if self.world > 1 else self.model

    def _resume_or_start(self) -> _FoldState:
        """The saved state of an interrupted run (after checking it is this run's), or a fresh one."""
        cfg = self.cfg
        if not self.state_path.is_file():
            standardization = feature_moments(self.train_set) if resolve_standardize(cfg, self.train_set) else None
            return _FoldState(self._selector(), standardization=standardization)
        tensors, meta = load_last_state(self.state_path)
        check_fingerprint(self.state_path, meta, self.fingerprint)
        if not (self.ckpt_dir / WEIGHTS_NAME).is_file():
            raise MMILInputError(f"{self.ckpt_dir}: best checkpoint missing beside the resume state; delete {self.state_path} to restart this fold")
        restore(self.model, self.optimizer, tensors, meta, self.state_path)
        standardization = (tensors["standardize/mean"].numpy(), tensors["standardize/std"].numpy()) if "standardize/mean" in tensors else None
        return _FoldState(self._selector(**meta["early_stopping"]), list(meta["history"]), int(meta["epoch"]) + 1,
                          float(meta["train_seconds"]), bool(meta["stopped_early"]), standardization, saved_average(tensors, self.device))

    def _selector(self, **state: Any) -> ModelSelector:
        """The model-selection rule of the recipe (``state``: a resumed run's saved values)."""
        cfg = self.cfg
        auc = cfg.selection == "auc" and self.monitor == "val_loss"
        floor, self.floor_note = signal_floor(self.val_set.labels) if auc and cfg.wait_for_signal else (-math.inf, None)
        return ModelSelector(cfg.patience, cfg.min_epochs, cfg.select_min_epoch, cfg.select_margin if auc else 0.0,
                             1e-9 if auc else 0.0, floor, **state)

    def _set_lr(self, epoch: int, step: int) -> None:
        """The scheduled learning rate of the optimiser step that ``step`` of ``epoch`` belongs to."""
        cfg, acc = self.cfg, self.cfg.accumulate * self.world  # bags per step, over all ranks (step: position in the global order)
        per_epoch = math.ceil(-(-len(self.train_set) // self.world) * self.world / acc)
        factor = lr_factor((epoch - 1) * per_epoch + step // acc, cfg.epochs * per_epoch,
                           round(cfg.warmup_epochs * per_epoch), cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor

    def result(self) -> FoldTrainResult:
        s = self.state
        return FoldTrainResult(self.ckpt_dir, s.stopper.best_epoch, s.start_epoch - 1, s.train_seconds, s.history, s.stopped_early,
                               s.stopper.best_loss, self.monitor, s.standardization)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training bags in the epoch's order; returns the epoch's training loss and accuracy."""
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        seed_global_rng(derived_seed(cfg.seed, epoch, 1, *([self.rank] if self.rank else [])), self.device)  # dropout
        order = epoch_order(self.train_set.labels, np.random.default_rng(derived_seed(cfg.seed, epoch, 2)), cfg.balanced_sampling)
        order, positions = ddp.rank_share(order, self.rank, self.world)  # this rank's bags (all of them without torchrun)
        n = len(order)
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=None, sampler=order.tolist(), num_workers=cfg.num_workers,
                                             collate_fn=_identity, generator=torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, 5)))
        _skip_loader_draws()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        losses, correct = [], 0
        for i, bag in enumerate(progress(loader, cfg.progress and self.rank == 0, f"epoch {epoch}", total=n)):
            step = int(positions[i])
            group_start = (i // cfg.accumulate) * cfg.accumulate
            group_size = min(cfg.accumulate, n - group_start)
            last = i - group_start + 1 == group_size
            bag = self._augmented(bag, int(order[i]), epoch, step)
            loss, hit = self._bag_step(bag, epoch, step, group_size, last)
            if last:
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                self._set_lr(epoch, step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            correct += hit
        if self.world > 1:  # the epoch's loss and accuracy over every rank's bags
            total, correct, n = ddp.sum_over_ranks([float(np.sum(losses)), correct, n], self.device)
            return {"epoch": epoch, "train_loss": total / n, "train_accuracy": correct / n}
        return {"epoch": epoch, "train_loss": float(np.mean(losses)), "train_accuracy": correct / n}

    def _augmented(self, bag: Bag, index: int, epoch: int, step: int) -> Bag:
        """Training step ``step``'s copy of training bag ``index``: negative mixing, then dropout and noise (:mod:`mmil.recipe`)."""
        cfg = self.cfg
        if self.donors is not None:
            donor = self.train_set[pick_donor(self.donors, index, derived_seed(cfg.seed, epoch, 8, step))]
            bag = mix_in_negative(bag, donor, cfg.negative_mix, derived_seed(cfg.seed, epoch, 9, step))
        return augment_bag(bag, derived_seed(cfg.seed, epoch, 6, step), cfg.instance_dropout, cfg.feature_noise)

    def _bag_step(self, bag: Bag, epoch: int, step: int, group_size: int, last: bool) -> tuple[float, int]:
        """Forward and backward of one training bag, split into ``cfg.pseudo_bags`` pseudo-bags
        (:func:`mmil.recipe.pseudo_bags`) whose losses are averaged. Returns the loss and whether the
        averaged logits name the bag's class. Under DDP only the group's very last backward all-reduces."""
        cfg = self.cfg
        parts = pseudo_bags(bag, cfg.pseudo_bags, derived_seed(cfg.seed, epoch, 7, step))
        target = torch.tensor([bag.label], device=self.device)
        total, logits = 0.0, 0.0
        for j, part in enumerate(parts):
            sync = last and j == len(parts) - 1
            with self.net.no_sync() if self.world > 1 and not sync else contextlib.nullcontext():  # DDP all-reduces on the group's last bag
                out = forward_bag(self.net, part, device=self.device, seed=derived_seed(cfg.seed, epoch, 3, step, *([j] if j else [])),
                                  precision=cfg.precision)
                loss = self.model.loss(out, target, self.weights)
                if not torch.isfinite(loss):
                    raise MMILInputError(f"non-finite training loss at epoch {epoch} on bag {bag.slide_id!r}; lower --lr or use --precision fp32")
                (loss / (group_size * len(parts))).backward()
            total += float(loss.detach()) / len(parts)
            logits = logits + out.logits.detach().float()
        return total, int(logits.argmax(-1).item() == bag.label)

    def validate(self) -> dict[str, float]:
        """Validation loss (of the probabilities averaged over ``eval_repeats`` seeded passes), AUC and accuracy.

        A model whose forward reads no seed is deterministic in eval mode: one pass, not ``eval_repeats``
        identical ones (issue 12: repeats are what can make validation dominate an epoch)."""
        cfg, val = self.cfg, self.val_set
        repeats = cfg.eval_repeats if "seed" in getattr(self.model, "inputs", ("seed",)) else 1
        probs = predict_probs(self.model, val, seed=derived_seed(cfg.seed, 4), repeats=repeats, device=self.device, precision=cfg.precision).mean(0)
        m = classification_metrics(val.labels, probs)
        loss = nll_of_probs(probs, val.labels, None if self.weights is None else self.weights.numpy())
        return {"val_loss": loss, "val_auc": m["auc"], "val_accuracy": m["accuracy"]}

    def end_epoch(self, epoch: int, record: dict[str, Any], ckpt_extra: dict[str, Any]) -> None:
        """Keep the best model, decide on early stopping and save the resume state."""
        s, monitored = self.state, record[self.monitor]
        s.history.append(record)
        criterion, tiebreak, loss = epoch_criterion(self.cfg.selection, s.history, self.monitor, self.cfg.select_window)
        record["selection_criterion"] = criterion
        if s.stopper.update(epoch, criterion, tiebreak, loss) and self.rank == 0:  # only rank 0 writes
            with weights_swapped(self.model, s.average):  # the average is what was validated and is kept
                save_checkpoint(self.ckpt_dir, self.model, self.model_name, self.full_kwargs, dict(ckpt_extra, epoch=epoch, **{self.monitor: monitored}),
                                slides={"train": self.train_set.slide_ids, "val": [] if self.val_set is None else self.val_set.slide_ids})
        s.stopped_early = s.stopper.should_stop(epoch)
        s.start_epoch = epoch + 1
        meta = {"fingerprint": self.fingerprint, "epoch": epoch, "train_seconds": s.train_seconds, "history": s.history,
                "stopped_early": s.stopped_early, "early_stopping": s.stopper.to_dict()}
        if self.rank == 0:
            save_last_state(self.state_path, self.model, self.optimizer, meta, s.standardization, s.average)

    def run(self, callback: Callable[[dict[str, Any]], None] | None) -> FoldTrainResult:
        s, cfg = self.state, self.cfg
        if s.stopped_early or s.start_epoch > cfg.epochs:
            return self.result()
        std = s.standardization
        if std is not None:
            self.train_set = self.train_set.with_standardization(*std)
            self.val_set = None if self.val_set is None else self.val_set.with_standardization(*std)
        ckpt_extra = {"train": cfg.to_dict(), "class_names": self.train_set.class_names, "monitor": self.monitor,
                      "standardize": None if std is None else {"mean": std[0].tolist(), "std": std[1].tolist()},
                      "center_slides": "median" if self.train_set.centering else None, **(self.extra or {})}
        bar = progress_bar(cfg.progress and self.rank == 0, cfg.epochs, f"training {self.model_name}")
        if bar is not None:
            bar.update(s.start_epoch - 1)
        log = EpochLog(self.state_path.parent, cfg, f"{self.model_name} {self.state_path.parent.name}", s.start_epoch, enabled=self.rank == 0)
        waited = self.floor_note is not None  # nothing to wait for: say so once
        if waited:
            log.note(self.floor_note)
        for epoch in range(s.start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            record = self.train_epoch(epoch)
            if cfg.weight_average > 0:
                s.average = average_weights(s.average, self.model.state_dict(), cfg.weight_average)
            if self.val_set is not None:
                with weights_swapped(self.model, s.average):
                    record.update(self.validate())
            s.train_seconds += time.perf_counter() - t0
            record["seconds"] = time.perf_counter() - t0
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            self.end_epoch(epoch, record, ckpt_extra)
            log.epoch(s.history, s.stopper.best_epoch, last=s.stopped_early or epoch == cfg.epochs)
            if s.stopper.waiting_for_signal(epoch) and not waited and epoch < cfg.epochs:
                waited = True
                log.note(f"epoch {epoch}: early stopping deferred: the kept epoch's validation AUC {s.stopper.best_criterion:.3f} is not above "
                         f"chance ({s.stopper.floor:.3f} needed); training on, at most to epoch {cfg.epochs} (train.wait_for_signal)")
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("train_loss", "val_loss", "val_auc") and v is not None and not math.isnan(v)})
            if callback is not None:
                callback(record)
            if s.stopped_early:
                break
        if bar is not None:
            bar.close()
        log.close(s.history, s.stopper.best_epoch)
        if self.rank == 0:
            write_json(self.state_path.parent / "history.json", s.history, indent=1)
        return self.result()


def train_fold(
    dataset_train: BagDataset,
    dataset_val: BagDataset | None,
    model_name: str,
    model_kwargs: dict[str, Any],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> FoldTrainResult:
    """Train ``model_name`` on ``dataset_train``; keep the best model in ``out_dir/checkpoint/``.

    Resumes from ``out_dir/last_state.safetensors`` when present (same recipe
    required; only ``epochs``, ``progress``, ``device`` and ``num_workers`` may
    change). A run that stopped early, or reached ``cfg.epochs``, returns its
    result without training. ``callback(record)`` is called after each epoch,
    once its state is saved. ``extra`` is stored in the checkpoint config.
    Torch's global RNG is seeded on a private copy: the caller's state is left as it was.
    Under torchrun with ``cfg.workers == 1`` the fold trains data-parallel on every rank
    (:mod:`mmil.ddp`: the same steps as one process accumulating ``ranks x accumulate`` bags); only rank 0 writes.
    """
    out_dir = Path(out_dir)
    dataset_train.require_labels("training")
    if dataset_val is not None and len(dataset_val) == 0:
        dataset_val = None
    if dataset_val is not None:
        _check_labelled(dataset_val)
    device = resolve_device(cfg.device)
    with private_rng(device=device):
        return _FoldTrainer(dataset_train, dataset_val, model_name, model_kwargs, cfg, out_dir, device, extra).run(callback)


def _check_labelled(ds: BagDataset) -> None:
    if (ds.labels < 0).any():
        raise MMILInputError(f"{ds.source}: validation slides without a label; every validation slide needs one")
