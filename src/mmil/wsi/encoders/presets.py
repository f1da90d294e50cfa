"""Encoder presets: name -> :class:`EncoderSpec`, the one registry of tile encoders.

An :class:`EncoderSpec` is a frozen dataclass with these fields (all a new encoder family must give):

* ``name``: the ``--backbone`` name;
* ``build``: ``build(**overrides) -> nn.Module`` whose ``forward(images)`` maps ``(B, 3, H, W)`` normalised images
  to ``(B, embed_dim)`` embeddings; without arguments it builds the released architecture, keyword overrides
  (e.g. ``depth=1, embed_dim=32``) build a tiny model of the same structure (tests, conformance fixtures);
* ``input_size``: side (px) patches are resized to before the encoder;
* ``resize``: interpolation of that resize, ``"bilinear"`` or ``"bicubic"`` (antialiased when shrinking);
* ``mean``, ``std``: per-channel normalisation after ``x / 255``;
* ``magnification``, ``patch_size``: the tiling the model was trained on (e.g. 20.0 and 256 px at 0.5 mpp);
* ``embed_dim``: size of the output embedding;
* ``checkpoint_filter``: ``state_dict -> state_dict`` mapping the released file's keys onto ``build()``'s module
  (like timm's ``checkpoint_filter_fn``; must not modify its input);
* ``crop_pct`` (default 1.0): timm's centre crop: resize to ``input_size / crop_pct``, keep the central
  ``input_size`` (e.g. 224 / 256 = 0.875 for ``Resize(256), CenterCrop(224)``);
* ``source``: where the configuration was checked (model card / config / source file).

Another file registers a spec by adding one line to ``PRESETS`` at the end of this file.
Loading is strict: :func:`load_preset_weights` names the file and lists missing / unexpected keys.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

from torch import Tensor, nn

from ...errors import MMILInputError
from ..backbones import check_state_keys
from .hf_dinov2 import hf_dinov2_filter
from .vit import ViTConfig, VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def identity_filter(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released file already uses the module's names (timm ``VisionTransformer``): a shallow copy."""
    return dict(state)


@dataclass(frozen=True)
class EncoderSpec:
    """One tile-encoder preset (see the module docstring for each field)."""

    name: str
    build: Callable[..., nn.Module]
    input_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    magnification: float
    patch_size: int
    embed_dim: int
    checkpoint_filter: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] = identity_filter
    crop_pct: float = 1.0
    source: str = ""


def vit_builder(cfg: ViTConfig) -> Callable[..., VisionTransformer]:
    """``build(**overrides)``: a :class:`VisionTransformer` of ``cfg`` with the given fields replaced."""

    def build(**overrides) -> VisionTransformer:
        return VisionTransformer(replace(cfg, **overrides))

    return build


def _vit(name: str, cfg: ViTConfig, **spec) -> EncoderSpec:
    return EncoderSpec(name=name, build=vit_builder(cfg), input_size=cfg.img_size, embed_dim=cfg.out_dim, **spec)


