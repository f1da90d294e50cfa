"""Tissue segmentation and patch grids, on synthetic pyramidal TIFF slides read through OpenSlide."""
from __future__ import annotations

import colorsys
import dataclasses
import csv
import math

import h5py
import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from slide_factory import Blob, make_slide  # noqa: E402

from mmil.cli import main  # noqa: E402
from mmil.errors import MMILInputError  # noqa: E402
from mmil.wsi.slide import (  # noqa: E402
    choose_level,
    level0_magnification,
    list_slides,
    mpp_from_properties,
    open_slide,
    patch_geometry,
    read_downsampled,
    slide_id_from_path,
)
from mmil.wsi.tiling import TilingConfig, grid_coords, tile_slide  # noqa: E402
from mmil.wsi.tissue import TissueParams, box_fractions, filter_regions, otsu_threshold, rgb_saturation, segment_slide  # noqa: E402

# 512 x 512 um slides; blob areas ~1.5 and ~2.3 reference patches of (128 um)^2, debris ~0.08.
BLOBS = [Blob(150, 150, 90, "normal"), Blob(360, 340, 110, "tumor"), Blob(420, 90, 20, "normal")]
DEBRIS = BLOBS[2]
TISSUE = TissueParams(min_tissue_area=0.5, min_hole_area=0.05)
PATCH = 64  # pixels at 20x = 32 um


def ground_truth_fraction(slide, coords, size0, k=16):
    """Fraction of each level-0 square inside a blob, by k x k point sampling."""
    offs = (np.arange(k) + 0.5) / k * size0
    xs = coords[:, 0, None, None] + offs[None, None, :]
    ys = coords[:, 1, None, None] + offs[None, :, None]
    return slide.blob_mask(np.broadcast_to(xs, (len(coords), k, k)), np.broadcast_to(ys, (len(coords), k, k))).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    s20 = make_slide(d / "s20.tif", BLOBS, size_um=(512, 512), mpp=0.5, downsamples=(1, 2, 4, 8), seed=1)
    s40 = make_slide(d / "s40.tif", BLOBS, size_um=(512, 512), mpp=0.25, downsamples=(1, 4, 16), seed=2)
    return {"dir": d, "s20": s20, "s40": s40}


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_otsu_maximises_between_class_variance(seed):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.normal(30 + 10 * seed, 8, 700), rng.normal(150, 25, 300)])
    v = np.clip(np.rint(v), 0, 255).astype(np.uint8)

    def between(t):  # direct definition, per threshold
        lo, hi = v[v <= t].astype(float), v[v > t].astype(float)
        if lo.size == 0 or hi.size == 0:
            return 0.0
        w0, w1 = lo.size / v.size, hi.size / v.size
        return w0 * w1 * (lo.mean() - hi.mean()) ** 2

    sig = np.array([between(t) for t in range(256)])
    t = otsu_threshold(v)
    assert sig[t] == pytest.approx(sig.max(), rel=1e-9)
    assert t == int(np.argmax(sig))
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 0


def test_saturation_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(50, 3)).astype(np.uint8)
    rgb[0] = 0  # black: saturation 0 by convention
    got = rgb_saturation(rgb)
    want = [round(colorsys.rgb_to_hsv(*(c / 255.0 for c in p))[1] * 255) for p in rgb.tolist()]
    assert np.abs(got.astype(int) - np.array(want)).max() <= 1


def test_box_fractions_exact_against_cell_overlaps():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 13)) > 0.5
    u0 = rng.uniform(-2, 12, 40)
    v0 = rng.uniform(-2, 8, 40)
    u1 = u0 + rng.uniform(0.1, 6, 40)
    v1 = v0 + rng.uniform(0.1, 6, 40)
    got = box_fractions(mask, u0, v0, u1, v1)
    for k in range(40):
        inside = 0.0
        for r in range(mask.shape[0]):
            for c in range(mask.shape[1]):
                ox = max(0.0, min(u1[k], c + 1) - max(u0[k], c))
                oy = max(0.0, min(v1[k], r + 1) - max(v0[k], r))
                inside += mask[r, c] * ox * oy
        assert got[k] == pytest.approx(inside / ((u1[k] - u0[k]) * (v1[k] - v0[k])), abs=1e-9)


