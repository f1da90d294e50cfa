"""One Vision Transformer family with timm's ``VisionTransformer`` parameter names, in plain torch.

The options are the ones today's pathology encoders use (checked against timm 1.0.31
``timm/models/vision_transformer.py`` and ``timm/layers/mlp.py``):

* patch embedding ``patch_embed.proj`` (a ``patch x patch`` convolution with stride ``patch``);
* a class token ``cls_token`` (1, 1, D) and ``reg_tokens`` register tokens ``reg_token`` (1, R, D),
  prepended in that order: ``[cls, reg_1..reg_R, patch_1..patch_N]``;
* learned absolute position embedding ``pos_embed``: over ``[cls, regs, patches]`` (timm's default),
  or with ``no_embed_class`` over the patches only (added before the prefix tokens are prepended);
* dynamic image size: ``pos_embed``'s patch grid is resampled to the input's grid
  (bicubic, ``align_corners=False``, antialiased as timm's ``resample_abs_pos_embed``, or not, as
  transformers' ``Dinov2Embeddings``); a no-op at the native grid;
* pre-norm blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))`` with LayerScale
  ``ls*.gamma`` (``x * gamma``), multi-head attention ``attn.qkv`` (packed q, k, v) and ``attn.proj``;
* MLP ``mlp.fc1 -> act -> mlp.fc2`` (GELU), or timm's ``SwiGLUPacked`` (``GluMlp``, ``gate_last=False``):
  ``fc1`` to ``H = int(D * mlp_ratio)``, split into halves ``a, b``, ``fc2(silu(a) * b)`` with ``fc2``: H/2 -> D;
* final LayerNorm ``norm`` (eps 1e-6, timm's ``LayerNorm`` default) and a pooled output:
  ``cls`` (class token), ``cls_mean`` (class token concatenated with the mean of the patch tokens,
  register tokens excluded: Virchow's tile embedding) or ``mean`` (mean of the patch tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLS = ("cls", "cls_mean", "mean")
MLPS = ("mlp", "swiglu_packed")
ACTS = {"gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ViTConfig:
    """Structure of a :class:`VisionTransformer` (timm's argument names where timm has one)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    mlp: str = "mlp"
    act: str = "gelu"
    init_values: float | None = 1e-5
    reg_tokens: int = 0
    no_embed_class: bool = False
    dynamic_img_size: bool = True
    pos_embed_antialias: bool = True
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    pool: str = "cls"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {tuple(ACTS)}, got {self.act!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        """Native patch grid side: ``img_size // patch_size``."""
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        """``fc1`` output width, timm's ``int(embed_dim * mlp_ratio)`` (twice the gated width for SwiGLU-packed)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        """Embedding size: ``2 D`` for ``cls_mean``, else ``D``."""
        return 2 * self.embed_dim if self.pool == "cls_mean" else self.embed_dim


def resample_grid(pos: Tensor, new_hw: tuple[int, int], antialias: bool) -> Tensor:
    """Resample a patch position table ``(1, g*g, D)`` to ``(1, h*w, D)``.

    Bicubic interpolation of the ``g x g`` grid to ``h x w`` in float32 (``align_corners=False``),
    as timm's ``resample_abs_pos_embed`` (``antialias=True``) and transformers' DINOv2 (``False``).
    """
    n, dim = pos.shape[1], pos.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position embedding of {n} patch tokens is not a square grid")
    if (g, g) == tuple(new_hw):
        return pos
    grid = pos.float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)


class PatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, H/p, W/p, D)`` by a stride-``p`` convolution (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention ``proj(softmax(q k^T / sqrt(d_h)) v)`` with packed ``qkv``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """``x * gamma`` per channel (``gamma`` starts at ``init_values``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; with ``gated=True`` timm's SwiGLU-packed ``fc2(act(a) * b)``, ``(a, b) = chunk(fc1(x))``."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool):
        super().__init__()
        if gated and hidden % 2:
            raise ValueError(f"SwiGLU-packed MLP needs an even hidden width, got {hidden}")
        self.gated = gated
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTS[act]()
        self.fc2 = nn.Linear(hidden // 2 if gated else hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.gated:
            a, b = x.chunk(2, dim=-1)
            return self.fc2(self.act(a) * b)
        return self.fc2(self.act(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1 x))``, then ``x + ls2(mlp(norm2 x))``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(d, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.act, gated=cfg.mlp == "swiglu_packed")
        self.ls2 = LayerScale(d, cfg.init_values) if cfg.init_values is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """``(B, 3, H, W)`` normalised images -> ``(B, out_dim)`` embeddings (see the module docstring).

    Loading a state dict whose ``pos_embed`` has another square patch grid than ``img_size`` gives
    (with ``dynamic_img_size``) a model that keeps the file's grid and resamples it per input, as
    timm and transformers do with their own files.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.num_prefix_tokens = 1 + cfg.reg_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        n_pos = cfg.grid**2 + (0 if cfg.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.out_dim = cfg.out_dim
        self._init_weights()

    def _init_weights(self) -> None:
        # timm-like: truncated normal (std 0.02) for weights and tokens, zero biases; used by --random-weights.
        for p in (self.cls_token, self.pos_embed, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "pos_embed")
        if self.cfg.dynamic_img_size and incoming is not None and incoming.shape != self.pos_embed.shape:
            n_patch = incoming.shape[1] - (0 if self.cfg.no_embed_class else self.num_prefix_tokens)
            if incoming.dim() == 3 and incoming.shape[-1] == self.pos_embed.shape[-1] and n_patch > 0 and math.isqrt(n_patch) ** 2 == n_patch:
                self.pos_embed = nn.Parameter(torch.empty_like(incoming, device=self.pos_embed.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """``(B, h, w, D)`` patch tokens -> ``(B, 1 + R + h*w, D)`` tokens with position embedding."""
        b, h, w, d = x.shape
        prefix = 0 if self.cfg.no_embed_class else self.num_prefix_tokens
        pos = self.pos_embed
        if pos.shape[1] - prefix != h * w or h != w:  # not the native grid (timm's and transformers' test)
            if not self.cfg.dynamic_img_size:
                raise ValueError(f"input grid {h}x{w} differs from the model's {self.cfg.grid}x{self.cfg.grid} and dynamic_img_size is off")
            pos = torch.cat([pos[:, :prefix], resample_grid(pos[:, prefix:], (h, w), self.cfg.pos_embed_antialias)], dim=1)
        x = x.reshape(b, h * w, d)
        tokens = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(b, -1, -1))
        if self.cfg.no_embed_class:
            return torch.cat(tokens + [x + pos], dim=1)
        return torch.cat(tokens + [x], dim=1) + pos

    def forward_tokens(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, ``(B, 1 + R + N, D)`` (timm's ``forward_features``)."""
        return self.norm(self.blocks(self._pos_embed(self.patch_embed(images))))

    def pool(self, tokens: Tensor) -> Tensor:
        """Tokens -> embedding by ``cfg.pool``: class token, class ++ patch mean, or patch mean."""
        patches = tokens[:, self.num_prefix_tokens :]
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return patches.mean(dim=1)
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.forward_tokens(images))
