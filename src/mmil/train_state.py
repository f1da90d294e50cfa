"""The resume state of one training fold: ``last_state.safetensors``, written after every epoch.

Model and optimizer tensors (and the feature standardisation) are safetensors; the rest
(epoch, history, early-stopping counters, optimizer scalars and the run's fingerprint) is
JSON metadata in the same file, written atomically. A resumed run must have the same
fingerprint: the same model, recipe (bar :data:`RESUMABLE_CHANGES`) and train/val bags.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from mmpl.fsio import atomic_path
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TrainConfig, with_legacy_fingerprint
from .errors import MMILInputError

LAST_STATE_NAME = "last_state.safetensors"
#: Prefix of the weights' moving average (``weight_average``) in the resume state.
AVERAGE_PREFIX = "average/"
#: Options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("epochs", "progress", "device", "num_workers", "workers", "log_every", "tensorboard")


def effective_precision(requested: str, device: str) -> str:
    """The precision ``requested`` runs in on ``device`` (``auto`` resolved quietly; an unknown device keeps the text)."""
    from mmpl.device import resolve_device

    from .precision import choose_precision, native_bf16

    if requested == "fp32":
        return requested
    try:
        dev = resolve_device(device)
    except Exception:  # noqa: BLE001 - the device is checked (with a clear message) before training starts
        return requested
    return choose_precision(requested, dev.type, native_bf16=native_bf16(dev))[0]


def fingerprint(model_name: str, model_kwargs: dict, cfg: TrainConfig, train_ids: list[str], val_ids: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state."""
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    if "precision" in recipe:  # what the arithmetic was, not how it was asked for: fp32 and auto-on-fp32 resume alike
        recipe["precision"] = effective_precision(cfg.precision, cfg.device)
    if getattr(cfg, "lr_schedule", "constant") != "constant":
        recipe["epochs"] = cfg.epochs  # a decaying schedule spans the epochs: changing them changes every later step
    return json.loads(json.dumps({"model": model_name, "model_kwargs": model_kwargs, "train": recipe, "train_ids": train_ids, "val_ids": val_ids}, default=str))


def save_last_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], standardization,
                    average: dict[str, torch.Tensor] | None = None) -> None:
    """Model + optimizer tensors (and the weights' moving average, if any) and JSON metadata in one safetensors file, atomically."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"{AVERAGE_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in (average or {}).items()})
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


def load_last_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a resume state; an unreadable file raises :class:`MMILInputError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise MMILInputError(f"{path}: unreadable resume state ({err}); delete it to restart this fold from scratch") from None
    return tensors, meta


def check_fingerprint(path: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a resume state written by a run with other settings, naming what differs."""
    stored = with_legacy_fingerprint(meta.get("fingerprint", {}))  # options added since: compared at their old values
    if stored != expected:
        changed = sorted(k for k in expected if stored.get(k) != expected[k])
        raise MMILInputError(f"{path}: written by a run with other settings (differs in: {', '.join(changed)}); use a fresh output directory or delete it to restart")


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Load the model and optimizer state saved by :func:`save_last_state`."""
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


def saved_average(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor] | None:
    """The weights' moving average saved by :func:`save_last_state`, on ``device``, or ``None``."""
    average = {k[len(AVERAGE_PREFIX):]: v.to(device) for k, v in tensors.items() if k.startswith(AVERAGE_PREFIX)}
    return average or None
