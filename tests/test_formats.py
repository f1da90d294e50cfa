"""Other tools' layouts: TRIDENT job roots, STAMP feature files and CLAM split folders are read by
`mmil train`; `mmil extract --layout trident --pt` writes TRIDENT's layout and CLAM's .pt files.

The layouts come from :mod:`layout_writers`, written as each tool documents them. Checks compare
what is read against the arrays written, and which slides land in which fold against the split files.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from layout_writers import write_clam_splits, write_stamp_features, write_trident_job

from mmil.cli import main
from mmil.data import load_dataset, read_bag_file
from mmil.wsi.layouts import patch_attributes

LABEL = {i: ("tumor" if i % 2 else "normal") for i in range(8)}
IDS = [f"slide_{i}" for i in range(8)]
TRAIN = ["--model", "mean", "--embed-dim", "8", "--epochs", "2", "--min-epochs", "1", "--repeats", "1", "--threads", "1", "--no-progress"]


def _bags(dim: int = 8, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, sid in enumerate(IDS):
        n = 4 + i
        out[sid] = ((rng.standard_normal((n, dim)) + (i % 2)).astype(np.float32), rng.integers(0, 5000, size=(n, 2)) * 2)
    return out


def _labels(path: Path, ids=IDS) -> Path:
    path.write_text("case_id,slide_id,label\n" + "".join(f"case_{sid},{sid},{LABEL[IDS.index(sid)]}\n" for sid in ids))
    return path


def _folds(run: Path) -> list[dict]:
    return json.loads((run / "folds.json").read_text())


def _predicted(run: Path, k: int) -> list[str]:
    return [r["slide_id"] for r in csv.DictReader((run / f"fold_{k}" / "predictions.csv").open())]


def _one_line_error(capsys, argv, *patterns) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for p in patterns:
        assert p in err, (p, err)
    return err


def test_trident_job_root_is_read_at_every_level_and_trains(tmp_path):
    bags = _bags()
    cfg = write_trident_job(tmp_path / "job", bags)
    labels = _labels(tmp_path / "labels.csv")
    for where in (tmp_path / "job", cfg, cfg / "features_uni_v1"):
        ds = load_dataset(where, labels)
        assert ds.slide_ids == IDS and ds.in_dim == 8
        for i, sid in enumerate(IDS):
            assert np.array_equal(ds[i].features.numpy(), bags[sid][0])
            assert np.array_equal(ds[i].coords.numpy(), bags[sid][1].astype(np.float32))
    raw = read_bag_file(cfg / "features_uni_v1" / "slide_3.h5")
    assert raw.attrs["encoder"] == "uni_v1" and raw.attrs["patch_size_level0"] == 512
    run = tmp_path / "run"
    assert main(["train", "--features", str(tmp_path / "job"), "--labels", str(labels), "--out", str(run), "--folds", "2", *TRAIN]) == 0
    folds = _folds(run)
    assert sorted(s for f in folds for s in f["test"]) == sorted(IDS)  # every slide tested once
    for k, f in enumerate(folds):
        assert sorted(_predicted(run, k)) == sorted(f["test"])


def test_stamp_feats_files_train(tmp_path):
    bags = _bags(dim=6, seed=1)
    um = {sid: (f, c * 0.5) for sid, (f, c) in bags.items()}
    folder = write_stamp_features(tmp_path / "stamp_out", um)
    labels = _labels(tmp_path / "labels.csv")
    ds = load_dataset(folder, labels)
    for i, sid in enumerate(IDS):  # STAMP stores float16: the values read are the float16 ones, exactly
        assert np.array_equal(ds[i].features.numpy(), bags[sid][0].astype(np.float16).astype(np.float32))
    raw = read_bag_file(folder / "slide_0.h5")
    assert raw.attrs["unit"] == "um" and raw.attrs["extractor"] == "ctranspath"
    assert np.allclose(raw.coords, um["slide_0"][1])
    run = tmp_path / "run"
    assert main(["train", "--features", str(folder), "--labels", str(labels), "--out", str(run), "--folds", "2", *TRAIN]) == 0
    assert sorted(s for f in _folds(run) for s in f["test"]) == sorted(IDS)


SPLITS = [
    {"train": IDS[0:4], "val": IDS[4:6], "test": IDS[6:8]},
    {"train": IDS[4:8], "val": IDS[0:2], "test": IDS[2:4]},
    {"train": IDS[2:6], "val": [], "test": IDS[6:8] + IDS[0:2]},  # CLAM with val_frac 0: val carved from train
]


def _clam_features(root: Path, bags) -> Path:
    (root / "h5_files").mkdir(parents=True)
    for sid, (feats, coords) in bags.items():
        with h5py.File(root / "h5_files" / f"{sid}.h5", "w") as f:
            f["features"], f["coords"] = feats, coords
    return root


def test_clam_split_dir_defines_the_folds(tmp_path):
    feats = _clam_features(tmp_path / "clam_feats", _bags())
    labels = _labels(tmp_path / "labels.csv")
    split_dir = write_clam_splits(tmp_path / "splits" / "task_1_tumor_vs_normal_100", SPLITS, {sid: LABEL[i] for i, sid in enumerate(IDS)})
    run = tmp_path / "run"
    assert main(["train", "--features", str(feats), "--labels", str(labels), "--out", str(run), "--splits-dir", str(split_dir), *TRAIN]) == 0
    folds = _folds(run)
    assert len(folds) == 3
    for k, (got, want) in enumerate(zip(folds, SPLITS)):
        assert sorted(got["test"]) == sorted(want["test"]) == sorted(_predicted(run, k))
        if want["val"]:
            assert sorted(got["train"]) == sorted(want["train"]) and sorted(got["val"]) == sorted(want["val"])
        else:  # carved from the split file's train part
            assert sorted(got["train"] + got["val"]) == sorted(want["train"]) and got["val"]
    assert json.loads((run / "metrics.json").read_text())["split"] == "splits-dir"


def test_bad_layouts_stop_with_one_line(tmp_path, capsys):
    labels = _labels(tmp_path / "labels.csv")
    job = tmp_path / "job"
    write_trident_job(job, _bags(), encoder="uni_v1")
    write_trident_job(job, _bags(), encoder="conch_v15", patch=512)
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", "--features", str(job), "--labels", str(labels), "--out", str(out), *TRAIN],
                    str(job), "20x_256px_0px_overlap/features_uni_v1", "20x_512px_0px_overlap/features_conch_v15", "--features")
    feats = _clam_features(tmp_path / "feats", _bags())
    base = ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out), *TRAIN]
    label_of = {sid: LABEL[i] for i, sid in enumerate(IDS)}
    ghost = write_clam_splits(tmp_path / "ghost", [SPLITS[0], {**SPLITS[1], "test": ["slide_2", "slide_99"]}], label_of)
    _one_line_error(capsys, [*base, "--splits-dir", str(ghost)], str(ghost / "splits_1.csv"), "slide_99", "label CSV")
    leak = write_clam_splits(tmp_path / "leak", [{**SPLITS[0], "test": ["slide_6", "slide_0"]}], label_of)
    _one_line_error(capsys, [*base, "--splits-dir", str(leak)], str(leak / "splits_0.csv"), "slide_0", "train and in test")
    gap = write_clam_splits(tmp_path / "gap", SPLITS, label_of)
    (gap / "splits_1.csv").unlink()
    _one_line_error(capsys, [*base, "--splits-dir", str(gap)], str(gap / "splits_1.csv"), "missing")
    _one_line_error(capsys, [*base, "--splits-dir", str(tmp_path / "nowhere")], "nowhere", "--splits-dir")
    assert not out.exists()  # nothing written by any refused run


def test_patch_attributes_closed_form():
    # ours: a 40x slide (0.25 um/px) tiled at 20x, 256-px patches read as 512 px at level 0, step 384 (25% overlap)
    g = patch_attributes({"patch_level": 0, "step_level0": 384}, 512, 1.0, 256, slide_mag0=None, slide_mpp=0.25)
    assert g["patch_size_level0"] == 512 and g["level0_magnification"] == pytest.approx(40.0)
    assert g["target_magnification"] == pytest.approx(40.0 * 256 / 512) and g["patch_mpp"] == pytest.approx(0.25 * 512 / 256)
    assert g["overlap_px"] == round(256 * (512 - 384) / 512)
    # CLAM: 256 px read at level 1 (downsample 4) of a slide that records only its objective power
    g = patch_attributes({"patch_level": 1, "patch_size": 256}, 256, 4.0, 256, slide_mag0=40.0)
    assert g["patch_size_level0"] == 1024 and g["mpp"] == pytest.approx(10 / 40) and g["target_magnification"] == pytest.approx(10.0)
    # TRIDENT: overlap is in pixels; nothing known about the magnification
    g = patch_attributes({"patch_size": 224, "patch_size_level0": 448, "overlap": 32}, 448, 1.0, 224)
    assert g["overlap_px"] == 32 and g["mpp"] is None and g["target_magnification"] is None


def test_extract_trident_layout_round_trip(tmp_path, capsys):
    pytest.importorskip("openslide")
    from slide_factory import Blob, make_slide

    from mmil.wsi.slide import patch_geometry
    from mmil.wsi.tiling import coords_attributes, write_coords_h5

    sdir, ours = tmp_path / "slides", tmp_path / "ours"
    sdir.mkdir()
    ids = IDS
    coords = np.array([[64, 64], [128, 64], [64, 128], [320, 320], [384, 320], [320, 384]], dtype=np.int64)
    for i, sid in enumerate(ids):
        make_slide(sdir / f"{sid}.tif", [Blob(64, 64, 50, "normal"), Blob(192, 192, 50, "tumor" if i % 2 else "normal")],
                   size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4), seed=i)
    cfg_in = write_trident_job(tmp_path / "trident_in", {sid: (None, coords) for sid in ids}, mag=20, patch=64, mag0=20.0,
                               size0=(512, 512), with_features=False)
    write_coords_h5(ours / "slide_1.h5", coords, coords_attributes("slide_1", patch_geometry([1, 2, 4], 20.0, 20.0, 64), [(512, 512), (256, 256), (128, 128)], 0.5))
    common = ["--random-weights", "--input-size", "32", "--workers", "0", "--batch-size", "6", "--device", "cpu", "--threads", "1", "--no-progress"]
    job = tmp_path / "job"
    assert main(["extract", "--slides", str(sdir), "--coords", str(cfg_in), "--out", str(job), "--layout", "trident", "--pt", *common]) == 0
    cfg = job / "20x_64px_0px_overlap"
    enc = "features_resnet50-trunc"
    with h5py.File(cfg / "patches" / "slide_1_patches.h5", "r") as f:
        a = dict(f["coords"].attrs)
        assert np.array_equal(f["coords"][()], coords) and "patch_level" not in a
        assert (a["patch_size"], a["patch_size_level0"], a["target_magnification"], a["level0_width"], a["name"]) == (64, 64, 20.0, 512, "slide_1")
    with h5py.File(cfg / enc / "slide_1.h5", "r") as f:
        feats = f["features"][()]
        assert feats.shape == (6, 1024) and f["features"].attrs["encoder"] == "resnet50-trunc"
        assert f.attrs["mpp"] == pytest.approx(0.5) and f.attrs["patch_mpp"] == pytest.approx(0.5) and f.attrs["patch_size_level0"] == 64
        assert f.attrs["preset"] == "resnet50-trunc" and f.attrs["target_magnification"] == pytest.approx(20.0)
    pt = torch.load(cfg / "pt_files_resnet50-trunc" / "slide_1.pt", weights_only=True)
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and np.array_equal(pt.numpy(), feats)
    summary = json.loads((cfg / "pt_files_resnet50-trunc" / "attributes.json").read_text())["slides"]
    assert sorted(summary) == ids and summary["slide_1"]["n_patches"] == 6 and summary["slide_1"]["mpp"] == pytest.approx(0.5)
    # independent path: our own coordinate file for the same patches gives the same features
    single = tmp_path / "single"
    assert main(["extract", "--slides", str(sdir / "slide_1.tif"), "--coords", str(ours), "--out", str(single), *common]) == 0
    with h5py.File(single / "slide_1.h5", "r") as f:
        assert np.allclose(f["features"][()], feats, atol=1e-5)
    # --coords may name the job root when it holds one patch setting; with two, the choice is the user's
    again = ["extract", "--slides", str(sdir), "--coords", str(tmp_path / "trident_in"), "--out", str(job), "--layout", "trident", *common]
    assert main(again) == 0
    assert {r["status"] for r in csv.DictReader((job / "extract_summary.csv").open())} == {"exists"}
    write_trident_job(tmp_path / "trident_in", {"slide_0": (None, coords)}, mag=10, patch=64, mag0=20.0, size0=(512, 512), with_features=False)
    _one_line_error(capsys, again, "10x_64px_0px_overlap", "20x_64px_0px_overlap", "--coords")
    run = tmp_path / "run"
    labels = _labels(tmp_path / "labels.csv")
    assert main(["train", "--features", str(job), "--labels", str(labels), "--out", str(run), "--folds", "2", *TRAIN]) == 0
    assert sorted(s for f in _folds(run) for s in f["test"]) == sorted(ids)
