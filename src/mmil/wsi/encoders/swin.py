"""CTransPath: Swin-T with a convolutional stem, in plain torch, with the released checkpoint's key names.

CTransPath (Wang et al., Medical Image Analysis 81:102559, 2022) is timm's ``swin_tiny_patch4_window7_224``
built with ``embed_layer=ConvStem`` and its classifier replaced by ``nn.Identity()``: the output is the mean
over tokens after the final LayerNorm, 768-d. The released ``ctranspath.pth`` holds, under ``model``, a
timm 0.5.4 state dict, which the authors load with ``strict=True`` into that model. Its names:

* ``patch_embed.proj.{0,3}.weight`` (3x3 stride-2 convolutions, no bias), ``patch_embed.proj.{1,4}.*``
  (BatchNorm, with running statistics and ``num_batches_tracked``), ``patch_embed.proj.6.{weight,bias}``
  (1x1 convolution to ``embed_dim``), ``patch_embed.norm.*`` (LayerNorm);
* ``layers.N.blocks.M.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}``;
  buffers ``layers.N.blocks.M.attn.relative_position_index`` and, in shifted blocks,
  ``layers.N.blocks.M.attn_mask`` (both persistent in timm 0.5.4; recomputed here and dropped on load);
* ``layers.N.downsample.{norm,reduction}``: patch merging at the *end* of stage ``N`` (timm >= 0.9 moved it to
  the start of stage ``N+1``); ``norm.*``; no ``head.*`` (dropped if present).

Sources checked (``search`` tool, code corpus): TransPath ``ctran.py`` and ``get_features_CTransPath.py``
(github.com/Xiyue-Wang/TransPath: ConvStem, ``model.head = nn.Identity()``, ``load_state_dict(td['model'],
strict=True)``, ``transforms.Resize(224)`` (bilinear) and ImageNet mean/std); wsinfer's CTransPath port of the
authors' modified timm 0.5.4 ``SwinTransformer`` (``embed_layer`` the only change); Microsoft's Swin
``SwinTransformerBlock`` (``register_buffer("attn_mask", ...)`` persistent, mask value -100); timm 1.0.31
``swin_transformer.py`` (``checkpoint_filter_fn`` drops ``relative_position_index``/``attn_mask`` and moves
``layers.N.downsample`` to ``N+1`` for old checkpoints); docs corpus: the kaczmarj/CTransPath model card (same
transform) and 1aurent/swin_tiny_patch4_window7_224.CTransPath (27.5 M parameters, 224 x 224 input).

Magnification: neither the authors' code nor those model cards fix one (the feature script resizes whatever
tile it gets to 224 px). The preset says 20x (about 0.5 um/px) with 224 px tiles, the usual choice for
CTransPath features and the scanning magnification of the paper's TCGA/PAIP pretraining crops as we read the
paper (not re-checked against its text in this session); other tilings still work, the tile is resized to 224.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import MMILInputError
from .presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, EncoderSpec

MASK_VALUE = -100.0  # the released model's value for "other region" in shifted windows (timm, Microsoft Swin)


def relative_position_index(window: int) -> Tensor:
    """``(w*w, w*w)`` index into the ``(2w-1)**2``-row bias table for tokens in row-major window order.

    ``idx[i, j] = (r_i - r_j + w - 1) * (2w - 1) + (c_i - c_j + w - 1)`` for token ``i`` at ``(r_i, c_i)``.
    """
    rows, cols = torch.meshgrid(torch.arange(window, device="cpu"), torch.arange(window, device="cpu"), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :] + window - 1) * (2 * window - 1) + (cols[:, None] - cols[None, :] + window - 1)


def window_partition(x: Tensor, window: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, w*w, C)``; windows batch-major, then row-major over the window grid."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, w*w, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> Tensor:
    """``(nW, w*w, w*w)`` additive mask for windows of the grid rolled by ``-shift`` (SW-MSA).

    Rows are labelled by region ``[0, H-w)``, ``[H-w, H-shift)``, ``[H-shift, H)`` (columns likewise); two
    tokens of a window may attend to each other iff their (row, column) regions agree, i.e. they were
    neighbours before the roll: ``mask = 0`` there and ``MASK_VALUE`` elsewhere.
    """
    def regions(n: int) -> Tensor:
        label = torch.zeros(n, dtype=torch.long, device="cpu")
        label[n - window:] = 1
        label[n - shift:] = 2
        return label

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).to(torch.float32)
    ids = window_partition(region[None, :, :, None], window).squeeze(-1)  # nW, w*w
    same = ids[:, :, None] == ids[:, None, :]
    return torch.where(same, 0.0, MASK_VALUE)


class ConvStem(nn.Module):
    """TransPath's stem: ``[conv3x3/2, BN, ReLU] x 2 -> conv1x1`` (widths ``E/8, E/4, E``), tokens, LayerNorm."""

    def __init__(self, embed_dim: int, in_chans: int = 3):
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"ConvStem needs embed_dim divisible by 8, got {embed_dim}")
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, H/4 * W/4, E)`` tokens in row-major order."""
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """``(nH, N, N)``: ``bias[h, i, j] = table[idx[i, j], h]``."""
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B*nW, N, C)`` -> same: ``softmax(q k^T / sqrt(d) + bias [+ mask[w]]) v`` per head, then ``proj``."""
        bn, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().unsqueeze(0).to(q.dtype)  # 1, nH, N, N
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            # windows are batch-major (row b * nW + w): view them as (B, nW * nH) "heads" so that the
            # (nW * nH, N, N) bias + mask broadcasts over the batch instead of being copied B times
            nw = mask.shape[0]
            shape = (bn // nw, nw * self.num_heads, n, -1)
            full = (bias + mask.unsqueeze(1).to(q.dtype)).reshape(1, nw * self.num_heads, n, n)
            out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=full)
            out = out.reshape(bn, self.num_heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (timm's names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP, both residual, on ``(B, H*W, C)`` tokens.

    As in timm 0.5.4, a grid no larger than the window gets one window the size of the grid and no shift.
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int], window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"token grid {resolution} is not a multiple of the window {window}")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def window_attention(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> same: roll by ``-shift``, attend within windows, roll back."""
        h, w = self.resolution
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out = window_reverse(self.attn(window_partition(x, self.window), self.attn_mask), self.window, h, w)
        return torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2)) if self.shift else out

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        x = x + self.window_attention(self.norm1(x).view(b, *self.resolution, c)).reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order ``(0,0), (1,0), (0,1), (1,1)`` as (row, col)), LayerNorm, linear to ``2C``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, resolution: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, *resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks (odd ones shifted by ``window // 2``), then patch merging unless it is the last stage."""

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: tuple[int, int], window: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x, self.resolution)