def test_filter_regions_area_and_holes():
    yy, xx = np.mgrid[0:80, 0:80]
    disk = (xx - 35) ** 2 + (yy - 35) ** 2 <= 30**2
    big_hole = (xx - 30) ** 2 + (yy - 30) ** 2 <= 8**2  # ~200 px
    small_hole = (xx - 48) ** 2 + (yy - 45) ** 2 <= 1  # 5 px
    speck = (xx - 75) ** 2 + (yy - 75) ** 2 <= 2**2  # 13 px, separate region
    mask = (disk & ~big_hole & ~small_hole) | speck
    out = filter_regions(mask, min_area=50, min_hole_area=20, max_holes=8)
    assert not out[speck].any()  # too small a region
    assert not out[big_hole].any()  # large hole stays out
    assert out[small_hole].all()  # small hole counts as tissue
    assert out[disk & ~big_hole].all()
    # max_holes=0 keeps no hole out
    assert filter_regions(mask, 50, 20, 0)[big_hole].all()
    # the region's area minus its excluded holes must exceed min_area
    area_net = int((disk & ~big_hole).sum())
    assert not filter_regions(mask, area_net + 1, 20, 8).any()


def test_choose_level_and_patch_geometry():
    assert choose_level([1, 4, 16], 2.0) == 0
    assert choose_level([1, 2, 4, 8], 2.0) == 1
    assert choose_level([1, 2.0004, 4.001], 2.0) == 1  # scanner rounding tolerated
    assert choose_level([1, 4, 16, 64], 32.0) == 2
    assert choose_level([1, 2], 0.5) == 0
    g = patch_geometry([1, 4, 16], 40.0, 20.0, 256)  # 40x slide without a 2x level
    assert (g.patch_level, g.read_size, g.target_patch_size, g.patch_size_level0, g.step_level0) == (0, 512, 256, 512, 512)
    g = patch_geometry([1, 2, 4], 40.0, 20.0, 256)
    assert (g.patch_level, g.read_size, g.patch_size_level0) == (1, 256, 512)
    g = patch_geometry([1, 4], 20.0, 20.0, 256, overlap=0.25)
    assert (g.patch_level, g.read_size, g.patch_size_level0, g.step_level0) == (0, 256, 256, 192)
    g = patch_geometry([1, 4, 16], 40.0, 5.0, 256)  # 5x: downsample 8 -> read level 1 (4x), 512 px
    assert (g.patch_level, g.read_size, g.patch_size_level0) == (1, 512, 2048)


def test_grid_coords_inside_image():
    g = grid_coords(300, 200, 64, 64)
    assert g.shape == (4 * 3, 2)
    assert g[:, 0].max() + 64 <= 300 and g[:, 1].max() + 64 <= 200
    assert grid_coords(50, 500, 64, 64).shape == (0, 2)


def test_mpp_and_magnification_from_properties():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}) == pytest.approx(0.25)
    assert mpp_from_properties({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}) == pytest.approx(0.5)
    assert mpp_from_properties({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}) == pytest.approx(0.25)
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}) is None
    assert level0_magnification({"openslide.mpp-x": "0.25"}) == pytest.approx(40.0)
    assert level0_magnification({"openslide.objective-power": "20"}) == pytest.approx(20.0)
    assert level0_magnification({}, override=40) == 40.0
    with pytest.raises(ValueError, match="--base-magnification"):
        level0_magnification({})


