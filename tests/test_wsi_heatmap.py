"""Heatmaps: score geometry, GeoJSON for QuPath, PNG overlays from a checkpoint."""
from __future__ import annotations

import csv
import json
import uuid

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from slide_factory import Blob, make_slide  # noqa: E402

from mmil.checkpoint import save_checkpoint  # noqa: E402
from mmil.cli import main  # noqa: E402
from mmil.models import create_model  # noqa: E402
from mmil.wsi.features import write_features_h5  # noqa: E402
from mmil.wsi.heatmap import bag_scores  # noqa: E402
from mmil.wsi.heatmap_geometry import (  # noqa: E402
    grid_step,
    normalize_scores,
    patch_size_from_attrs,
    patch_squares,
    score_bin,
    score_canvas,
    scores_to_geojson,
    squares_to_coords,
)
from mmil.wsi.slide import patch_geometry  # noqa: E402
from mmil.wsi.tiling import coords_attributes  # noqa: E402

PATCH = 64


def shoelace(ring):
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


# ----------------------------------------------------------------------------- pure functions
def test_squares_round_trip_to_coords():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 100_000, size=(50, 2))
    sq = patch_squares(coords, 512)
    assert sq.shape == (50, 5, 2)
    assert np.array_equal(sq[:, 0], sq[:, 4])  # closed rings
    back, side = squares_to_coords(sq)
    assert np.array_equal(back, coords) and np.all(side == 512)
    assert all(shoelace(r) == pytest.approx(512**2) for r in sq)  # positive: counter-clockwise with y up


def validate_feature_collection(obj, n):
    """The GeoJSON structure (RFC 7946) plus the properties QuPath reads."""
    assert obj["type"] == "FeatureCollection" and len(obj["features"]) == n
    ids = set()
    for f in obj["features"]:
        assert f["type"] == "Feature"
        ids.add(str(uuid.UUID(f["id"])))  # QuPath object ids are UUIDs
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = geom["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in ring)
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert isinstance(props["measurements"], dict) and isinstance(props["measurements"]["score"], float)
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3 and all(0 <= c <= 255 for c in cls["color"])
    assert len(ids) == n


def test_geojson_is_valid_and_squares_map_back():
    coords = np.array([[0, 0], [256, 0], [256, 512], [1024, 768]])
    scores = np.array([0.1, 0.7, 0.4, 0.9])
    geo = json.loads(json.dumps(scores_to_geojson(coords, scores, 256, slide_id="s")))
    validate_feature_collection(geo, 4)
    rings = np.array([f["geometry"]["coordinates"][0] for f in geo["features"]])
    back, side = squares_to_coords(rings)
    assert np.array_equal(back, coords) and np.all(side == 256)
    assert [f["properties"]["score"] for f in geo["features"]] == scores.tolist()
    ranks = [f["properties"]["measurements"]["score_rank"] for f in geo["features"]]
    assert ranks == pytest.approx([0.0, 2 / 3, 1 / 3, 1.0])
    assert geo["features"][3]["properties"]["classification"]["name"] == "heatmap 0.9-1.0"
    assert geo["features"][0]["properties"]["classification"]["name"] == "heatmap 0.0-0.1"
    assert score_bin(1.0) == 9 and score_bin(0.0) == 0 and score_bin(0.55) == 5


def test_normalize_scores():
    from scipy.stats import rankdata

    rng = np.random.default_rng(1)
    s = np.round(rng.random(30), 1)  # with ties
    assert np.allclose(normalize_scores(s, "rank"), (rankdata(s) - 1) / 29)
    assert np.allclose(normalize_scores(s, "minmax"), (s - s.min()) / (s.max() - s.min()))
    assert np.allclose(normalize_scores(np.array([-1.0, 0.5, 3.0]), "none"), [0.0, 0.5, 1.0])
    assert np.allclose(normalize_scores(np.ones(3), "minmax"), 0.5)
    with pytest.raises(ValueError):
        normalize_scores(s, "zscore")


def test_score_canvas_matches_a_pixel_loop():
    coords = np.array([[0, 0], [40, 0], [20, 20], [90, 50]])
    scores = np.array([1.0, 2.0, 4.0, 8.0])
    size0, scale, shape = 40, (10.0, 10.0), (8, 12)
    got = score_canvas(coords, scores, size0, shape, scale)
    want = np.full(shape, np.nan)
    for r in range(shape[0]):
        for c in range(shape[1]):
            hit = [s for (x, y), s in zip(coords, scores) if x <= c * 10 < x + size0 and y <= r * 10 < y + size0]
            if hit:
                want[r, c] = np.mean(hit)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got[~np.isnan(got)], want[~np.isnan(want)])


def test_patch_size_from_attributes_and_grid():
    assert patch_size_from_attrs({"patch_size_level0": 512, "patch_size": 256}) == 512
    assert patch_size_from_attrs({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}) == 1024  # CLAM
    assert patch_size_from_attrs({"patch_size": 256, "patch_level": 0}) == 256
    assert patch_size_from_attrs({}) is None
    assert grid_step(np.array([[0, 0], [512, 0], [1536, 512]])) == 512
    assert grid_step(np.array([[5, 5]])) is None


def test_bag_scores_average_over_seeds():
    torch.manual_seed(0)
    model = create_model("mmil", in_dim=16, n_classes=2, embed_dim=32, num_subbags=3).eval()
    x = torch.randn(20, 16)
    scores, probs = bag_scores(model, x, None, None, [3, 4, 5])
    with torch.no_grad():
        outs = [model(x.unsqueeze(0), None, seed=s, return_scores=True) for s in (3, 4, 5)]
    assert np.allclose(scores, np.mean([o.instance_scores[0].numpy() for o in outs], axis=0), atol=1e-6)
    assert np.allclose(probs, np.mean([o.probs[0].numpy() for o in outs], axis=0), atol=1e-6)
    assert scores.shape == (20,) and np.all(scores >= 0)


