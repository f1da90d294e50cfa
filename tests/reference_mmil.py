"""Naive MMIL-Transformer written from ``docs/method/mmil.md §1`` literally (the test oracle).

One bag at a time, a Python loop over sub-bags and over message tokens, explicit
softmax attention, weights kept in the RELEASED key layout (``docs/method/mmil.md §1.8``) as a plain
dict. It shares no code with :mod:`mmil.models.mmil_transformer`; the sub-bags are
given explicitly as lists of instance indices, so a test can hand both
implementations the same grouping and compare only the attention math.

Rules shared with the model (documented there): an empty sub-bag keeps its
message tokens, which then attend only to themselves; it still takes part in the
message step. Dropped sub-bags (masking) are simply not passed in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_PREFIX = {"sub": "GroupsAttenLayer", "msg": "GroupsMSGAttenLayer"}


def layer_key(i: int, step: str, param: str) -> str:
    """Released key of ``param`` (``to_qkv.weight``, ``to_out.0.weight``, ``to_out.0.bias``)."""
    return f"layers.{i}.{ATTN_PREFIX[step]}.AttenLayer.attn.{param}"


def init_released_weights(
    in_dim: int,
    embed_dim: int,
    n_classes: int,
    *,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    with_fc1: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """Random weights with the released names and shapes (tokens non-zero so every
    term of the computation matters)."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_dim

    def rnd(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    w: dict[str, Tensor] = {}
    if with_fc1:
        w["fc1.weight"] = rnd(embed_dim, in_dim, scale=in_dim**-0.5)
        w["fc1.bias"] = rnd(embed_dim, scale=0.1)
    w["absolute_pos_embed"] = rnd(1, 1, embed_dim, scale=0.1)
    w["msg_tokens"] = rnd(1, 1, 1, embed_dim, scale=0.5)
    w["msgcls_token"] = rnd(1, 1, 1, embed_dim, scale=1.0)
    for i in range(num_layers):
        for step in ("sub", "msg"):
            w[layer_key(i, step, "to_qkv.weight")] = rnd(3 * inner, embed_dim, scale=embed_dim**-0.5)
            w[layer_key(i, step, "to_out.0.weight")] = rnd(embed_dim, inner, scale=inner**-0.5)
            w[layer_key(i, step, "to_out.0.bias")] = rnd(embed_dim, scale=0.1)
    w["fc2.weight"] = rnd(n_classes, embed_dim, scale=embed_dim**-0.5)
    w["fc2.bias"] = rnd(n_classes, scale=0.1)
    return w


def mhsa(
    z: Tensor,
    w_qkv: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    heads: int,
    head_dim: int,
    *,
    attn_dropout: float = 0.0,
    proj_dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """``out(softmax(q k^T / sqrt(dh)) v)`` for one sequence ``z`` (n, D), explicit weights.

    Returns the update ``(n, D)`` and the attention weights ``(heads, n, n)``.
    """
    inner = heads * head_dim
    n = z.shape[0]
    qkv = z @ w_qkv.T  # as the release: to_qkv, chunk, 'n (h d) -> h n d', einsum, softmax
    q, k, v = (t.reshape(n, heads, head_dim).transpose(0, 1) for t in qkv.split(inner, dim=1))
    scores = torch.matmul(q, k.transpose(1, 2)) * head_dim**-0.5
    attn = torch.softmax(scores, dim=-1)
    weights = attn
    if training and attn_dropout > 0:
        attn = F.dropout(attn, attn_dropout, training)
    update = torch.matmul(attn, v).transpose(0, 1).reshape(n, inner) @ w_out.T + b_out
    if training and proj_dropout > 0:
        update = F.dropout(update, proj_dropout, training)
    return update, weights


def reference_forward(
    weights: dict[str, Tensor],
    x: Tensor,
    subbags: list[Tensor],
    *,
    heads: int,
    head_dim: int,
    num_msg: int = 1,
    attn_dropout: float = 0.0,
    proj_dropout: float = 0.0,
    training: bool = False,
    return_attention: bool = False,
):
    """Logits ``(n_classes,)`` of one bag ``x`` (N, C) with the given sub-bags.

    Args:
        subbags: one int64 index tensor per sub-bag (may be empty).
        return_attention: also return ``(sub_attn, msg_attn)`` of the LAST layer:
            a list of ``(heads, k + n_g, k + n_g)`` per sub-bag and ``(heads, 1 + G k, 1 + G k)``.
    """
    k = num_msg
    h = x @ weights["fc1.weight"].T + weights["fc1.bias"] if "fc1.weight" in weights else x
    h = h + weights["absolute_pos_embed"].reshape(-1)
    msg = weights["msg_tokens"].reshape(1, -1).expand(k, -1)
    states = [torch.cat([msg, h[idx]], dim=0) for idx in subbags]
    bag = weights["msgcls_token"].reshape(1, -1)
    num_layers = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("layers."))
    drop = dict(attn_dropout=attn_dropout, proj_dropout=proj_dropout, training=training)
    sub_attn: list[Tensor] = []
    msg_attn = None
    for i in range(num_layers):
        sub_w = [weights[layer_key(i, "sub", p)] for p in ("to_qkv.weight", "to_out.0.weight", "to_out.0.bias")]
        msg_w = [weights[layer_key(i, "msg", p)] for p in ("to_qkv.weight", "to_out.0.weight", "to_out.0.bias")]
        new_states = []
        sub_attn = []
        for z in states:  # sub-bag attention, one sub-bag at a time
            update, a = mhsa(z, *sub_w, heads, head_dim, **drop)
            new_states.append(z + update)
            sub_attn.append(a)
        states = new_states
        tokens = [bag]
        for z in states:  # message tokens, one at a time
            for j in range(k):
                tokens.append(z[j : j + 1])
        s = torch.cat(tokens, dim=0)
        update, msg_attn = mhsa(s, *msg_w, heads, head_dim, **drop)
        s = s + update
        bag = s[0:1]
        states = [torch.cat([s[1 + g * k : 1 + (g + 1) * k], z[k:]], dim=0) for g, z in enumerate(states)]
    logits = (bag @ weights["fc2.weight"].T + weights["fc2.bias"])[0]
    if return_attention:
        return logits, (sub_attn, msg_attn)
    return logits


def reference_instance_scores(
    weights: dict[str, Tensor], x: Tensor, subbags: list[Tensor], *, heads: int, head_dim: int, num_msg: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """``docs/method/mmil.md §4`` scores from explicit attention: for instance i of sub-bag g,
    ``sum_j mean_h(A_msg[h, 0, 1 + g k + j]) * mean_h(A_sub_g[h, j, k + t_i])``.

    Returns ``(scores (N,), bag_self_weight (), expected_sum ())`` where
    ``expected_sum = sum_(g,j) w_(g,j) * (1 - sum_j' a_(g,j)->(g,j'))``.
    """
    k = num_msg
    _, (sub_attn, msg_attn) = reference_forward(weights, x, subbags, heads=heads, head_dim=head_dim, num_msg=k, return_attention=True)
    w_bag = msg_attn.mean(0)[0]
    scores = torch.zeros(x.shape[0], dtype=w_bag.dtype)
    expected = torch.zeros((), dtype=w_bag.dtype)
    for g, idx in enumerate(subbags):
        a = sub_attn[g].mean(0)
        for j in range(k):
            w = w_bag[1 + g * k + j]
            for t, i in enumerate(idx.tolist()):
                scores[i] += w * a[j, k + t]
            expected += w * (1 - a[j, :k].sum())
    return scores, w_bag[0], expected


def subbags_from_ids(ids: Tensor, valid: Tensor) -> list[Tensor]:
    """Index lists of the sub-bags ``g`` with ``valid[g]`` from per-instance ids (one bag)."""
    return [torch.nonzero(ids == g).flatten() for g in range(valid.shape[0]) if bool(valid[g])]


def to_model_state(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Released names -> the model's names, written out by hand (independent of the
    library's filter, so tests of the model math do not depend on it)."""
    out: dict[str, Tensor] = {}
    names = {"fc1.weight": "input_proj.weight", "fc1.bias": "input_proj.bias", "fc2.weight": "head.weight", "fc2.bias": "head.bias"}
    for key, value in weights.items():
        if key in names:
            out[names[key]] = value.clone()
        elif key == "absolute_pos_embed":
            out["instance_bias"] = value.reshape(-1).clone()
        elif key == "msg_tokens":
            out["msg_token"] = value.reshape(-1).clone()
        elif key == "msgcls_token":
            out["bag_token"] = value.reshape(-1).clone()
        else:
            parts = key.split(".")
            step = "subbag_attn" if parts[2] == "GroupsAttenLayer" else "msg_attn"
            param = {"to_qkv.weight": "qkv.weight", "to_out.0.weight": "out.weight", "to_out.0.bias": "out.bias"}[".".join(parts[5:])]
            out[f"layers.{parts[1]}.{step}.{param}"] = value.clone()
    return out