# ----------------------------------------------------------------------------- slides
def test_openslide_reads_the_synthetic_pyramid(slides):
    s = open_slide(slides["s40"].path)
    try:
        assert s.level_count == 3
        assert s.level_dimensions[0] == (2048, 2048)
        assert list(s.level_downsamples) == pytest.approx([1, 4, 16])
        assert mpp_from_properties(dict(s.properties)) == pytest.approx(0.25)
    finally:
        s.close()


def test_read_downsampled_matches_a_box_mean_of_level0(slides):
    s = open_slide(slides["s40"].path)  # levels 1, 4, 16: a 2x image must be made from level 0
    try:
        full = np.asarray(s.read_region((0, 0), 0, s.level_dimensions[0]))[..., :3].astype(np.float64)
        one, scale = read_downsampled(s, 2.0)
        strips, scale2 = read_downsampled(s, 2.0, max_strip_pixels=300_000)  # ~10 strips
    finally:
        s.close()
    assert one.shape == (1024, 1024, 3) and scale == scale2 == (2.0, 2.0)
    box = full.reshape(1024, 2, 1024, 2, 3).mean(axis=(1, 3))
    assert np.abs(one - box).mean() < 2.0
    assert np.abs(strips.astype(float) - one).mean() < 0.5  # no visible seams between strips


def test_tissue_mask_covers_blobs_not_background(slides):
    spec = slides["s20"]
    s = open_slide(spec.path)
    try:
        tm = segment_slide(s, TISSUE, mpp=spec.mpp)
    finally:
        s.close()
    assert tm.scale == (8.0, 8.0)  # the 8x level: the coarsest at or below 32x
    h, w = tm.mask.shape
    cy, cx = np.mgrid[0:h, 0:w]
    x0, y0 = (cx + 0.5) * 8.0, (cy + 0.5) * 8.0
    margin_um = 3 * 8.0 * spec.mpp  # 3 mask pixels: median filter and closing move edges slightly
    big = [b for b in spec.blobs if b is not DEBRIS]
    inner = np.zeros_like(tm.mask)
    outer = np.zeros_like(tm.mask)
    for b in big:
        d = np.hypot(x0 * spec.mpp - b.cx_um, y0 * spec.mpp - b.cy_um)
        inner |= d <= b.r_um - margin_um
        outer |= d <= b.r_um + margin_um
    assert tm.mask[inner].mean() > 0.99
    assert tm.mask[~outer].mean() < 0.001  # background and the debris blob are out
    area_um2 = tm.area_level0 * spec.mpp**2
    assert area_um2 == pytest.approx(sum(math.pi * b.r_um**2 for b in big), rel=0.05)


def test_patches_inside_tissue_and_count_matches_area(slides, tmp_path):
    spec = slides["s20"]
    cfg = TilingConfig(patch_size=PATCH, min_tissue_fraction=0.5, tissue=TISSUE)
    res = tile_slide(spec.path, "s20", tmp_path, cfg)
    assert res.status == "ok"
    with h5py.File(res.h5_path, "r") as f:
        coords = f["coords"][()]
    assert (coords % PATCH == 0).all()
    assert (coords >= 0).all() and (coords + PATCH <= 1024).all()
    gt = ground_truth_fraction(spec, coords, PATCH)
    assert gt.min() >= 0.5 - 0.15  # every kept patch really is (mostly) tissue
    debris_px = np.array([DEBRIS.cx_um, DEBRIS.cy_um]) / spec.mpp
    assert not (np.abs(coords + PATCH / 2 - debris_px).max(axis=1) < PATCH).any()
    # Count vs the ground-truth grid: only cells near the 0.5 threshold may differ.
    grid = grid_coords(1024, 1024, PATCH, PATCH)
    gt_all = ground_truth_fraction(spec, grid, PATCH)
    big_only = ground_truth_fraction(dataclasses.replace(spec, blobs=[b for b in spec.blobs if b is not DEBRIS]), grid, PATCH)
    expected = int((big_only >= 0.5).sum())
    ambiguous = int(((gt_all > 0.35) & (gt_all < 0.65)).sum())
    assert abs(len(coords) - expected) <= ambiguous
    # ... and vs the area: at most the boundary cells (perimeter crossings) differ.
    area_cells = sum(math.pi * (b.r_um / spec.mpp) ** 2 for b in spec.blobs if b is not DEBRIS) / PATCH**2
    boundary_cells = sum(8 * b.r_um / spec.mpp for b in spec.blobs if b is not DEBRIS) / PATCH
    assert abs(len(coords) - area_cells) <= boundary_cells / 2