def test_every_registered_model_gives_heatmap_scores():
    from mmil.models import list_models

    torch.manual_seed(0)
    x, coords = torch.randn(12, 8), torch.rand(12, 2) * 1000
    for name in list_models():
        model = create_model(name, in_dim=8, n_classes=2).eval()
        scores, probs = bag_scores(model, x, coords, None, [0, 1])
        assert scores.shape == (12,) and np.isfinite(scores).all(), name
        assert probs.shape == (2,) and probs.sum() == pytest.approx(1.0), name


# ----------------------------------------------------------------------------- command
@pytest.fixture()
def heatmap_inputs(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    make_slide(slides / "a.tif", [Blob(128, 128, 100, "tumor")], size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4))
    make_slide(slides / "b.tif", [Blob(128, 128, 100, "normal")], size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4))
    feats = tmp_path / "features"
    geometry = patch_geometry([1, 2, 4], 20.0, 20.0, PATCH)
    attrs = coords_attributes("a", geometry, [(512, 512), (256, 256), (128, 128)], 0.5)
    rng = np.random.default_rng(0)
    coords = np.array([[x, y] for y in range(64, 448, 64) for x in range(64, 448, 64)], dtype=np.int64)
    for sid in ("a", "b", "orphan"):  # "orphan" has features but no slide file
        write_features_h5(feats / f"{sid}.h5", rng.normal(size=(len(coords), 8)).astype(np.float32), coords, attrs, {})
    torch.manual_seed(0)
    kwargs = {"in_dim": 8, "n_classes": 2, "embed_dim": 16, "num_subbags": 3, "heads": 2, "head_dim": 8}
    model = create_model("mmil", **kwargs)
    # the model's full options (a checkpoint without min_subbag_size is read as one made before it existed)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, "mmil", dict(model.init_kwargs), {"class_names": ["normal", "tumor"]})
    return tmp_path, slides, feats, ckpt, coords, model


def test_heatmap_command_writes_png_geojson_and_scores(heatmap_inputs, capsys):
    root, slides, feats, ckpt, coords, model = heatmap_inputs
    out = root / "heat"
    rc = main(["heatmap", "--checkpoint", str(ckpt), "--features", str(feats), "--slides", str(slides), "--out", str(out),
               "--repeats", "2", "--seed", "7", "--thumbnail-size", "256", "--no-progress"])
    assert rc == 0
    rows = {r["slide"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok"
    assert rows["orphan"]["status"] == "failed" and "no slide file" in rows["orphan"]["error"]
    assert "orphan" in capsys.readouterr().err
    # scores equal an independent recomputation with the same seeds
    with h5py.File(feats / "a.h5", "r") as f:
        x = torch.from_numpy(f["features"][()])
    scores, probs = bag_scores(model.eval(), x, torch.from_numpy(coords).float(), None, [7, 8])
    table = list(csv.DictReader((out / "a_scores.csv").open()))
    assert np.array_equal(np.array([[int(r["x"]), int(r["y"])] for r in table]), coords)
    assert np.allclose([float(r["score"]) for r in table], scores, rtol=1e-5, atol=1e-9)
    assert float(rows["a"]["prob_tumor"]) == pytest.approx(probs[1], abs=1e-5)
    assert rows["a"]["pred_label"] == ["normal", "tumor"][int(np.argmax(probs))]
    # GeoJSON: valid, one square per patch, back to the feature file's coordinates
    geo = json.loads((out / "a.geojson").read_text())
    validate_feature_collection(geo, len(coords))
    back, side = squares_to_coords(np.array([f["geometry"]["coordinates"][0] for f in geo["features"]]))
    assert np.array_equal(back, coords) and np.all(side == PATCH)
    assert np.allclose([f["properties"]["score"] for f in geo["features"]], scores, rtol=1e-5, atol=1e-9)
    # PNG: a real image with the overlay colours where the patches are
    from PIL import Image

    img = Image.open(out / "a.png")
    assert img.format == "PNG" and min(img.size) >= 200
    assert (out / "b.png").is_file() and not (out / "orphan.png").exists()


def test_heatmap_refuses_mismatched_checkpoint(heatmap_inputs, tmp_path):
    root, slides, feats, ckpt, coords, model = heatmap_inputs
    kwargs = {"in_dim": 4, "n_classes": 2, "embed_dim": 16, "num_subbags": 3, "heads": 2, "head_dim": 8}
    other = save_checkpoint(tmp_path / "other", create_model("mmil", **kwargs), "mmil", kwargs, {})
    assert main(["heatmap", "--checkpoint", str(other), "--features", str(feats), "--slides", str(slides), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["heatmap", "--checkpoint", str(tmp_path / "none"), "--features", str(feats), "--slides", str(slides), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["heatmap", "--checkpoint", str(ckpt), "--features", str(feats), "--slides", str(slides), "--out", str(tmp_path / "o"), "--cmap", "no_such_map"]) == 2
    assert main(["heatmap", "--checkpoint", str(ckpt), "--features", str(feats), "--slides", str(slides), "--out", str(tmp_path / "o"), "--grouping", "bogus"]) == 2
    assert not (tmp_path / "o").exists()  # nothing written when the run cannot start
