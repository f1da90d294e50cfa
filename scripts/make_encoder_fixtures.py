"""Conformance fixtures for the ViT encoder presets, made with timm / transformers as the independent reference.

Run once, in a separate environment that has timm and transformers (never in the test suite, which never
imports timm)::

    python3.11 -m venv /work/timm-env
    /work/timm-env/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision
    /work/timm-env/bin/pip install timm==1.0.31 transformers safetensors   # made with torch 2.13 CPU, timm 1.0.31,
                                                                           # torchvision 0.28.0, transformers 5.24
    /work/timm-env/bin/python scripts/make_encoder_fixtures.py [--out tests/fixtures/encoders]

(torchvision 0.28 beside this CPU torch fails on import in ``torchvision._meta_registrations``; the script
registers an empty module under that name before importing timm.)

For each preset the reference model is built the way the model card / config builds the released model
(``timm.create_model(ARCH, **released kwargs)``, or transformers ``Dinov2Model`` for phikon-v2) with only its
size shrunk: width 24, 3 heads, 2 blocks, a 3 x 3 patch grid (the released patch size, MLP ratio, MLP type,
activation, LayerScale, register tokens, position-embedding layout and dynamic-size setting are kept). Every
parameter gets a seeded random value of order one (LayerScale gammas in [0.5, 1.5], so every block matters).
Written per preset, into ``--out``:

* ``<preset>.safetensors``: the state dict in the *released* file's naming (timm's for the timm models;
  transformers' ``Dinov2Model`` legacy layout -- ``attention.attention.query`` ... -- for phikon-v2, checked by
  reloading it with ``Dinov2Model.from_pretrained``); metadata ``config`` = JSON of the ``ViTConfig`` fields
  that differ from the preset (``img_size``, ``embed_dim``, ``depth``, ``num_heads``), ``reference`` = what built it;
* ``<preset>_io.safetensors``: ``image`` (uint8 ``(2, 3, S, S)``, seeded) and ``expected`` (the reference's
  embedding of ``(image / 255 - mean) / std`` with the preset's mean/std); for presets whose released model
  takes any image size, also ``image_dyn`` / ``expected_dyn`` on a non-square ``2 x 4`` patch grid.

For phikon-v2 the reference's position table is made for a 4 x 4 grid (``image_size`` 64) while the
inputs are 3 x 3 and 2 x 4: transformers resamples it per input, and so must we.
Finally ``make_ctranspath_fixture`` of ``scripts/encoder_fixtures_swin.py`` (the Swin preset) is run if present.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

WIDTH, HEADS, DEPTH, GRID = 24, 3, 2, 3
SEED = 20251130
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def timm_presets() -> dict[str, dict]:
    """Preset -> (timm architecture, released kwargs, patch size, mean/std, dynamic); kwargs as published."""
    from timm.layers import SwiGLUPacked  # noqa: PLC0415

    return {
        "uni": dict(arch="vit_large_patch16_224", patch=16, norm=IMAGENET, dynamic=True,
                    kwargs=dict(init_values=1e-5, num_classes=0, dynamic_img_size=True)),
        "uni2-h": dict(arch="vit_giant_patch14_224", patch=14, norm=IMAGENET, dynamic=True,
                       kwargs=dict(patch_size=14, init_values=1e-5, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                   mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True)),
        "virchow2": dict(arch="vit_huge_patch14_224", patch=14, norm=IMAGENET, dynamic=True, cls_mean=True,
                         kwargs=dict(init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                                     dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)),
        "h-optimus-0": dict(arch="vit_giant_patch14_reg4_dinov2", patch=14, norm=HOPTIMUS, dynamic=False,
                            kwargs=dict(init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False)),
        "gigapath": dict(arch="vit_giant_patch14_dinov2", patch=16, norm=IMAGENET, dynamic=False,
                         kwargs=dict(in_chans=3, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
    }


def randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Seeded values of order one: Linear/Conv ``N(0, 1/fan_in)``, LayerNorm ``1 + 0.2 N``, gammas ``U(0.5, 1.5)``, tokens ``0.5 N``."""
    done = set()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / mod.weight[0].numel() ** 0.5)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=gen))
            else:
                continue
            if mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
            done.update(id(p) for p in mod.parameters(recurse=False))
        for name, p in model.named_parameters():
            if id(p) in done:
                continue
            if name.endswith(("gamma", "lambda1")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def images(patch: int, dynamic: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """uint8 inputs: ``image`` on the native 3 x 3 grid, ``image_dyn`` on a 2 x 4 grid (dynamic-size models)."""
    out = {"image": torch.randint(0, 256, (2, 3, GRID * patch, GRID * patch), generator=gen, dtype=torch.uint8)}
    if dynamic:
        out["image_dyn"] = torch.randint(0, 256, (1, 3, 2 * patch, 4 * patch), generator=gen, dtype=torch.uint8)
    return out


def normalise(image: torch.Tensor, norm) -> torch.Tensor:
    """``(image / 255 - mean) / std`` in float32."""
    mean = torch.tensor(norm[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm[1], dtype=torch.float32).view(1, 3, 1, 1)
    return (image.to(torch.float32) / 255.0 - mean) / std


def run_io(forward, imgs: dict[str, torch.Tensor], norm) -> dict[str, torch.Tensor]:
    io = dict(imgs)
    with torch.no_grad():
        for key, img in imgs.items():
            io[key.replace("image", "expected")] = forward(normalise(img, norm)).contiguous()
    return io


def write(out: Path, name: str, state: dict, io: dict, config: dict, reference: str) -> None:
    meta = {"config": json.dumps(config, sort_keys=True), "reference": reference, "preset": name}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"), metadata=meta)
    save_file(io, str(out / f"{name}_io.safetensors"), metadata={"preset": name, "reference": reference})
    print(f"{name}: {len(state)} tensors, outputs {[tuple(v.shape) for k, v in io.items() if k.startswith('expected')]}")


def make_timm_fixture(out: Path, name: str, p: dict) -> None:
    import timm  # noqa: PLC0415

    gen = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
    img_size = GRID * p["patch"]
    model = timm.create_model(p["arch"], pretrained=False, **dict(p["kwargs"], img_size=img_size, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS))
    model.eval()
    randomise(model, gen)

    def forward(x):
        y = model(x)
        if p.get("cls_mean"):  # Virchow2 card: cat(output[:, 0], output[:, 5:].mean(1)) with 4 registers
            y = torch.cat([y[:, 0], y[:, 1 + model.num_reg_tokens:].mean(1)], dim=-1)
        return y

    io = run_io(forward, images(p["patch"], p["dynamic"], gen), p["norm"])
    config = dict(img_size=img_size, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    write(out, name, model.state_dict(), io, config, f"timm {timm.__version__} {p['arch']} {sorted(p['kwargs'])}")


# transformers 5 renames Dinov2Model's attention on load (conversion_mapping.py); released files use these names.
LEGACY = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
          ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))


def make_phikon_fixture(out: Path) -> None:
    import transformers  # noqa: PLC0415
    from transformers import Dinov2Config, Dinov2Model  # noqa: PLC0415

    gen = torch.Generator().manual_seed(SEED + 7)
    cfg = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=16, image_size=64,
                       mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", use_swiglu_ffn=False)
    model = Dinov2Model(cfg).eval()
    randomise(model, gen)
    state = {}
    for key, value in model.state_dict().items():
        for new, old in LEGACY:
            key = key.replace(new, old)
        state[key] = value
    with tempfile.TemporaryDirectory() as tmp:  # the legacy layout must be what transformers loads as a Dinov2Model file
        cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        reloaded, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = reloaded.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    reloaded.eval()
    io = run_io(lambda x: reloaded(pixel_values=x).last_hidden_state[:, 0], images(16, True, gen), IMAGENET)
    config = dict(img_size=GRID * 16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    write(out, "phikon-v2", state, io, config, f"transformers {transformers.__version__} Dinov2Model (image_size 64, patch 16)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "encoders"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, p in timm_presets().items():
        make_timm_fixture(out, name, p)
    make_phikon_fixture(out)
    swin = Path(__file__).with_name("encoder_fixtures_swin.py")
    if swin.is_file():
        sys.path.insert(0, str(swin.parent))
        from encoder_fixtures_swin import make_ctranspath_fixture  # noqa: PLC0415

        make_ctranspath_fixture(out)
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    main()
