"""Checkpoint filter: transformers ``Dinov2Model`` key names -> our ViT (timm names).

Released ``Dinov2Model`` files (e.g. owkin/phikon-v2 ``model.safetensors``) use the legacy layout;
transformers 5 renames some modules on load (``conversion_mapping.py``: ``attention.attention.query`` ->
``attention.q_proj``, ``attention.output.dense`` -> ``attention.o_proj``); both spellings are accepted.

============================================================  ==========================
transformers                                                  ours (timm)
============================================================  ==========================
``embeddings.cls_token``                                      ``cls_token``
``embeddings.position_embeddings``                            ``pos_embed``
``embeddings.patch_embeddings.projection.{weight,bias}``      ``patch_embed.proj.*``
``encoder.layer.N.norm1`` / ``norm2``                         ``blocks.N.norm1`` / ``norm2``
``encoder.layer.N.attention.attention.{query,key,value}``     ``blocks.N.attn.qkv`` (stacked q, k, v)
``encoder.layer.N.attention.output.dense``                    ``blocks.N.attn.proj``
``encoder.layer.N.layer_scale{1,2}.lambda1``                  ``blocks.N.ls{1,2}.gamma``
``encoder.layer.N.mlp.fc1`` / ``fc2``                         ``blocks.N.mlp.fc1`` / ``fc2``
``layernorm``                                                 ``norm``
``embeddings.mask_token`` (masked-image training only)        dropped
============================================================  ==========================

Keys that match none of these keep their name, so strict loading reports them as unexpected.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_PART = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
_DROP = {"embeddings.mask_token"}


def _rename(key: str) -> str:
    for pattern, target in _RENAMES:
        new, n = re.subn(pattern, target, key)
        if n:
            return new
    return key


def hf_dinov2_filter(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``Dinov2Model`` state dict -> our ViT's (see the module docstring); the input is not modified.

    ``qkv.weight = cat([query.weight, key.weight, value.weight], dim=0)`` (the same for biases), the
    packing timm's ``Attention`` splits as ``q, k, v``. A layer lacking one of q, k, v keeps its parts
    under their own names, so strict loading reports them.
    """
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[int, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if key in _DROP:
            continue
        m = _QKV.match(key)
        if m:
            parts.setdefault((m.group(1), m.group(4)), {})[_PART[m.group(2) or m.group(3)]] = (key, value)
        else:
            out[_rename(key)] = value
    for (layer, kind), got in parts.items():
        if sorted(got) == [0, 1, 2]:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([got[i][1] for i in range(3)], dim=0)
        else:
            out.update({k: v for k, v in got.values()})
    return out
