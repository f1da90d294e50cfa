"""Checkpoint directories: ``model.safetensors`` (weights) + ``config.json``; and released
MMIL-Transformer weight files.

``config.json`` holds ``{"format": "mmil-checkpoint", "version": 1, "model": NAME,
"model_kwargs": {... in_dim, n_classes ...}, "extra": {...}}``; ``extra`` carries
whatever the writer adds (training config, epoch, class names, metrics).
Weights are read with safetensors only, so loading never executes code; the
authors' released ``.pth`` files are read with ``torch.load(weights_only=True)``
(:func:`load_released_checkpoint`) and mapped by :mod:`mmil.models.mmil_released`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from mmpl.fsio import atomic_path
from mmpl.jsonio import write_json
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import MMILInputError
from .models import create_model
from .models.mmil_released import ReleasedCheckpointError, model_from_released
from .models.mmil_transformer import MMILTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SLIDES_NAME = "slides.json"
SEEN_ROLES = ("train", "val")
FORMAT = "mmil-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not fit the request."""


def save_checkpoint(directory: str | Path, model: nn.Module, model_name: str, model_kwargs: dict[str, Any], extra: dict[str, Any] | None = None,
                    slides: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write weights, the slides the model saw, then config, each atomically; the config is written last so a
    directory with a config always has matching weights.

    ``slides`` (``{"train": ids, "val": ids}``: the slides the weights were fitted on and selected with) goes to
    ``slides.json``; without it a stale ``slides.json`` is removed, so the file never describes other weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    if slides is not None:
        write_json(directory / SLIDES_NAME, {role: [str(s) for s in slides.get(role, ())] for role in SEEN_ROLES})
    else:
        (directory / SLIDES_NAME).unlink(missing_ok=True)
    write_json(directory / CONFIG_NAME, {"format": FORMAT, "version": 1, "model": model_name, "model_kwargs": model_kwargs, "extra": extra or {}})
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: no checkpoint config here; pass a directory written by `mmil train` or `mmil import-checkpoint`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err}); the checkpoint is corrupt, re-create it") from None
    if cfg.get("format") != FORMAT or "model" not in cfg or "model_kwargs" not in cfg:
        raise CheckpointError(f"{cfg_path}: not an mmil checkpoint config (missing 'format', 'model' or 'model_kwargs')")
    return cfg


def read_seen_slides(directory: str | Path) -> dict[str, list[str]] | None:
    """The slides a checkpoint was trained (``train``) and selected (``val``) on, or ``None`` when unknown.

    Read from ``slides.json``; for a fold checkpoint of a cross-validation run written before that file
    existed (``RUN/fold_k/checkpoint`` with ``extra.fold = k``), from the run's ``folds.json``.
    """
    directory = Path(directory)
    path = directory / SLIDES_NAME
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            return {role: [str(s) for s in data.get(role) or []] for role in SEEN_ROLES}
        fold = read_checkpoint_config(directory).get("extra", {}).get("fold")
        plan_path = directory.parent.parent / "folds.json"
        if fold is None or not plan_path.is_file():
            return None
        for entry in json.loads(plan_path.read_text()):
            if entry.get("fold") == fold:
                return {role: [str(s) for s in entry.get(role) or []] for role in SEEN_ROLES}
    except (json.JSONDecodeError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable list of training slides ({err}); delete it or re-create the checkpoint") from None
    return None


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", **override_kwargs) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model the config names and load its weights strictly.

    ``override_kwargs`` replace model options that do not change the weights
    (e.g. ``grouping`` or ``num_subbags`` at inference time).
    Returns ``(model, config)``; the model is in eval mode.
    """
    directory = Path(directory)
    cfg = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing; the checkpoint directory is incomplete")
    kwargs = dict(cfg["model_kwargs"])
    if cfg["model"] == "mmil":
        kwargs.setdefault("min_subbag_size", None)  # saved before adaptive sub-bags existed: grouped as then
    kwargs.update(override_kwargs)
    in_dim, n_classes = kwargs.pop("in_dim"), kwargs.pop("n_classes")
    model = create_model(cfg["model"], in_dim=in_dim, n_classes=n_classes, **kwargs)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: cannot read weights ({err}); the file is corrupt, re-create the checkpoint") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not fit model {cfg['model']!r} built from {directory / CONFIG_NAME} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); the checkpoint comes from another configuration"
        )
    model.to(map_location).eval()
    cfg["model_kwargs"] = {"in_dim": in_dim, "n_classes": n_classes, **kwargs}
    return model, cfg


# ------------------------------------------------------------ released weights
def read_released_state(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a released ``.pth``/``.pt`` file, read with ``torch.load(weights_only=True)``.

    A dict wrapping the weights under ``model``, ``state_dict`` or ``model_state_dict``
    is unwrapped. Raises :class:`MMILInputError` naming the file if it is missing,
    unreadable (pickled modules are refused) or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: no such checkpoint file; pass the path of the released .pth/.pt weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip, code objects refused by weights_only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MMILInputError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({first}); "
            "pass a plain state dict saved with torch.save (pickled modules are refused)"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise MMILInputError(f"{path}: holds no state dict (found {type(obj).__name__}); pass the released MMIL-Transformer weights")
    return dict(obj)


def load_released_checkpoint(path: str | Path, **options: Any) -> MMILTransformer:
    """Build an MMIL-Transformer from a released checkpoint file (``docs/method/mmil.md §1.8``).

    The file is read by :func:`read_released_state`; shapes give ``embed_dim``,
    ``n_classes``, ``num_layers``, ``in_dim`` (with no ``fc1`` the model is built with
    ``use_input_proj=False`` and ``in_dim = embed_dim``) and ``heads x head_dim`` (8 heads
    unless ``heads`` or ``head_dim`` is given). Values in ``options`` must agree with
    the file; the other ``options`` (``num_subbags``, ``grouping``, ``num_msg``, dropout,
    ...) are passed to the constructor (:func:`mmil.models.mmil_released.model_from_released`).

    Returns the model in eval mode; ``model.init_kwargs`` are the constructor
    arguments (for :func:`save_checkpoint`). Raises :class:`MMILInputError` naming
    the file if it is missing, unreadable, not in the released layout, or does not
    fit the requested configuration.
    """
    state = read_released_state(path)
    try:
        return model_from_released(state, **options)
    except ReleasedCheckpointError as err:
        raise MMILInputError(f"{Path(path)}: {err}") from None
