"""The released MMIL-Transformer checkpoints, mapped to :class:`~.mmil_transformer.MMILTransformer`
(``docs/method/mmil.md §1.8``): a filter function beside the model (timm's ``checkpoint_filter_fn``).

Nothing here reads a file: :func:`mmil.checkpoint.load_released_checkpoint` reads
it (``torch.load(..., weights_only=True)``) and hands the state dict to
:func:`model_from_released`, which names the file in any error it raises.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn

from .mmil_transformer import MMILTransformer

__all__ = ["ReleasedCheckpointError", "ReleasedImportReport", "released_checkpoint_filter", "released_model_kwargs", "model_from_released"]

_RELEASED_LAYER_KEY = re.compile(
    r"^layers\.(\d+)\.(GroupsAttenLayer|GroupsMSGAttenLayer)\.AttenLayer\.attn\.(to_qkv\.weight|to_out\.0\.weight|to_out\.0\.bias)$"
)
_RELEASED_STEP = {"GroupsAttenLayer": "subbag_attn", "GroupsMSGAttenLayer": "msg_attn"}
_RELEASED_PARAM = {"to_qkv.weight": "qkv.weight", "to_out.0.weight": "out.weight", "to_out.0.bias": "out.bias"}
_RELEASED_PLAIN = {"fc1.weight": "input_proj.weight", "fc1.bias": "input_proj.bias", "fc2.weight": "head.weight", "fc2.bias": "head.bias"}
_RELEASED_TOKENS = {"msgcls_token": "bag_token", "msg_tokens": "msg_token", "absolute_pos_embed": "instance_bias"}
_ATTN_PARAMS = ("qkv.weight", "out.weight", "out.bias")
SHAPE_OPTIONS = ("in_dim", "n_classes", "embed_dim", "num_layers", "heads", "head_dim", "use_input_proj")
"""Constructor options a released state dict determines (an explicit value must agree with it)."""


class ReleasedCheckpointError(ValueError):
    """A state dict is not in the released layout or does not fit the requested model
    (the message says why; the reader prefixes the file name)."""


@dataclass
class ReleasedImportReport:
    """What :func:`released_checkpoint_filter` did.

    Attributes:
        mapped: ``(released_key, our_key)`` pairs.
        unexpected: released keys it did not recognise (not copied).
        missing: keys the result lacks: our model's keys when a model is given,
            else required keys of the released layout.
        shape_mismatch: ``(our_key, checkpoint_shape, model_shape)`` when a model is given.
    """

    mapped: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)


def _layer_ids(keys) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith("layers.")})


def _our_entry(name: str, value: Tensor) -> tuple[str, Tensor] | None:
    """Our key and a copy of the tensor for one released entry; None if it is not in the released layout."""
    if name in _RELEASED_PLAIN:
        return _RELEASED_PLAIN[name], value.detach().clone()
    if name in _RELEASED_TOKENS:
        if value.dim() == 0 or value.numel() != value.shape[-1]:
            return None  # e.g. several distinct message tokens: not this architecture
        return _RELEASED_TOKENS[name], value.detach().clone().reshape(-1)
    m = _RELEASED_LAYER_KEY.match(name)
    if m is None:
        return None
    return f"layers.{m.group(1)}.{_RELEASED_STEP[m.group(2)]}.{_RELEASED_PARAM[m.group(3)]}", value.detach().clone()


def _required_keys(new: Mapping[str, Tensor]) -> list[str]:
    """Keys a state dict in the released layout must give (without a model to compare with)."""
    required = ["head.weight", "head.bias", "bag_token", "msg_token", "instance_bias"]
    for i in _layer_ids(new) or [0]:
        required += [f"layers.{i}.{step}.{p}" for step in ("subbag_attn", "msg_attn") for p in _ATTN_PARAMS]
    if "input_proj.weight" in new or "input_proj.bias" in new:
        required += ["input_proj.weight", "input_proj.bias"]
    return required


def _compare_with_model(new: Mapping[str, Tensor], report: ReleasedImportReport, target: Mapping[str, Tensor]) -> None:
    report.missing = sorted(k for k in target if k not in new)
    extra = {k for k in new if k not in target}
    report.unexpected += [src for src, dst in report.mapped if dst in extra]
    for k, v in new.items():
        if k in target and tuple(v.shape) != tuple(target[k].shape):
            report.shape_mismatch.append((k, tuple(v.shape), tuple(target[k].shape)))


def released_checkpoint_filter(state_dict: Mapping[str, Tensor], model: nn.Module | None = None) -> tuple[dict[str, Tensor], ReleasedImportReport]:
    """Map a state dict in the released layout (``docs/method/mmil.md §1.8``) to :class:`MMILTransformer`'s.

    ``fc1 -> input_proj``, ``fc2 -> head``, ``msgcls_token (1,1,1,D) -> bag_token (D,)``,
    ``msg_tokens (1,1,1,D) -> msg_token (D,)``, ``absolute_pos_embed (1,1,D) -> instance_bias (D,)``,
    ``layers.i.GroupsAttenLayer.AttenLayer.attn.{to_qkv,to_out.0} -> layers.i.subbag_attn.{qkv,out}``
    and ``GroupsMSGAttenLayer -> msg_attn``. A ``module.`` prefix (DataParallel) is
    stripped. The input is never modified; tensors are copied.

    Args:
        state_dict: the released weights.
        model: optional target; if given, missing keys and shape mismatches are
            reported against its ``state_dict()``.

    Returns:
        ``(new_state_dict, report)``.
    """
    new: dict[str, Tensor] = {}
    report = ReleasedImportReport()
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        entry = _our_entry(name, value) if isinstance(value, Tensor) else None
        if entry is None:
            report.unexpected.append(key)
            continue
        new[entry[0]] = entry[1]
        report.mapped.append((key, entry[0]))
    if model is not None:
        _compare_with_model(new, report, model.state_dict())
    else:
        report.missing = [k for k in _required_keys(new) if k not in new]
    return new, report


def _agree(name: str, given: int | None, found: int, where: str) -> int:
    if given is not None and int(given) != found:
        raise ReleasedCheckpointError(f"{where} gives {name}={found} but {name}={given} was requested; drop the option or use the matching checkpoint")
    return found


def _input_kwargs(converted: Mapping[str, Tensor], embed: int, in_dim: int | None, use_input_proj: bool | None) -> dict[str, Any]:
    """``in_dim`` and ``use_input_proj``: from ``fc1``, or ``in_dim = D`` without projection when there is none."""
    if "input_proj.weight" in converted:
        w = converted["input_proj.weight"]
        feat = _agree("in_dim", in_dim, int(w.shape[1]), f"fc1.weight {tuple(w.shape)}")
        if use_input_proj is False:
            raise ReleasedCheckpointError("has fc1 weights but use_input_proj=False was requested; drop the option")
        return {"in_dim": feat, "use_input_proj": True}
    if in_dim is not None and int(in_dim) != embed:
        raise ReleasedCheckpointError(
            f"has no fc1 (the release feeds {embed}-d features directly) but in_dim={in_dim} was requested; "
            f"use {embed}-d features or a checkpoint with fc1"
        )
    return {"in_dim": embed, "use_input_proj": False}


def _head_kwargs(converted: Mapping[str, Tensor], heads: int | None, head_dim: int | None) -> dict[str, int]:
    """``heads`` x ``head_dim`` = the attention width (8 heads unless one of the two is given)."""
    inner = int(converted[f"layers.{_layer_ids(converted)[0]}.subbag_attn.qkv.weight"].shape[0]) // 3
    if heads is None and head_dim is None:
        heads = 8 if inner % 8 == 0 else 1
    if heads is not None and head_dim is None:
        head_dim = inner // int(heads) if inner % int(heads) == 0 else -1
    if heads is None:
        heads = inner // int(head_dim) if inner % int(head_dim) == 0 else -1
    if int(heads) * int(head_dim) != inner:
        raise ReleasedCheckpointError(f"attention width is {inner} (to_qkv.weight rows / 3), which heads={heads} x head_dim={head_dim} does not give")
    return {"heads": int(heads), "head_dim": int(head_dim)}


def released_model_kwargs(converted: Mapping[str, Tensor], requested: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shape-determined constructor arguments of a converted released state dict.

    ``embed_dim`` and ``n_classes`` from ``fc2``, ``num_layers`` from the layer keys,
    ``in_dim`` from ``fc1`` (without ``fc1`` the release ran D-d features unprojected:
    ``use_input_proj=False``, ``in_dim = D``), ``heads x head_dim`` from ``to_qkv``.
    A value in ``requested`` (keys of :data:`SHAPE_OPTIONS`; None = infer) must agree;
    otherwise :class:`ReleasedCheckpointError`.
    """
    req = {**dict.fromkeys(SHAPE_OPTIONS), **(requested or {})}
    head_w = converted["head.weight"]
    where = f"fc2.weight {tuple(head_w.shape)}"
    embed = _agree("embed_dim", req["embed_dim"], int(head_w.shape[1]), where)
    kwargs: dict[str, Any] = {"n_classes": _agree("n_classes", req["n_classes"], int(head_w.shape[0]), where), "embed_dim": embed}
    kwargs["num_layers"] = _agree("num_layers", req["num_layers"], _layer_ids(converted)[-1] + 1, "the layer keys")
    kwargs.update(_input_kwargs(converted, embed, req["in_dim"], req["use_input_proj"]))
    kwargs.update(_head_kwargs(converted, req["heads"], req["head_dim"]))
    return kwargs