class CTransPath(nn.Module):
    """Swin Transformer with TransPath's ConvStem: ``(B, 3, S, S)`` -> ``(B, embed_dim * 2**(stages-1))``.

    Defaults are the released model (Swin-T: 96, (2, 2, 6, 2), (3, 6, 12, 24), window 7, 224 px -> 768-d).
    """

    def __init__(self, img_size: int = 224, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % 4 or len(depths) != len(num_heads):
            raise ValueError(f"img_size must be a multiple of 4 and depths/num_heads of one length, got {img_size}, {depths}, {num_heads}")
        self.img_size = img_size
        self.patch_embed = ConvStem(embed_dim)
        grid = img_size // 4
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            side = grid // 2**i
            stages.append(SwinStage(embed_dim * 2**i, depth, heads, (side, side), window_size, mlp_ratio, not last))
        self.layers = nn.ModuleList(stages)
        self.embed_dim = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.embed_dim)
        self.head = nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's Swin initialisation (truncated normal 0.02 for linear weights and bias tables), for --random-weights.
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table") or (p.dim() == 2 and "patch_embed" not in name):
                nn.init.trunc_normal_(p, std=0.02)
            elif p.dim() == 1 and ("attn" in name or "mlp" in name):
                nn.init.zeros_(p)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> normalised tokens of the last stage, ``(B, L, embed_dim)``."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"CTransPath expects {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Mean over tokens of :meth:`forward_features` (timm 0.5.4's ``avgpool`` + ``flatten``), then ``head``."""
        return self.head(self.forward_features(x).mean(dim=1))


def build_ctranspath(**overrides) -> CTransPath:
    """The released architecture; keyword overrides (``img_size``, ``embed_dim``, ``depths``, ``num_heads``,
    ``window_size``, ``mlp_ratio``) build a smaller model of the same structure."""
    return CTransPath(**overrides)


_RECOMPUTED = re.compile(r"\.(relative_position_index|attn_mask)$")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def ctranspath_checkpoint_filter(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released ``ctranspath.pth`` (its ``model`` entry, or the whole dict) -> this module's state dict.

    Drops ``head.*`` and the buffers this model recomputes (``*.relative_position_index``, ``*.attn_mask``);
    a timm >= 0.9 layout (patch merging at the start of stage ``N+1``: no ``layers.0.downsample.*`` but a
    later one, as in hub conversions) is mapped back to ``layers.N.downsample``. Every other key is kept, so
    strict loading reports anything missing or unexpected. The input is not modified.
    """
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise MMILInputError(f"not a CTransPath state dict: entries {bad[:4]} are not tensors; pass ctranspath.pth (its 'model' entry)")
    stages = {int(m.group(1)) for k in state if (m := _DOWNSAMPLE.match(k))}
    shift_back = bool(stages) and 0 not in stages
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("head.") or _RECOMPUTED.search(key):
            continue
        if shift_back:
            key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[key] = value
    return out


CTRANSPATH = EncoderSpec(
    name="ctranspath",
    build=build_ctranspath,
    input_size=224,
    resize="bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    magnification=20.0,
    patch_size=224,
    embed_dim=768,
    checkpoint_filter=ctranspath_checkpoint_filter,
    source="github.com/Xiyue-Wang/TransPath ctran.py + get_features_CTransPath.py (ctranspath.pth, timm 0.5.4 Swin-T + ConvStem)",
)
PRESETS[CTRANSPATH.name] = CTRANSPATH  # presets.py imports this module last, so either import order works
