"""The one training loop: any registered MIL model, one fold (spec §3).

Recipe: cross-entropy on bag labels via ``model.loss`` (so auxiliary losses of
DSMIL/CLAM count), AdamW, one bag per forward pass with optional gradient
accumulation, early stopping on the validation loss (patience, never before
``min_epochs``), the best model kept as a checkpoint directory.

Monitoring: with a validation set the monitored quantity is its
cross-entropy (of the probabilities averaged over ``eval_repeats`` seeded
passes; class-weighted when ``class_weights`` is on); without one (``dataset_val``
empty or ``None``) it is the epoch's mean training loss. :func:`mmil.crossval.cross_validate`
always carves a validation set from each training fold.

Reproducibility and resumption: every random choice is a pure function of
``(seed, epoch, step)``: the initial weights (``seed``), the bag order of an
epoch, the global torch RNG (re-seeded at the start of every epoch, for
dropout) and the ``seed`` passed to each forward pass (grouping, masking). So
the state saved after each epoch (``last_state.safetensors``: model and
optimizer tensors, the rest as JSON metadata in the same file, written
atomically) is all a resumed run needs to continue exactly where an
interrupted one stopped: same seed -> same weights, killed or not.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import WEIGHTS_NAME, save_checkpoint
from .config import TrainConfig
from .data.dataset import KIND_BENCHMARK, BagDataset, feature_moments
from .errors import MMILInputError
from .evaluate import classification_metrics, forward_bag, json_safe, predict_probs, resolve_device
from .io import atomic_path, write_text
from .models import create_model

LAST_STATE_NAME = "last_state.safetensors"
CHECKPOINT_DIRNAME = "checkpoint"
#: Options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("epochs", "progress", "device", "num_workers")


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


@dataclass
class EarlyStopping:
    """CLAM-style early stopping on a loss.

    After epoch ``e`` (1-based) with loss ``l``: if ``l < best_loss`` the epoch
    becomes the best and the counter resets, else the counter grows by one.
    Training stops when ``counter >= patience`` and ``e >= min_epochs``.
    """

    patience: int
    min_epochs: int
    best_loss: float = float("inf")
    best_epoch: int = 0
    counter: int = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record ``loss`` of ``epoch``; return True when it is a new best."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.counter = float(loss), int(epoch), 0
            return True
        self.counter += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return self.counter >= self.patience and epoch >= self.min_epochs

    def to_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "counter": self.counter}


def derived_seed(*parts: int) -> int:
    """A 31-bit seed determined by ``parts`` (NumPy's ``SeedSequence`` hash)."""
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0] % (2**31 - 1))


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


def resolve_standardize(cfg: TrainConfig, dataset: BagDataset) -> bool:
    """``cfg.standardize``, or automatically: on for MIL-benchmark CSV features."""
    return bool(cfg.standardize) if cfg.standardize is not None else dataset.kind == KIND_BENCHMARK


def _identity(items):
    return items


def _fingerprint(model_name: str, model_kwargs: dict, cfg: TrainConfig, train_ids: list[str], val_ids: list[str]) -> dict[str, Any]:
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"model": model_name, "model_kwargs": model_kwargs, "train": recipe, "train_ids": train_ids, "val_ids": val_ids}, default=str))


