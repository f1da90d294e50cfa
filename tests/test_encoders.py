"""ViT encoder presets against fixtures made by timm / transformers (scripts/make_encoder_fixtures.py).

Each fixture is a tiny-width, two-block version of the released architecture with random weights, saved
in the released file's key names, plus the reference's embeddings of a fixed uint8 batch. Our
implementation must load it strictly and reproduce the embeddings to 1e-5 (relative to their scale).
The suite never imports timm, torchvision or transformers.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmil.errors import MMILInputError
from mmil.wsi.backbones import build_backbone, read_weight_file
from mmil.wsi.encoders import presets as presets_mod
from mmil.wsi.encoders.hf_dinov2 import hf_dinov2_filter
from mmil.wsi.encoders.presets import PRESETS, load_preset_weights
from mmil.wsi.encoders.vit import ViTConfig, VisionTransformer, resample_grid
from mmil.wsi.transforms import PatchTransform, normalize

FIXTURES = Path(__file__).parent / "fixtures" / "encoders"
VIT_PRESETS = ("uni", "uni2-h", "virchow2", "h-optimus-0", "gigapath", "phikon-v2")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Normalisation as each model card documents it (H-optimus-0: its own; the others: ImageNet's).
DOCUMENTED_NORM = {"uni": IMAGENET, "uni2-h": IMAGENET, "virchow2": IMAGENET, "gigapath": IMAGENET, "phikon-v2": IMAGENET,
                   "h-optimus-0": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))}


def fixture(name: str):
    """(weights path, tiny config overrides, io tensors)."""
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    return path, config, load_file(str(FIXTURES / f"{name}_io.safetensors"))


def embed(model, image: torch.Tensor, spec) -> torch.Tensor:
    with torch.no_grad():
        return model(normalize(image.to(torch.float32) / 255.0, spec.mean, spec.std))


def close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> bool:
    scale = max(1.0, float(expected.abs().max()))
    return got.shape == expected.shape and float((got - expected).abs().max()) <= tol * scale


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_preset_loads_its_fixture_strictly_and_matches_the_reference(name):
    spec = PRESETS[name]
    path, config, io = fixture(name)
    model = spec.build(**config).eval()
    state = read_weight_file(path)
    before = {k: v.clone() for k, v in state.items()}
    assert load_preset_weights(model, spec, state, str(path)) > 0
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)  # filter left its input alone
    for key in ("", "_dyn"):
        if f"image{key}" in io:
            got = embed(model, io[f"image{key}"], spec)
            assert close(got, io[f"expected{key}"]), f"{name}{key}: max diff {float((got - io[f'expected{key}']).abs().max()):.2e}"
    # as wide as the preset says, relative to the width (Virchow2: class token ++ patch mean = 2 D)
    assert got.shape[-1] * _full_width(spec) == spec.embed_dim * config["embed_dim"]


def _full_width(spec) -> int:
    with torch.device("meta"):
        return spec.build(depth=1).cfg.embed_dim


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_full_size_preset_has_the_documented_output(name):
    """The released widths (no blocks: embedding, tokens, final norm, pooling) map a 224 px batch to ``embed_dim``."""
    spec = PRESETS[name]
    model = spec.build(depth=0).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, spec.embed_dim)
    mean, std = DOCUMENTED_NORM[name]
    assert spec.mean == mean and spec.std == std and spec.input_size == 224


def test_a_renamed_or_missing_key_is_refused_naming_the_file_and_keys(tmp_path):
    spec = PRESETS["uni2-h"]
    path, config, _ = fixture("uni2-h")
    state = load_file(str(path))
    state["blocks.0.ls1.scale"] = state.pop("blocks.0.ls1.gamma")
    bad = tmp_path / "renamed.safetensors"
    save_file(state, str(bad))
    with pytest.raises(MMILInputError, match=r"renamed\.safetensors.*1 missing keys \['blocks\.0\.ls1\.gamma'\].*1 unexpected keys \['blocks\.0\.ls1\.scale'\]"):
        load_preset_weights(spec.build(**config), spec, read_weight_file(bad), str(bad))
    del state["blocks.0.ls1.scale"], state["reg_token"]
    with pytest.raises(MMILInputError, match=r"2 missing keys \['blocks\.0\.ls1\.gamma', 'reg_token'\], 0 unexpected"):
        load_preset_weights(spec.build(**config), spec, state, "cut.safetensors")


def test_weights_of_another_preset_are_refused_by_shape():
    """UNI's GELU MLP (fc2: 4D -> D) in GigaPath's SwiGLU-packed slot (fc2: 2.67D -> D): same keys, wrong shapes."""
    path, config, _ = fixture("uni")
    spec = PRESETS["gigapath"]
    with pytest.raises(MMILInputError, match=r"uni\.safetensors: weight shapes do not fit gigapath.*size mismatch"):
        load_preset_weights(spec.build(**config), spec, read_weight_file(path), str(path))


def test_phikon_filter_accepts_both_transformers_layouts_and_reports_incomplete_qkv():
    path, config, io = fixture("phikon-v2")
    legacy = load_file(str(path))
    assert "embeddings.mask_token" in legacy and "encoder.layer.1.attention.attention.query.weight" in legacy
    renamed = {k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key", "attention.k_proj")
               .replace("attention.attention.value", "attention.v_proj").replace("attention.output.dense", "attention.o_proj"): v
               for k, v in legacy.items()}
    a, b = hf_dinov2_filter(legacy), hf_dinov2_filter(renamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q, k, v = (legacy[f"encoder.layer.0.attention.attention.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(a["blocks.0.attn.qkv.weight"], torch.cat([q, k, v]))
    del legacy["encoder.layer.0.attention.attention.key.bias"]
    spec = PRESETS["phikon-v2"]
    with pytest.raises(MMILInputError, match=r"missing keys \['blocks\.0\.attn\.qkv\.bias'\].*unexpected keys \['encoder\.layer\.0\.attention"):
        load_preset_weights(spec.build(**config), spec, legacy, "phikon.safetensors")


def test_position_table_resampling_is_bicubic_and_a_no_op_on_the_native_grid():
    torch.manual_seed(0)
    pos = torch.randn(1, 9, 5)
    assert resample_grid(pos, (3, 3), antialias=True) is pos
    got = resample_grid(pos, (2, 4), antialias=False)
    ref = F.interpolate(pos.reshape(1, 3, 3, 5).permute(0, 3, 1, 2), size=(2, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(got, ref.permute(0, 2, 3, 1).reshape(1, 8, 5), atol=1e-6)
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=8, depth=1, num_heads=2, dynamic_img_size=False))
    with pytest.raises(ValueError, match="dynamic_img_size is off"):
        model(torch.zeros(1, 3, 42, 42))


def test_transform_normalises_with_the_preset_and_crops_like_resize_then_centercrop():
    spec = PRESETS["gigapath"]  # Resize(256, bicubic) + CenterCrop(224) = crop_pct 224/256
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    t = PatchTransform(28, spec.mean, spec.std, spec.resize, spec.crop_pct)
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255.0).unsqueeze(0)
    big = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)  # floor(28 / 0.875)
    ref = (big[0, :, 2:30, 2:30] - torch.tensor(IMAGENET[0]).view(3, 1, 1)) / torch.tensor(IMAGENET[1]).view(3, 1, 1)
    assert torch.allclose(t(img), ref, atol=1e-6)
    hopt = PRESETS["h-optimus-0"]
    flat = np.full((4, 4, 3), 128, dtype=np.uint8)
    got = PatchTransform(None, hopt.mean, hopt.std)(flat)[:, 0, 0]
    expected = [(128 / 255 - m) / s for m, s in zip(*DOCUMENTED_NORM["h-optimus-0"])]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


@pytest.fixture
def tiny_presets(monkeypatch):
    """Register each preset at its fixture's tiny size (same name, same transform), as the CLI sees them."""
    tiny = {}
    for name in VIT_PRESETS:
        _, config, _ = fixture(name)
        spec = PRESETS[name]
        tiny[name] = dataclasses.replace(spec, build=partial(spec.build, **config), input_size=config["img_size"],
                                         embed_dim=spec.embed_dim * config["embed_dim"] // _full_width(spec))
    monkeypatch.setattr(presets_mod, "PRESETS", {**PRESETS, **tiny})
    return tiny


def test_backbone_api_builds_presets_with_their_transform_and_seeded_random_weights(tiny_presets):
    path, _, io = fixture("virchow2")
    bb = build_backbone("virchow2", path)
    assert (bb.mean, bb.std, bb.interpolation, bb.crop_pct, bb.input_size) == (IMAGENET[0], IMAGENET[1], "bicubic", 1.0, 42)
    assert close(embed(bb.model, io["image"], bb), io["expected"])
    r1, r2 = (build_backbone("uni", random_weights=True, seed=3).model for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values()))
    with pytest.raises(MMILInputError, match="needs weights: download the released uni weights.*--weights"):
        build_backbone("uni")
    with pytest.raises(MMILInputError, match="nowhere.bin: weights file not found; download the released uni weights"):
        build_backbone("uni", "nowhere.bin")
    with pytest.raises(MMILInputError, match="unknown backbone.*uni2-h"):
        build_backbone("uni3", random_weights=True)