# UNI (MahmoodLab/UNI model card, UNI README): timm.create_model("vit_large_patch16_224", img_size=224,
# patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True); timm vit_large_patch16_224 =
# patch 16, dim 1024, depth 24, heads 16 (timm 1.0.31 vision_transformer.py); transform Resize(224),
# ToTensor, Normalize(ImageNet); 20x (0.5 mpp) 256 px tiles as in CLAM/TRIDENT. Output: class token, 1024-d.
UNI = _vit("uni", ViTConfig(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
           resize="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20.0, patch_size=256,
           source="MahmoodLab/UNI model card + README; timm vit_large_patch16_224")

# UNI2-h (MahmoodLab/UNI2-h model card, UNI README timm_kwargs): img_size 224, patch_size 14, depth 24, num_heads 24,
# init_values 1e-5, embed_dim 1536, mlp_ratio 2.66667*2, no_embed_class, SwiGLUPacked + SiLU, reg_tokens 8,
# dynamic_img_size; transform Resize(224), ToTensor, Normalize(ImageNet). Output: class token, 1536-d.
UNI2_H = _vit("uni2-h", ViTConfig(img_size=224, patch_size=14, embed_dim=1536, depth=24, num_heads=24, mlp_ratio=2.66667 * 2,
                                  mlp="swiglu_packed", act="silu", init_values=1e-5, reg_tokens=8, no_embed_class=True),
              resize="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20.0, patch_size=256,
              source="MahmoodLab/UNI2-h model card; UNI README timm_kwargs")

# Virchow2 (paige-ai/Virchow2 config.json + model card): vit_huge_patch14_224 (patch 14, dim 1280, depth 32,
# heads 16), img_size 224, init_values 1e-5, reg_tokens 4, mlp_ratio 5.3375, global_pool "", dynamic_img_size,
# created with mlp_layer=SwiGLUPacked, act_layer=SiLU; pretrained_cfg: bicubic, crop_pct 1.0, ImageNet mean/std.
# Embedding: cat(output[:, 0], output[:, 5:].mean(1)) = 2560-d (registers 1-4 excluded). 224 px input; trained on
# 5x-40x tiles, 20x (0.5 mpp) 224 px is the default here.
VIRCHOW2 = _vit("virchow2", ViTConfig(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=5.3375,
                                      mlp="swiglu_packed", act="silu", init_values=1e-5, reg_tokens=4, pool="cls_mean"),
                resize="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20.0, patch_size=224,
                source="paige-ai/Virchow2 config.json + model card; timm vit_huge_patch14_224")

# H-optimus-0 (bioptimus/H-optimus-0 model card + config.json): vit_giant_patch14_reg4_dinov2 (timm: patch 14,
# dim 1536, depth 40, heads 24, init_values 1e-5, mlp_ratio 2.66667*2, SwiGLUPacked, SiLU, reg_tokens 4,
# no_embed_class), img_size 224, global_pool token, dynamic_img_size=False; 224 px tiles at 0.5 mpp,
# ToTensor + Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)). 1536-d.
H_OPTIMUS_0 = _vit("h-optimus-0", ViTConfig(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2,
                                            mlp="swiglu_packed", act="silu", init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                            dynamic_img_size=False),
                   resize="bicubic", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, magnification=20.0, patch_size=224,
                   source="bioptimus/H-optimus-0 model card + config.json; timm vit_giant_patch14_reg4_dinov2")

# Prov-GigaPath tile encoder (prov-gigapath/prov-gigapath config.json + model card): vit_giant_patch14_dinov2 with
# model_args img_size 224, patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values 1e-5, mlp_ratio 5.33334
# (the architecture's defaults add SwiGLUPacked + SiLU, class token only, pos_embed over cls + patches);
# transform Resize(256, bicubic), CenterCrop(224), Normalize(ImageNet); 256 px tiles at 0.5 mpp. 1536-d.
GIGAPATH = _vit("gigapath", ViTConfig(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                                      mlp="swiglu_packed", act="silu", init_values=1e-5),
                resize="bicubic", crop_pct=224 / 256, mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20.0, patch_size=256,
                source="prov-gigapath/prov-gigapath config.json + model card; timm vit_giant_patch14_dinov2")

# Phikon-v2 (owkin/phikon-v2 model card; arXiv 2409.09173): transformers Dinov2Model, ViT-L/16 (hidden 1024,
# 24 layers, 16 heads, mlp_ratio 4, GELU, LayerScale, layer_norm_eps 1e-6, no registers); output
# last_hidden_state[:, 0] (class token after the final layernorm), 1024-d; 224 px tiles at 20x, ImageNet mean/std.
# Keys are mapped by hf_dinov2_filter; pos_embed keeps the file's grid and is resampled as transformers does
# (bicubic, no antialias in transformers 5.x), so the file's image_size need not be 224. Not verified here: the
# repository's preprocessor_config.json (resize mode / centre crop); bicubic resize to 224 without crop is assumed.
PHIKON_V2 = _vit("phikon-v2", ViTConfig(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                                        init_values=1.0, pos_embed_antialias=False),
                 resize="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20.0, patch_size=224,
                 checkpoint_filter=hf_dinov2_filter,
                 source="owkin/phikon-v2 model card; transformers Dinov2Model (modeling_dinov2.py, conversion_mapping.py)")

PRESETS: dict[str, EncoderSpec] = {s.name: s for s in (UNI, UNI2_H, VIRCHOW2, H_OPTIMUS_0, GIGAPATH, PHIKON_V2)}


def get_preset(name: str) -> EncoderSpec:
    """The spec called ``name``, or a clear error listing the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MMILInputError(f"unknown encoder preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def check_preset_keys(expected: Iterable[str], spec: EncoderSpec, mapped: Mapping[str, Tensor], source: str) -> None:
    """Raise an :class:`MMILInputError` naming ``source`` and a few keys if ``mapped`` lacks or adds any key."""
    check_state_keys(expected, mapped, source, spec.name, f"pass the released {spec.name} file ({spec.source})")


def load_preset_weights(model: nn.Module, spec: EncoderSpec, state: Mapping[str, Tensor], source: str) -> int:
    """Map ``state`` with the spec's filter and load it strictly into ``model``.

    Any missing or unexpected key, or a shape that does not fit, is an :class:`MMILInputError` naming
    ``source`` and listing a few keys. Returns the number of tensors loaded.
    """
    mapped = spec.checkpoint_filter(state)
    check_preset_keys(model.state_dict(), spec, mapped, source)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise MMILInputError(f"{source}: weight shapes do not fit {spec.name} ({'; '.join(lines[:2]) or err}); "
                             f"pass the released {spec.name} file ({spec.source})") from None
    return len(mapped)


from . import swin  # noqa: E402,F401 -- adds PRESETS["ctranspath"]; last, because swin.py imports EncoderSpec/PRESETS from here
