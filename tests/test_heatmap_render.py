"""Heatmap drawing: scale bar, honest colorbar, top-k gallery, smoothing that keeps the mean (pure parts and figures)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mmil.wsi.heatmap import patch_crops
from mmil.wsi.heatmap_render import (
    display_values,
    nice_length,
    render_gallery,
    render_overlay,
    scale_bar,
    smooth_grid,
    top_k_patches,
)


def _axes_with_gid(fig, gid):
    return [ax for ax in fig.axes if ax.get_gid() == gid]


def _scale_bars(fig):
    return [p for ax in fig.axes for p in ax.patches if p.get_gid() == "scale-bar"]


# ----------------------------------------------------------------------------- scale bar
@pytest.mark.parametrize("mpp,downsample,width", [(0.25, 16.0, 1024), (0.5, 3.7, 300), (0.2527, 61.3, 777), (1.0, 1.0, 160)])
def test_scale_bar_length_is_micrometres_over_mpp_times_downsample(mpp, downsample, width):
    um, px = scale_bar(mpp, downsample, width)
    assert px == pytest.approx(um / (mpp * downsample), rel=1e-12)
    mantissa = um / 10 ** math.floor(math.log10(um))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-9  # a round length
    target = 0.2 * width * mpp * downsample
    assert target / 2.5 < um <= target * (1 + 1e-12)  # the largest round length not above a fifth of the image
    thumb = np.full((120, width, 3), 255, np.uint8)
    fig = render_overlay(thumb, np.full((120, width), np.nan), cmap="viridis", alpha=0.35, limits=(0.0, 1.0), label="x", title="t",
                         bar=(um, px))
    bars = _scale_bars(fig)
    assert len(bars) == 2 and all(b.get_width() == pytest.approx(px) for b in bars)  # drawn in thumbnail pixels, on both panels


def test_nice_length_and_unknown_scale():
    assert [nice_length(t) for t in (1.0, 1.9, 2.0, 4.99, 5.0, 9.99, 10.0, 0.37, 740.0)] == pytest.approx([1, 1, 2, 2, 5, 5, 10, 0.2, 500])
    assert scale_bar(None, 4.0, 500) is None
    fig = render_overlay(np.zeros((50, 60, 3), np.uint8), np.zeros((50, 60)), cmap="viridis", alpha=0.35, limits=(0.0, 1.0), label="x",
                         title="t", bar=None)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("scale unknown") == 2 and not _scale_bars(fig)


# ----------------------------------------------------------------------------- colorbar
def test_raw_colorbar_spans_the_raw_min_max_and_says_so():
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(200))  # attention weights: all far below 1
    values, limits, label = display_values(scores, "none", "attention")
    assert np.array_equal(values, scores) and limits == (scores.min(), scores.max())
    assert label == "attention (raw)"
    fig = render_overlay(np.zeros((20, 10, 3), np.uint8), values[:200].reshape(20, 10), cmap="viridis", alpha=0.35, limits=limits,
                         label=label, title="t", bar=None)
    (cax,) = _axes_with_gid(fig, "colorbar")
    assert cax.get_ylim() == pytest.approx((scores.min(), scores.max()))
    assert cax.get_ylabel() == "attention (raw)"


def test_normalised_colorbars_say_how():
    s = np.array([0.3, 0.1, 0.1, 0.9])
    values, limits, label = display_values(s, "rank", "attention")
    assert limits == (0.0, 1.0) and label == "attention, rank-normalised 0-1"
    assert np.allclose(values, [2 / 3, 0.5 / 3, 0.5 / 3, 1.0])  # 0-based ranks (ties share theirs) over N - 1
    values, limits, label = display_values(s, "minmax", "instance score")
    assert limits == (0.0, 1.0) and label == "instance score, min-max normalised 0-1"
    assert np.allclose(values, (s - 0.1) / 0.8)
    _, limits, _ = display_values(np.full(3, 0.25), "none")
    assert limits == (-0.25, 0.75)  # equal scores: a range around them, not an empty one


# ----------------------------------------------------------------------------- gallery
def test_gallery_picks_the_k_highest_scores_in_order():
    rng = np.random.default_rng(1)
    scores = rng.permutation(60) / 7.0
    got = top_k_patches(scores, 8)
    remaining, want = list(range(60)), []
    for _ in range(8):  # naive: take the maximum, remove it, repeat
        best = max(remaining, key=lambda i: scores[i])
        want.append(best)
        remaining.remove(best)
    assert got.tolist() == want
    assert top_k_patches(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]  # ties: lower index first
    assert top_k_patches(scores, 100).tolist() == np.argsort(-scores).tolist() and top_k_patches(scores, 0).size == 0


class _FakeSlide:
    """Two levels (downsample 1 and 2) of a known image, read like OpenSlide (RGBA, level-0 location)."""

    def __init__(self, img):
        self.levels = [img, img[::2, ::2]]
        self.level_downsamples = (1.0, 2.0)

    def read_region(self, location, level, size):
        d = int(self.level_downsamples[level])
        x, y = location[0] // d, location[1] // d
        rgb = self.levels[level][y : y + size[1], x : x + size[0]]
        return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)


def test_gallery_crops_are_read_at_the_patch_level():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    coords = np.array([[0, 0], [64, 128], [192, 32]])
    crops = patch_crops(_FakeSlide(img), coords, [2, 0], 64, level=1)
    assert [c.shape for c in crops] == [(32, 32, 3)] * 2  # 64 level-0 pixels at downsample 2
    assert np.array_equal(crops[0], img[32:96, 192:256][::2, ::2]) and np.array_equal(crops[1], img[0:64, 0:64][::2, ::2])
    fig = render_gallery(crops, [0.9, 0.5], coords[[2, 0]].tolist(), title="t", noun="attention")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["#1  attention 0.9\n(192, 32)", "#2  attention 0.5\n(0, 0)"]


# ----------------------------------------------------------------------------- smoothing
def _naive_smooth(grid, sigma):
    """out_i = x_i + sum_{j != i} g_ij m_j (x_j - x_i), g the product of 1-D gaussian weights truncated at 4 sigma (scipy's)."""
    r = int(4.0 * sigma + 0.5)
    w1 = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w1 /= w1.sum()
    h, w = grid.shape
    out = grid.copy()
    for i in range(h):
        for j in range(w):
            if np.isnan(grid[i, j]):
                continue
            acc = 0.0
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    a, b = i + di, j + dj
                    if (di or dj) and 0 <= a < h and 0 <= b < w and not np.isnan(grid[a, b]):
                        acc += w1[di + r] * w1[dj + r] * (grid[a, b] - grid[i, j])
            out[i, j] = grid[i, j] + acc
    return out


def test_smoothing_keeps_the_mean_and_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    grid = rng.random((14, 17))
    grid[rng.random(grid.shape) < 0.3] = np.nan  # background cells
    grid[:3, :4] = np.nan
    for sigma in (0.7, 1.5, 3.0):
        out = smooth_grid(grid, sigma)
        assert np.array_equal(np.isnan(out), np.isnan(grid))
        assert np.nanmean(out) == pytest.approx(np.nanmean(grid), abs=1e-12)
        assert np.nanmin(grid) - 1e-12 <= np.nanmin(out) and np.nanmax(out) <= np.nanmax(grid) + 1e-12  # convex combinations
        assert np.nanstd(out) < np.nanstd(grid)  # it does smooth
        np.testing.assert_allclose(out, _naive_smooth(grid, sigma), atol=1e-10)
    assert np.array_equal(smooth_grid(grid, 0.0), grid, equal_nan=True)
    with pytest.raises(ValueError):
        smooth_grid(grid, -1.0)


def test_overlay_mask_is_the_tissue_not_the_glass():
    from mmil.wsi.heatmap_render import tissue_pixels

    rng = np.random.default_rng(4)
    h, w = 60, 80
    img = np.clip(np.array([242, 241, 244]) + rng.normal(0, 1.5, (h, w, 3)), 0, 255).astype(np.uint8)  # glass with noise
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 30) ** 2 + (xx - 25) ** 2 <= 15**2
    pale = (yy - 30) ** 2 + (xx - 62) ** 2 <= 8**2
    img[disc] = (96, 52, 140)  # dark tumour
    img[pale] = (226, 190, 210)  # pale stroma
    assert np.array_equal(tissue_pixels(img), disc | pale)
    assert tissue_pixels(np.broadcast_to(np.array([226, 152, 190], np.uint8), (10, 10, 3))).all()  # all tissue: kept by the cap