@pytest.mark.parametrize("name", ["uni", "gigapath"])
def test_mmil_extract_with_a_preset_matches_an_independent_pipeline(name, tiny_presets, tmp_path, capsys):
    """`mmil extract --backbone NAME --weights FILE` on a generated slide = read patch, resize (+crop), normalise, model."""
    pytest.importorskip("openslide")
    pytest.importorskip("tifffile")
    sys.path.insert(0, str(Path(__file__).parent))
    from slide_factory import Blob, make_slide  # noqa: PLC0415

    import h5py  # noqa: PLC0415

    from mmil.cli import main  # noqa: PLC0415
    from mmil.wsi.slide import open_slide, patch_geometry  # noqa: PLC0415
    from mmil.wsi.tiling import coords_attributes, write_coords_h5  # noqa: PLC0415

    sdir, cdir, out = tmp_path / "slides", tmp_path / "coords", tmp_path / "feats"
    sdir.mkdir()
    make_slide(sdir / "s.tif", [Blob(64, 64, 50, "tumor")], size_um=(128, 128), mpp=0.5, downsamples=(1, 2), seed=1)
    coords = np.array([[32, 32], [96, 64]], dtype=np.int64)
    write_coords_h5(cdir / "s.h5", coords, coords_attributes("s", patch_geometry([1, 2], 20.0, 20.0, 64), [(256, 256), (128, 128)], 0.5))
    path, config, _ = fixture(name)
    argv = ["extract", "--slides", str(sdir), "--coords", str(cdir), "--out", str(out), "--backbone", name, "--weights", str(path),
            "--workers", "0", "--device", "cpu", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    with h5py.File(out / "s.h5", "r") as f:
        feats = torch.from_numpy(f["features"][()])
        assert f.attrs["backbone"] == name and f.attrs["input_size"] == config["img_size"]
    spec, size = tiny_presets[name], config["img_size"]
    slide = open_slide(sdir / "s.tif")
    patches = [np.asarray(slide.read_region(tuple(int(v) for v in c), 0, (64, 64)))[..., :3] for c in coords]
    slide.close()
    x = torch.from_numpy(np.stack(patches).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    side = int(size / spec.crop_pct)
    x = F.interpolate(x, size=(side, side), mode=spec.resize, align_corners=False, antialias=True)
    x = x.clamp(0, 1) if spec.resize == "bicubic" else x
    top = (side - size) // 2 if side - size else 0
    x = x[..., top : top + size, top : top + size]
    model = spec.build()
    load_preset_weights(model, spec, read_weight_file(path), str(path))
    with torch.no_grad():
        ref = model.eval()(normalize(x, spec.mean, spec.std))
    assert close(feats, ref, 1e-4)
    if name == "uni":  # another model's file: refused (exit 2, one line naming it), nothing written
        wrong = FIXTURES / "phikon-v2.safetensors"
        assert main(argv[:5] + ["--out", str(tmp_path / "wrong"), "--backbone", name, "--weights", str(wrong)] + argv[11:]) == 2
        assert "phikon-v2.safetensors: not uni weights" in capsys.readouterr().err
        assert not list((tmp_path / "wrong").glob("*.h5"))


def test_the_encoders_import_neither_timm_nor_torchvision_nor_transformers():
    """No module of the package's encoders, nor this test file, imports them (statically: every import statement)."""
    src = Path(__file__).parents[1] / "src" / "mmil" / "wsi"
    files = [*sorted((src / "encoders").glob("*.py")), src / "backbones.py", src / "transforms.py", Path(__file__)]
    assert len(files) >= 7
    for path in files:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        banned = names & {"timm", "torchvision", "transformers"}
        assert not banned or (path.name == "backbones.py" and banned == {"timm"}), f"{path}: imports {banned}"
