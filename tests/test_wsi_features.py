"""Patch encoders (ResNet-50 with torchvision's names) and feature extraction from synthetic slides."""
from __future__ import annotations

import csv
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from slide_factory import Blob, corrupt_first_tile, make_slide  # noqa: E402

from mmil.cli import main  # noqa: E402
from mmil.errors import MMILInputError  # noqa: E402
from mmil.wsi.backbones import (  # noqa: E402
    RESNET50_BLOCKS,
    build_backbone,
    filter_torchvision_resnet,
    resnet50,
    resnet50_trunc,
)
from mmil.wsi.features import (  # noqa: E402
    ExtractConfig,
    extract_features,
    parse_shard,
    read_patch_plan,
    resolve_shard,
    shard_items,
)
from mmil.wsi.slide import open_slide, patch_geometry  # noqa: E402
from mmil.wsi.tiling import coords_attributes, write_coords_h5  # noqa: E402
from mmil.wsi.transforms import IMAGENET_MEAN, IMAGENET_STD, PatchTransform, normalize, resize, to_tensor  # noqa: E402

PATCH = 64
INPUT = 32  # backbone input side: small, so a random ResNet-50 runs fast on a CPU


# ----------------------------------------------------------------------------- ResNet-50 layout
def test_resnet50_state_dict_has_torchvision_names():
    sd = resnet50().state_dict()
    # stem: conv1 (1) + bn1 (weight, bias, running_mean, running_var, num_batches_tracked = 5);
    # each bottleneck: 3 convs + 3 BNs = 18; four projection shortcuts: conv + BN = 6 each; fc: 2.
    expected_count = 6 + 18 * sum(RESNET50_BLOCKS) + 6 * 4 + 2
    assert expected_count == 320
    assert len(sd) == 320
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.3.bn3.weight": (512,),
        "layer3.0.downsample.0.weight": (1024, 512, 1, 1),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.2.bn3.num_batches_tracked": (),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer1.1.downsample.0.weight" not in sd  # identity shortcuts after the first block


def test_trunc_drops_layer4_and_fc():
    full = set(resnet50().state_dict())
    trunc = resnet50_trunc()
    keys = set(trunc.state_dict())
    assert keys == {k for k in full if not k.startswith(("layer4.", "fc."))}
    assert len(keys) == 258
    with torch.no_grad():
        assert trunc.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1024)


def _reference_resnet_trunc(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet-50 (v1.5) up to layer3 + average pooling, written functionally from a state dict."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, n in enumerate(RESNET50_BLOCKS[:3], start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if (b == 0 and stage > 1) else 1
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1), p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            short = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1") if b == 0 else x
            x = F.relu(out + short)
    return x.mean(dim=(2, 3))


def _random_torchvision_file(tmp_path, fmt: str):
    """A full ResNet-50 state dict with non-trivial BN statistics, saved as torchvision would."""
    torch.manual_seed(123)
    sd = resnet50().state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = torch.randn_like(v) * 0.1
        elif k.endswith("running_var"):
            sd[k] = torch.rand_like(v) + 0.5
        elif k.endswith(".bias"):
            sd[k] = torch.randn_like(v) * 0.1
        elif k.endswith("bn1.weight") or ".bn" in k and k.endswith("weight"):
            sd[k] = torch.rand_like(v) * 0.5 + 0.25
    path = tmp_path / f"resnet50.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return sd, path


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_weights_load_and_match_functional_reference(tmp_path, fmt):
    sd, path = _random_torchvision_file(tmp_path, fmt)
    bb = build_backbone("resnet50-trunc", path)
    assert bb.out_dim == 1024 and bb.input_size == 224
    assert bb.report.loaded == 258
    assert sorted(bb.report.dropped) == sorted(k for k in sd if k.startswith(("layer4.", "fc.")))
    assert len(bb.report.dropped) == 62
    got_sd = bb.model.state_dict()
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.1.running_mean", "layer3.5.conv3.weight", "layer3.5.bn3.bias"):
        assert torch.equal(got_sd[k], sd[k]), k
    if fmt == "pth":  # one forward comparison is enough (ResNet-50 on a CPU is not free)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(bb.model(x), _reference_resnet_trunc(sd, x), atol=1e-4, rtol=1e-4)