def test_40x_slide_at_20x_has_half_the_linear_density(slides, tmp_path):
    cfg = TilingConfig(patch_size=PATCH, min_tissue_fraction=0.5, tissue=TISSUE)
    r20 = tile_slide(slides["s20"].path, "s20", tmp_path, cfg)
    r40 = tile_slide(slides["s40"].path, "s40", tmp_path, cfg)
    with h5py.File(r20.h5_path, "r") as f20, h5py.File(r40.h5_path, "r") as f40:
        c20, c40 = f20["coords"][()], f40["coords"][()]
        a20, a40 = dict(f20["coords"].attrs), dict(f40["coords"].attrs)
    assert a20["patch_size_level0"] == PATCH and a40["patch_size_level0"] == 2 * PATCH
    # 40x without a 2x level: read 128 px at level 0, resized to 64 later
    assert (a40["patch_level"], a40["patch_size"], a40["target_patch_size"]) == (0, 2 * PATCH, PATCH)
    assert (a20["patch_level"], a20["patch_size"], a20["target_patch_size"]) == (0, PATCH, PATCH)
    assert a40["level0_magnification"] == pytest.approx(40.0) and a40["target_magnification"] == pytest.approx(20.0)
    step20 = np.diff(np.unique(c20[:, 0])).min()
    step40 = np.diff(np.unique(c40[:, 0])).min()
    assert step40 == 2 * step20
    # same tissue, same physical patch size: (almost) the same number of patches ...
    assert abs(len(c40) - len(c20)) <= 0.1 * len(c20)
    # ... so per level-0 pixel of length, half as many
    density20 = math.sqrt(len(c20) / (1024 * 1024))
    density40 = math.sqrt(len(c40) / (2048 * 2048))
    assert density40 / density20 == pytest.approx(0.5, rel=0.05)
    # and the patches cover the same places: scaled 40x coordinates are 20x grid cells
    assert len(set(map(tuple, (c40 // 2).tolist())) & set(map(tuple, c20.tolist()))) >= 0.9 * len(c20)


def test_h5_layout_matches_clam(slides, tmp_path):
    cfg = TilingConfig(patch_size=PATCH, tissue=TISSUE)
    res = tile_slide(slides["s20"].path, "s20", tmp_path, cfg)
    assert res.h5_path == tmp_path / "patches" / "s20.h5"
    with h5py.File(res.h5_path, "r") as f:
        assert list(f.keys()) == ["coords"]
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.ndim == 2 and ds.shape[1] == 2 and ds.shape[0] == res.n_patches
        a = dict(ds.attrs)
        for key in ("patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name"):
            assert key in a, key  # CLAM's attribute names
        assert a["name"] == "s20"
        assert np.asarray(a["downsample"]).tolist() == [1.0, 1.0]
        assert np.asarray(a["level_dim"]).tolist() == [1024, 1024]
        for key in ("patch_size", "patch_level", "patch_size_level0", "target_magnification", "target_patch_size", "name"):
            assert key in f.attrs and f.attrs[key] == a[key]
    thumb = tmp_path / "thumbnails" / "s20.png"
    from PIL import Image

    img = np.asarray(Image.open(thumb).convert("RGB"))
    assert img.shape[:2] == (1024, 1024)
    assert ((img[..., 1] == 160) & (img[..., 0] == 0)).sum() > 100  # green tissue outline drawn
    assert ((img[..., 2] == 220) & (img[..., 0] == 30)).sum() > 100  # blue patch grid drawn


def test_corrupt_and_unscaled_slides_are_skipped_and_reported(slides, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.tif").write_bytes(slides["s20"].path.read_bytes())
    (d / "broken.svs").write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    make_slide(d / "nompp.tif", BLOBS[:1], size_um=(256, 256), mpp=0.5, downsamples=(1, 2), write_mpp=False)
    out = tmp_path / "out"
    rc = main(["tile", "--slides", str(d), "--out", str(out), "--patch-size", str(PATCH), "--min-tissue-area", "0.5", "--min-hole-area", "0.05", "--no-progress"])
    assert rc == 0  # some slides succeeded
    rows = {r["slide"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["good"]["status"] == "ok" and int(rows["good"]["n_patches"]) > 0
    assert rows["broken"]["status"] == "failed" and "broken.svs" in rows["broken"]["error"]
    assert rows["nompp"]["status"] == "failed" and "--base-magnification" in rows["nompp"]["error"]
    assert not (out / "patches" / "broken.h5").exists()
    err = capsys.readouterr().err
    assert "broken.svs" in err
    # resume: finished slides are kept, failures retried; --base-magnification rescues the unscaled one
    rc = main(["tile", "--slides", str(d), "--out", str(out), "--patch-size", str(PATCH), "--min-tissue-area", "0.5", "--min-hole-area", "0.05", "--base-magnification", "20", "--no-progress"])
    rows = {r["slide"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["good"]["status"] == "exists" and rows["nompp"]["status"] == "ok"
    # nothing readable at all -> exit status 1
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.svs").write_bytes(b"not a slide")
    assert main(["tile", "--slides", str(only_bad), "--out", str(tmp_path / "out2"), "--no-progress"]) == 1


def test_list_slides_directory_and_csv(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "b.ome.tiff").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [sid for sid, _ in list_slides(tmp_path)] == ["a", "b"]
    assert slide_id_from_path("x/y/case 1.ndpi") == "case 1"
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("slide_id,path\nfirst,a.svs\n")
    assert list_slides(csv_path) == [("first", tmp_path / "a.svs")]
    csv_path.write_text("file\na.svs\n")
    with pytest.raises(MMILInputError, match="'path'"):
        list_slides(csv_path)
    csv_path.write_text("path\na.svs\nsub/a.svs\n")
    with pytest.raises(MMILInputError, match="twice"):
        list_slides(csv_path)
    with pytest.raises(MMILInputError, match="no such slide directory"):
        list_slides(tmp_path / "empty_dir_that_does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMILInputError, match="no slide files"):
        list_slides(tmp_path / "empty")


def test_tile_config_from_yaml_and_bad_options(tmp_path, slides):
    cfg_path = tmp_path / "tile.yaml"
    cfg_path.write_text("patch_size: 64\ntissue:\n  min_tissue_area: 0.5\n  min_hole_area: 0.05\n")
    out = tmp_path / "o"
    assert main(["tile", "--slides", str(slides["dir"]), "--out", str(out), "--config", str(cfg_path), "--target-mag", "10", "--no-progress"]) == 0
    import json

    saved = json.loads((out / "tiling_config.json").read_text())
    assert saved["patch_size"] == 64 and saved["target_magnification"] == 10 and saved["tissue"]["min_tissue_area"] == 0.5
    with h5py.File(out / "patches" / "s40.h5", "r") as f:
        assert f["coords"].attrs["patch_size_level0"] == 256  # 64 px at 10x on a 40x slide
    cfg_path.write_text("patch_sise: 64\n")
    assert main(["tile", "--slides", str(slides["dir"]), "--out", str(out), "--config", str(cfg_path)]) == 2
    with pytest.raises(SystemExit) as exc:  # out of range: refused by the parser, before anything runs
        main(["tile", "--slides", str(slides["dir"]), "--out", str(out), "--min-tissue-fraction", "2"])
    assert exc.value.code == 2