def _save_last_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], standardization) -> None:
    """Model + optimizer tensors and JSON metadata in one safetensors file, atomically."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    if standardization is not None:
        tensors["standardize/mean"] = torch.from_numpy(standardization[0])
        tensors["standardize/std"] = torch.from_numpy(standardization[1])
    meta = dict(meta, optimizer_param_groups=opt["param_groups"], optimizer_scalars=scalars)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})


def _load_last_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise MMILInputError(f"{path}: unreadable resume state ({err}); delete it to restart this fold from scratch") from None
    return tensors, meta


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise MMILInputError(f"{path}: resume state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); delete it to restart")
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, key = k.split("/", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, scalars in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})


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
    """
    out_dir = Path(out_dir)
    dataset_train.require_labels("training")
    n_classes = dataset_train.n_classes
    if dataset_val is not None and len(dataset_val) == 0:
        dataset_val = None
    if dataset_val is not None:
        _check_labelled(dataset_val)
    kwargs = {k: v for k, v in model_kwargs.items() if k not in ("in_dim", "n_classes")}
    device = resolve_device(cfg.device)
    weights = class_weight_vector(dataset_train.labels, n_classes) if cfg.class_weights else None

    torch.manual_seed(cfg.seed)
    try:
        model = create_model(model_name, in_dim=dataset_train.in_dim, n_classes=n_classes, **kwargs)
    except TypeError as err:
        raise MMILInputError(f"{err}; check the model options") from None
    full_kwargs = dict(getattr(model, "init_kwargs", None) or {"in_dim": dataset_train.in_dim, "n_classes": n_classes, **kwargs})
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience, cfg.min_epochs)
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds, stopped_early = 1, 0.0, False
    standardization = None
    fingerprint = _fingerprint(model_name, full_kwargs, cfg, dataset_train.slide_ids, [] if dataset_val is None else dataset_val.slide_ids)

    state_path = out_dir / LAST_STATE_NAME
    ckpt_dir = out_dir / CHECKPOINT_DIRNAME
    if state_path.is_file():
        tensors, meta = _load_last_state(state_path)
        if meta.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if meta.get("fingerprint", {}).get(k) != fingerprint[k])
            raise MMILInputError(f"{state_path}: written by a run with other settings (differs in: {', '.join(changed)}); use a fresh output directory or delete it to restart")
        if not (ckpt_dir / WEIGHTS_NAME).is_file():
            raise MMILInputError(f"{ckpt_dir}: best checkpoint missing beside the resume state; delete {state_path} to restart this fold")
        _restore(model, optimizer, tensors, meta, state_path)
        if "standardize/mean" in tensors:
            standardization = (tensors["standardize/mean"].numpy(), tensors["standardize/std"].numpy())
        start_epoch = int(meta["epoch"]) + 1
        train_seconds = float(meta["train_seconds"])
        history = list(meta["history"])
        stopped_early = bool(meta["stopped_early"])
        stopper = EarlyStopping(cfg.patience, cfg.min_epochs, **meta["early_stopping"])
    elif resolve_standardize(cfg, dataset_train):
        standardization = feature_moments(dataset_train)
    monitor = "val_loss" if dataset_val is not None else "train_loss"

    def result() -> FoldTrainResult:
        return FoldTrainResult(ckpt_dir, stopper.best_epoch, start_epoch - 1, train_seconds, history, stopped_early, stopper.best_loss, monitor, standardization)

    if stopped_early or start_epoch > cfg.epochs:
        return result()

    if standardization is not None:
        dataset_train = dataset_train.with_standardization(*standardization)
        dataset_val = None if dataset_val is None else dataset_val.with_standardization(*standardization)
    ckpt_extra = {
        "train": cfg.to_dict(),
        "class_names": dataset_train.class_names,
        "standardize": None if standardization is None else {"mean": standardization[0].tolist(), "std": standardization[1].tolist()},
        "monitor": monitor,
        **(extra or {}),
    }

    from tqdm.auto import tqdm

    show = cfg.progress and sys.stderr.isatty()
    n = len(dataset_train)
    epoch_bar = tqdm(range(start_epoch, cfg.epochs + 1), initial=start_epoch - 1, total=cfg.epochs, desc=f"training {model_name}", disable=not show, leave=False)
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        torch.manual_seed(derived_seed(cfg.seed, epoch, 1))
        order = np.random.default_rng(derived_seed(cfg.seed, epoch, 2)).permutation(n)
        loader = torch.utils.data.DataLoader(dataset_train, batch_size=None, sampler=order.tolist(), num_workers=cfg.num_workers, collate_fn=_identity)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        losses, correct = [], 0
        for step, bag in enumerate(tqdm(loader, total=n, desc=f"epoch {epoch}", disable=not show, leave=False)):
            group_start = (step // cfg.accumulate) * cfg.accumulate
            group_size = min(cfg.accumulate, n - group_start)
            out = forward_bag(model, bag, device=device, seed=derived_seed(cfg.seed, epoch, 3, step), precision=cfg.precision)
            target = torch.tensor([bag.label], device=device)
            loss = model.loss(out, target, weights)
            if not torch.isfinite(loss):
                raise MMILInputError(f"non-finite training loss at epoch {epoch} on bag {bag.slide_id!r}; lower --lr or use --precision fp32")
            (loss / group_size).backward()
            if step - group_start + 1 == group_size:
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            correct += int(out.logits.argmax(-1).item() == bag.label)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "train_accuracy": correct / n}
        if dataset_val is not None:
            probs = predict_probs(model, dataset_val, seed=derived_seed(cfg.seed, 4), repeats=cfg.eval_repeats, device=device, precision=cfg.precision).mean(0)
            w = None if weights is None else weights.numpy()
            record["val_loss"] = nll_of_probs(probs, dataset_val.labels, w)
            m = classification_metrics(dataset_val.labels, probs)
            record["val_auc"], record["val_accuracy"] = m["auc"], m["accuracy"]
        monitored = record[monitor]
        train_seconds += time.perf_counter() - t0
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if stopper.update(epoch, monitored):
            save_checkpoint(ckpt_dir, model, model_name, full_kwargs, dict(ckpt_extra, epoch=epoch, **{monitor: monitored}))
        stopped_early = stopper.should_stop(epoch)
        start_epoch = epoch + 1
        meta = {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "train_seconds": train_seconds,
            "history": history,
            "stopped_early": stopped_early,
            "early_stopping": stopper.to_dict(),
        }
        _save_last_state(state_path, model, optimizer, meta, standardization)
        epoch_bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("train_loss", "val_loss", "val_auc") and v is not None and not math.isnan(v)})
        if callback is not None:
            callback(record)
        if stopped_early:
            break
    epoch_bar.close()
    write_text(out_dir / "history.json", json.dumps(json_safe(history), indent=1) + "\n")
    return result()


def _check_labelled(ds: BagDataset) -> None:
    if (ds.labels < 0).any():
        raise MMILInputError(f"{ds.source}: validation slides without a label; every validation slide needs one")