def test_bad_weight_files_are_refused_with_a_clear_message(tmp_path):
    sd, _ = _random_torchvision_file(tmp_path, "pth")
    incomplete = {k: v for k, v in sd.items() if k != "layer2.1.conv2.weight"}
    torch.save(incomplete, tmp_path / "missing.pth")
    with pytest.raises(MMILInputError, match="missing keys.*layer2.1.conv2.weight"):
        build_backbone("resnet50-trunc", tmp_path / "missing.pth")
    extra = dict(sd, **{"layer3.6.conv1.weight": torch.zeros(1)})  # e.g. a ResNet-101 file
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(MMILInputError, match="unexpected keys.*layer3.6"):
        build_backbone("resnet50-trunc", tmp_path / "extra.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # not a state dict: code would run
    with pytest.raises(MMILInputError, match="weights_only=True"):
        build_backbone("resnet50-trunc", tmp_path / "pickled_module.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    assert build_backbone("resnet50-trunc", tmp_path / "wrapped.pth").report.loaded == 258
    with pytest.raises(MMILInputError, match="not found"):
        build_backbone("resnet50-trunc", tmp_path / "nope.pth")
    with pytest.raises(MMILInputError, match="--random-weights"):
        build_backbone("resnet50-trunc")
    with pytest.raises(MMILInputError, match="unknown backbone"):
        build_backbone("vgg16", random_weights=True)


def test_filter_does_not_modify_its_input():
    sd = resnet50().state_dict()
    kept, dropped = filter_torchvision_resnet(sd, 3)
    assert len(sd) == 320 and len(kept) == 258 and len(dropped) == 62


def test_timm_backbone_needs_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MMILInputError, match="needs timm"):
            build_backbone("timm:resnet18", random_weights=True)
    else:  # pragma: no cover - only where timm is installed
        bb = build_backbone("timm:resnet18", random_weights=True, input_size=None)
        assert bb.out_dim == 512


def test_random_weights_are_seeded():
    a = build_backbone("resnet50-trunc", random_weights=True, seed=5).model.state_dict()
    b = build_backbone("resnet50-trunc", random_weights=True, seed=5).model.state_dict()
    c = build_backbone("resnet50-trunc", random_weights=True, seed=6).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer1.0.conv1.weight"], c["layer1.0.conv1.weight"])


# ----------------------------------------------------------------------------- transforms
def test_transforms_match_the_definitions():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(8, 6, 3)).astype(np.uint8)
    t = to_tensor(img)
    assert t.shape == (3, 8, 6) and t.dtype == torch.float32
    assert np.allclose(t.numpy(), img.transpose(2, 0, 1) / 255.0)
    n = normalize(t, IMAGENET_MEAN, IMAGENET_STD)
    want = (img.transpose(2, 0, 1) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    assert np.allclose(n.numpy(), want, atol=1e-6)
    assert resize(t, 8).shape == (3, 8, 8)
    # antialiased 2x reduction of a 1-px checkerboard is its mean (no aliasing)
    board = ((np.indices((16, 16)).sum(axis=0) % 2) * 255).astype(np.uint8)
    small = resize(to_tensor(np.stack([board] * 3, axis=-1)), 8)[:, 1:-1, 1:-1]  # borders see the edge clamp
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=1e-6)
    x = torch.rand(3, 5, 5)
    assert resize(x, 5) is x
    out = PatchTransform(size=4)(img)
    assert out.shape == (3, 4, 4)
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 4)))


# ----------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def slide_set(tmp_path_factory):
    """Three small slides (20x) and hand-made coordinate files with 6 patches each."""
    root = tmp_path_factory.mktemp("feat")
    sdir, cdir = root / "slides", root / "coords"
    sdir.mkdir()
    specs = {}
    for i in range(3):
        blobs = [Blob(64, 64, 50, "normal"), Blob(192, 192, 50, "tumor" if i % 2 else "normal")]
        specs[f"s{i}"] = make_slide(sdir / f"s{i}.tif", blobs, size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4), seed=i)
    geometry = patch_geometry([1, 2, 4], 20.0, 20.0, PATCH)
    coords = np.array([[64, 64], [128, 64], [64, 128], [320, 320], [384, 320], [320, 384]], dtype=np.int64)
    for sid in specs:
        write_coords_h5(cdir / f"{sid}.h5", coords, coords_attributes(sid, geometry, [(512, 512), (256, 256), (128, 128)], 0.5))
    return root, sdir, cdir, specs, coords