def _check_layout(report: ReleasedImportReport) -> None:
    """:class:`ReleasedCheckpointError` unless the filter found exactly the released layout."""
    if report.missing:
        raise ReleasedCheckpointError(
            f"not a released MMIL-Transformer checkpoint (missing {', '.join(report.missing[:4])}"
            f"{', ...' if len(report.missing) > 4 else ''}); expected the key layout fc1/fc2/msgcls_token/msg_tokens/layers.i.GroupsAttenLayer..."
        )
    if report.unexpected:
        raise ReleasedCheckpointError(
            f"unexpected keys {', '.join(report.unexpected[:4])}{', ...' if len(report.unexpected) > 4 else ''}; "
            "this checkpoint is not the released MMIL-Transformer architecture"
        )


def model_from_released(
    state: Mapping[str, Tensor],
    *,
    in_dim: int | None = None,
    n_classes: int | None = None,
    embed_dim: int | None = None,
    num_layers: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    use_input_proj: bool | None = None,
    **options: Any,
) -> MMILTransformer:
    """An :class:`MMILTransformer` holding released weights, in eval mode.

    The shape options are checked against the weights (:func:`released_model_kwargs`);
    ``options`` are the other constructor options (``num_subbags``, ``grouping``,
    ``num_msg``, dropout, ...). ``model.init_kwargs`` are the constructor arguments.
    Raises :class:`ReleasedCheckpointError`.
    """
    converted, report = released_checkpoint_filter(state)
    _check_layout(report)
    requested = dict(in_dim=in_dim, n_classes=n_classes, embed_dim=embed_dim, num_layers=num_layers, heads=heads, head_dim=head_dim,
                     use_input_proj=use_input_proj)
    kwargs = released_model_kwargs(converted, requested)
    options.setdefault("min_subbag_size", None)  # the released grouping: G sub-bags whatever the bag size
    try:
        model = MMILTransformer(**kwargs, **options)
    except (TypeError, ValueError) as err:
        raise ReleasedCheckpointError(f"cannot build the model for this checkpoint: {err}") from None
    _, report = released_checkpoint_filter(state, model)
    if not report.ok:
        raise ReleasedCheckpointError(
            f"weights do not fit the model (missing {report.missing[:3]}, unexpected {report.unexpected[:3]}, "
            f"shape mismatch {report.shape_mismatch[:3]}); check --in-dim/heads against the checkpoint"
        )
    model.load_state_dict(converted, strict=True)
    return model.eval()