def _cfg(**kw):
    base = dict(random_weights=True, seed=0, input_size=INPUT, batch_size=4, workers=0, device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


def test_features_h5_layout_determinism_and_reference(slide_set, tmp_path):
    root, sdir, cdir, specs, coords = slide_set
    slides = [("s0", sdir / "s0.tif")]
    res = extract_features(slides, cdir, tmp_path / "a", _cfg(), progress=False)
    assert [r.status for r in res] == ["ok"]
    with h5py.File(tmp_path / "a" / "s0.h5", "r") as f:
        assert set(f.keys()) == {"features", "coords"}
        feats, got_coords = f["features"][()], f["coords"][()]
        assert f["features"].dtype == np.float32 and feats.shape == (6, 1024)
        assert f["coords"].dtype == np.int64 and np.array_equal(got_coords, coords)
        assert f["coords"].attrs["patch_size"] == PATCH and f["coords"].attrs["patch_level"] == 0  # copied from the coordinate file
        assert f.attrs["backbone"] == "resnet50-trunc" and f.attrs["input_size"] == INPUT
    # deterministic: a second run (other batch size, worker processes) gives the same numbers
    extract_features(slides, cdir, tmp_path / "b", _cfg(batch_size=5, workers=2), progress=False)
    with h5py.File(tmp_path / "b" / "s0.h5", "r") as f:
        assert np.allclose(f["features"][()], feats, atol=1e-5)
    # independent reference: read patch 4 ourselves, transform, run the model
    model = build_backbone("resnet50-trunc", random_weights=True, seed=0).model
    s = open_slide(sdir / "s0.tif")
    rgba = np.asarray(s.read_region(tuple(int(v) for v in coords[4]), 0, (PATCH, PATCH)))
    s.close()
    x = (torch.from_numpy(rgba[..., :3].transpose(2, 0, 1).astype(np.float32)) / 255.0).unsqueeze(0)
    x = F.interpolate(x, size=(INPUT, INPUT), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    assert np.allclose(feats[4], ref, atol=1e-4, rtol=1e-4)
    # tumor and normal patches differ (the colour/texture reaches the features)
    assert not np.allclose(feats[0], feats[3], atol=1e-3)


def test_resume_skips_finished_slides_and_reports_bad_ones(slide_set, tmp_path, capsys):
    root, sdir, cdir, specs, coords = slide_set
    work = tmp_path / "slides"
    work.mkdir()
    for sid in ("s0", "s1"):
        (work / f"{sid}.tif").symlink_to(sdir / f"{sid}.tif")
    (work / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    make_slide(work / "badtile.tif", [Blob(64, 64, 50, "normal")], size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4), compression="zlib")
    corrupt_first_tile(work / "badtile.tif")  # opens fine; reading patches in the first tile fails
    (work / "untiled.tif").symlink_to(sdir / "s2.tif")
    cd = tmp_path / "coords"
    cd.mkdir()
    for sid in ("s0", "s1", "broken", "badtile"):
        (cd / f"{sid}.h5").write_bytes((cdir / "s0.h5").read_bytes())
    out = tmp_path / "out"
    argv = ["extract", "--slides", str(work), "--coords", str(cd), "--out", str(out), "--random-weights", "--input-size", str(INPUT), "--workers", "0", "--batch-size", "6", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    rows = {r["slide"]: r for r in csv.DictReader((out / "extract_summary.csv").open())}
    assert rows["s0"]["status"] == "ok" and rows["s1"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and "broken.tif" in rows["broken"]["error"]
    assert rows["badtile"]["status"] == "failed" and "badtile.tif" in rows["badtile"]["error"] and "OpenSlideError" in rows["badtile"]["error"]
    assert rows["untiled"]["status"] == "skipped" and "no coordinate file" in rows["untiled"]["error"]
    assert not (out / "broken.h5").exists()
    assert "broken.tif" in capsys.readouterr().err
    mtime = os.stat(out / "s0.h5").st_mtime_ns
    assert main(argv) == 0
    rows = {r["slide"]: r for r in csv.DictReader((out / "extract_summary.csv").open())}
    assert rows["s0"]["status"] == "exists" and rows["s1"]["status"] == "exists"
    assert os.stat(out / "s0.h5").st_mtime_ns == mtime  # not rewritten


def test_sharding_splits_slides_disjointly(slide_set, tmp_path):
    root, sdir, cdir, specs, coords = slide_set
    slides = [(f"s{i}", sdir / f"s{i}.tif") for i in range(3)]
    done = []
    for i in range(2):
        res = extract_features(slides, cdir, tmp_path / "o", _cfg(shard=(i, 2), batch_size=6), progress=False)
        done.append({r.slide for r in res})
        assert (tmp_path / "o" / f"extract_summary.shard{i}-of-2.csv").is_file()
    assert done[0].isdisjoint(done[1]) and done[0] | done[1] == {"s0", "s1", "s2"}
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1-4", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert resolve_shard(None, {"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert resolve_shard((1, 2), {"RANK": "3", "WORLD_SIZE": "8"}) == (1, 2)
    assert resolve_shard(None, {}) == (0, 1)
    items = list(range(10))
    shares = [shard_items(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == items


def test_extract_without_weights_stops_before_writing(slide_set, tmp_path, capsys):
    root, sdir, cdir, specs, coords = slide_set
    out = tmp_path / "out"
    assert main(["extract", "--slides", str(sdir), "--coords", str(cdir), "--out", str(out), "--no-progress"]) == 2
    assert "--weights" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exc:  # a bad --shard is refused by the parser
        main(["extract", "--slides", str(sdir), "--coords", str(cdir), "--out", str(out), "--random-weights", "--shard", "2/2"])
    assert exc.value.code == 2
    assert main(["extract", "--slides", str(sdir), "--coords", str(tmp_path / "nowhere"), "--out", str(out), "--random-weights"]) == 2
    assert not out.exists()


def test_patch_plan_reads_clam_and_trident_layouts(tmp_path):
    coords = np.array([[0, 0], [512, 0]], dtype=np.int64)
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM: patch_size at patch_level, nothing else
        d = f.create_dataset("coords", data=coords)
        d.attrs["patch_size"] = 512
        d.attrs["patch_level"] = 0
    plan = read_patch_plan(tmp_path / "clam.h5")
    assert (plan.level, plan.read_size, plan.target_size) == (0, 512, 512)
    with h5py.File(tmp_path / "trident.h5", "w") as f:  # TRIDENT: patch_size is the target size
        d = f.create_dataset("coords", data=coords)
        d.attrs["patch_size"] = 256
        d.attrs["patch_size_level0"] = 512
    plan = read_patch_plan(tmp_path / "trident.h5")
    assert (plan.level, plan.read_size, plan.target_size) == (0, 512, 256)
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f.create_dataset("coords", data=coords)
    with pytest.raises(MMILInputError, match="patch_size/patch_level"):
        read_patch_plan(tmp_path / "bare.h5")
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(MMILInputError, match="corrupt.h5"):
        read_patch_plan(tmp_path / "corrupt.h5")


def test_rescaled_40x_patches_reach_the_backbone_at_target_size(tmp_path):
    """A 40x slide tiled at 20x: 2*PATCH px read at level 0 and resized to PATCH (input_size=None)."""
    spec = make_slide(tmp_path / "s40.tif", [Blob(64, 64, 60, "tumor")], size_um=(128, 128), mpp=0.25, downsamples=(1, 4))
    geometry = patch_geometry([1, 4], 40.0, 20.0, PATCH)
    assert (geometry.patch_level, geometry.read_size) == (0, 2 * PATCH)
    coords = np.array([[64, 64]], dtype=np.int64)
    write_coords_h5(tmp_path / "c" / "s40.h5", coords, coords_attributes("s40", geometry, [(512, 512), (128, 128)], 0.25))
    res = extract_features([("s40", spec.path)], tmp_path / "c", tmp_path / "f", _cfg(input_size=0), progress=False)
    assert res[0].status == "ok"
    with h5py.File(tmp_path / "f" / "s40.h5", "r") as f:
        feats = f["features"][()]
        assert f.attrs["input_size"] == PATCH
    s = open_slide(spec.path)
    rgb = np.asarray(s.read_region((64, 64), 0, (2 * PATCH, 2 * PATCH)))[..., :3]
    s.close()
    x = PatchTransform(PATCH)(rgb).unsqueeze(0)
    with torch.no_grad():
        ref = build_backbone("resnet50-trunc", random_weights=True, seed=0).model(x)[0].numpy()
    assert np.allclose(feats[0], ref, atol=1e-4, rtol=1e-4)
