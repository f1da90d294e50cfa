"""Bad input to ``mmil tile | extract | heatmap | bench``: one line naming the culprit, exit 2, nothing changed on disk.

Plus the positive side of the same rules: a resumed run removes the temporary files a killed
writer left, ``mmil bench --overwrite`` starts a directory afresh, a failed bench leaves
nothing that makes its retry be refused, and one slide file can be given as ``--slides``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from bad_input import assert_refused, run_cli  # noqa: E402
from slide_factory import Blob, make_slide  # noqa: E402

from mmil.checkpoint import save_checkpoint  # noqa: E402
from mmil.cli import main  # noqa: E402
from mmil.data.synth import write_synthetic_dataset  # noqa: E402
from mmil.models import create_model  # noqa: E402
from mmil.wsi.features import write_features_h5  # noqa: E402
from mmil.wsi.slide import patch_geometry  # noqa: E402
from mmil.wsi.tiling import coords_attributes, write_coords_h5  # noqa: E402

PATCH = 64
UNWRITABLE = "/proc/mmil_test/out"  # even root cannot create files in /proc
TILE_FLAGS = ["--patch-size", str(PATCH), "--min-tissue-area", "0.5", "--min-hole-area", "0.05", "--no-progress"]
EXTRACT_FLAGS = ["--random-weights", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny inputs for every command and one finished bench run (shared, read-only for the cases)."""
    root = tmp_path_factory.mktemp("bad_input_wsi")
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "a.tif", [Blob(128, 128, 100, "tumor")], size_um=(256, 256), mpp=0.5, downsamples=(1, 2, 4))
    geometry = patch_geometry([1, 2, 4], 20.0, 20.0, PATCH)
    attrs = coords_attributes("a", geometry, [(512, 512), (256, 256), (128, 128)], 0.5)
    coords = np.array([[x, y] for y in range(64, 448, 128) for x in range(64, 448, 128)], dtype=np.int64)
    write_coords_h5(root / "coords" / "a.h5", coords, attrs)
    write_features_h5(root / "features" / "a.h5", np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32), coords, attrs, {})
    torch.manual_seed(0)
    kwargs = {"in_dim": 8, "n_classes": 2, "embed_dim": 16, "num_subbags": 3, "heads": 2, "head_dim": 8}
    ckpt = save_checkpoint(root / "ckpt", create_model("mmil", **kwargs), "mmil", kwargs, {"class_names": ["normal", "tumor"]})
    (root / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    (root / "corrupt.bin").write_bytes(b"\xff\xfe\x00garbage" * 100)
    (root / "a_file").write_text("not a directory\n")
    bench_data = root / "bench_data"
    write_synthetic_dataset(bench_data, n_slides=8, seed=5, in_dim=4, min_instances=5, max_instances=10)
    config = {"model_kwargs": {"mean": {"embed_dim": 4}}, "train": {"min_epochs": 1, "patience": 1, "val_fraction": 0.3, "progress": False}, "cost_repeats": 1}
    (bench_data / "bench.yaml").write_text(yaml.safe_dump(config))
    e = SimpleNamespace(root=root, slides=slides, coords=root / "coords", features=root / "features", ckpt=Path(ckpt), bench_data=bench_data)
    e.bench_done = root / "bench_done"
    assert main(bench_argv(e, e.bench_done)) == 0
    return e


def bench_argv(e, out, *extra, labels=None, config=None):
    return ["bench", "--features", str(e.bench_data / "features"), "--labels", str(labels or e.bench_data / "labels.csv"), "--out", str(out),
            "--models", "mean", "--folds", "2", "--epochs", "1", "--cost-sizes", "10", "--config", str(config or e.bench_data / "bench.yaml"), "--quiet", *extra]


def tile_argv(e, out, *extra, slides=None):
    return ["tile", "--slides", str(slides or e.slides), "--out", str(out), *TILE_FLAGS, *extra]


def extract_argv(e, out, *extra, coords=None):
    return ["extract", "--slides", str(e.slides), "--coords", str(coords or e.coords), "--out", str(out), *EXTRACT_FLAGS, *extra]


def heatmap_argv(e, out, *extra, checkpoint=None, features=None):
    return ["heatmap", "--checkpoint", str(checkpoint or e.ckpt), "--features", str(features or e.features), "--slides", str(e.slides),
            "--out", str(out), "--repeats", "1", "--thumbnail-size", "64", "--no-progress", *extra]


def yaml_file(tmp, text):
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return path


def other_labels(e, tmp):
    """The same bags with one label flipped: other data for the bench."""
    lines = (e.bench_data / "labels.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = str(1 - int(fields[1]))
    lines[1] = ",".join(fields)
    path = tmp / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def bad_bags(e, tmp, kind):
    """A copy of the bench bags with slide_3 corrupt: not HDF5 at all, or one NaN feature (seen only when read)."""
    bags = tmp / "bags"
    shutil.copytree(e.bench_data / "features", bags)
    if kind == "garbage":
        (bags / "slide_3.h5").write_bytes(b"garbage")
    else:
        with h5py.File(bags / "slide_3.h5", "r+") as f:
            x = f["features"][()]
            x[0, 0] = np.nan
            f["features"][...] = x
    return ["bench", "--features", str(bags), "--labels", str(e.bench_data / "labels.csv"), "--out", str(tmp / "out"), "--models", "mean",
            "--folds", "2", "--epochs", "1", "--config", str(e.bench_data / "bench.yaml"), "--quiet"]


def started_only(e, tmp):
    """A copy of the finished bench reduced to a started cross-validation (as a killed first run leaves it)."""
    out = tmp / "bench_copy"
    shutil.copytree(e.bench_done, out)
    for name in ("results.csv", "bench_config.json", "runs/mean/bench.json", "runs/mean/cost.json", "runs/mean/metrics.json"):
        (out / name).unlink()
    shutil.rmtree(out / "runs" / "mean" / "fold_1")
    return out


def with_foreign_file(e, tmp):
    out = tmp / "bench_copy"
    shutil.copytree(e.bench_done, out)
    (out / "notes.txt").write_text("mine\n")
    return out


# Each case: (argv builder (env, tmp, out) -> argv, strings the one error line must contain).
# `out` is a fresh path under tmp unless the builder returns its own --out.
CASES = {
    # ---- tile: ranges at parse time, the same ranges in --config, the output folder, the slides
    "tile-overlap-1": (lambda e, t, o: tile_argv(e, o, "--overlap", "1.0"), ["--overlap", "1.0"]),
    "tile-patch-size-4": (lambda e, t, o: tile_argv(e, o, "--patch-size", "4"), ["--patch-size"]),
    "tile-min-tissue-fraction-1.5": (lambda e, t, o: tile_argv(e, o, "--min-tissue-fraction", "1.5"), ["--min-tissue-fraction"]),
    "tile-sthresh-300": (lambda e, t, o: tile_argv(e, o, "--sthresh", "300"), ["--sthresh"]),
    "tile-target-mag-0": (lambda e, t, o: tile_argv(e, o, "--target-mag", "0"), ["--target-mag"]),
    "tile-config-overlap": (lambda e, t, o: tile_argv(e, o, "--config", str(yaml_file(t, "overlap: 1.0\n"))), ["cfg.yaml", "overlap", "--overlap"]),
    "tile-config-tissue-sthresh": (lambda e, t, o: tile_argv(e, o, "--config", str(yaml_file(t, "tissue:\n  sthresh: 999\n"))), ["cfg.yaml", "tissue.sthresh", "--sthresh"]),
    "tile-config-magnification-text": (lambda e, t, o: tile_argv(e, o, "--config", str(yaml_file(t, "target_magnification: big\n"))), ["cfg.yaml", "target_magnification", "--target-mag"]),
    "tile-config-tissue-not-mapping": (lambda e, t, o: tile_argv(e, o, "--config", str(yaml_file(t, "tissue: 5\n"))), ["cfg.yaml", "tissue"]),
    "tile-config-bad-yaml": (lambda e, t, o: tile_argv(e, o, "--config", str(yaml_file(t, "patch_size: [64\n"))), ["cfg.yaml", "YAML"]),
    "tile-config-missing": (lambda e, t, o: tile_argv(e, o, "--config", str(t / "nowhere.yaml")), ["nowhere.yaml"]),
    "tile-out-is-a-file": (lambda e, t, o: tile_argv(e, e.root / "a_file"), ["--out", "a_file", "not a directory"]),
    "tile-out-under-a-file": (lambda e, t, o: tile_argv(e, e.root / "a_file" / "sub"), ["--out", "a_file"]),
    "tile-out-unwritable": (lambda e, t, o: tile_argv(e, UNWRITABLE), ["--out", UNWRITABLE, "not writable"]),
    "tile-slides-missing": (lambda e, t, o: tile_argv(e, o, slides=t / "no_slides"), ["no_slides"]),
    "tile-slides-not-a-csv": (lambda e, t, o: tile_argv(e, o, slides=e.root / "corrupt.bin"), ["corrupt.bin", "not a slide CSV"]),
    "tile-corrupt-slide": (lambda e, t, o: tile_argv(e, o, slides=e.root / "corrupt.svs"), ["corrupt.svs"]),
    # ---- extract
    "extract-batch-size-0": (lambda e, t, o: extract_argv(e, o, "--batch-size", "0"), ["--batch-size"]),
    "extract-workers-negative": (lambda e, t, o: extract_argv(e, o, "--workers", "-1"), ["--workers"]),
    "extract-shard-3-of-2": (lambda e, t, o: extract_argv(e, o, "--shard", "3/2"), ["--shard"]),
    "extract-config-batch-size": (lambda e, t, o: ["extract", "--slides", str(e.slides), "--coords", str(e.coords), "--out", str(o), "--random-weights",
                                                   "--config", str(yaml_file(t, "batch_size: 0\n"))], ["cfg.yaml", "batch_size", "--batch-size"]),
    "extract-config-shard": (lambda e, t, o: extract_argv(e, o, "--config", str(yaml_file(t, "shard: [2, 2]\n"))), ["cfg.yaml", "shard"]),
    "extract-device-cuda": (lambda e, t, o: extract_argv(e, o, "--device", "cuda"), ["--device", "cuda", "not available"]),
    "extract-device-cuda-3": (lambda e, t, o: extract_argv(e, o, "--device", "cuda:3"), ["--device", "cuda:3"]),
    "extract-device-unknown": (lambda e, t, o: extract_argv(e, o, "--device", "gpu"), ["--device", "gpu"]),
    "extract-coords-missing": (lambda e, t, o: extract_argv(e, o, coords=t / "no_coords"), ["no_coords"]),
    "extract-out-is-coords": (lambda e, t, o: extract_argv(e, e.coords), ["--out", "--coords"]),
    "extract-out-unwritable": (lambda e, t, o: extract_argv(e, UNWRITABLE), ["--out", UNWRITABLE]),
    # ---- heatmap
    "heatmap-alpha-1.5": (lambda e, t, o: heatmap_argv(e, o, "--alpha", "1.5"), ["--alpha"]),
    "heatmap-repeats-0": (lambda e, t, o: heatmap_argv(e, o, "--repeats", "0"), ["--repeats"]),
    "heatmap-num-subbags-0": (lambda e, t, o: heatmap_argv(e, o, "--num-subbags", "0"), ["--num-subbags"]),
    "heatmap-config-dpi": (lambda e, t, o: heatmap_argv(e, o, "--config", str(yaml_file(t, "dpi: 5\n"))), ["cfg.yaml", "dpi"]),
    "heatmap-config-alpha": (lambda e, t, o: ["heatmap", "--checkpoint", str(e.ckpt), "--features", str(e.features), "--slides", str(e.slides), "--out", str(o),
                                              "--config", str(yaml_file(t, "alpha: 2\n"))], ["cfg.yaml", "alpha", "--alpha"]),
    "heatmap-device-cuda": (lambda e, t, o: heatmap_argv(e, o, "--device", "cuda"), ["--device", "cuda"]),
    "heatmap-config-device-cuda": (lambda e, t, o: heatmap_argv(e, o, "--config", str(yaml_file(t, "device: cuda\n"))), ["cfg.yaml", "device", "cuda"]),
    "heatmap-checkpoint-missing": (lambda e, t, o: heatmap_argv(e, o, checkpoint=t / "no_ckpt"), ["no_ckpt"]),
    "heatmap-features-missing": (lambda e, t, o: heatmap_argv(e, o, features=t / "no_features"), ["no_features"]),
    "heatmap-out-is-a-file": (lambda e, t, o: heatmap_argv(e, e.root / "a_file"), ["--out", "a_file"]),
    # ---- bench
    "bench-folds-1": (lambda e, t, o: bench_argv(e, o, "--folds", "1"), ["--folds"]),
    "bench-epochs-0": (lambda e, t, o: bench_argv(e, o, "--epochs", "0"), ["--epochs"]),
    "bench-repeats-0": (lambda e, t, o: bench_argv(e, o, "--repeats", "0"), ["--repeats"]),
    "bench-seed-negative": (lambda e, t, o: bench_argv(e, o, "--seed", "-1"), ["--seed"]),
    "bench-cost-budget-0": (lambda e, t, o: bench_argv(e, o, "--cost-budget", "0"), ["--cost-budget"]),
    "bench-config-folds": (lambda e, t, o: ["bench", "--features", str(e.bench_data / "features"), "--labels", str(e.bench_data / "labels.csv"), "--out", str(o),
                                            "--models", "mean", "--config", str(yaml_file(t, "folds: 1\n")), "--quiet"], ["cfg.yaml", "folds", "--folds"]),
    "bench-config-train-patience": (lambda e, t, o: bench_argv(e, o, config=yaml_file(t, "train:\n  patience: 0\n")), ["cfg.yaml", "patience"]),
    "bench-config-cost-budget-text": (lambda e, t, o: bench_argv(e, o, config=yaml_file(t, "cost_budget_s: soon\n")), ["cfg.yaml", "cost_budget_s"]),
    "bench-device-cuda": (lambda e, t, o: bench_argv(e, o, "--device", "cuda:0"), ["--device", "cuda:0"]),
    "bench-config-device-cuda": (lambda e, t, o: bench_argv(e, o, config=yaml_file(t, "train:\n  device: cuda\n")), ["cfg.yaml", "train.device", "cuda"]),
    "bench-out-is-a-file": (lambda e, t, o: bench_argv(e, e.root / "a_file"), ["--out", "a_file"]),
    "bench-out-unwritable": (lambda e, t, o: bench_argv(e, UNWRITABLE), ["--out", UNWRITABLE]),
    "bench-features-missing": (lambda e, t, o: ["bench", "--features", str(t / "no_bags"), "--labels", str(e.bench_data / "labels.csv"), "--out", str(o), "--quiet"], ["no_bags"]),
    "bench-corrupt-bag": (lambda e, t, o: bad_bags(e, t, "garbage"), ["slide_3.h5", "HDF5"]),
    "bench-nan-bag": (lambda e, t, o: bad_bags(e, t, "nan"), ["slide_3.h5", "NaN"]),
    "bench-rerun-other-epochs": (lambda e, t, o: bench_argv(e, e.bench_done, "--epochs", "2"), ["other settings", "train.epochs: 1 -> 2", "--overwrite"]),
    "bench-rerun-other-data": (lambda e, t, o: bench_argv(e, e.bench_done, labels=other_labels(e, t)), ["other settings", "data.ids_sha256", "--overwrite"]),
    "bench-rerun-other-cost-sizes": (lambda e, t, o: bench_argv(e, e.bench_done, "--cost-sizes", "20"), ["cost.sizes: [10] -> [20]", "--overwrite"]),
    "bench-rerun-started-crossval": (lambda e, t, o: bench_argv(e, started_only(e, t), "--epochs", "2"), ["started cross-validation of mean", "train.epochs: 1 -> 2"]),
    "bench-overwrite-foreign-file": (lambda e, t, o: bench_argv(e, with_foreign_file(e, t), "--overwrite"), ["--overwrite", "notes.txt"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_line_and_nothing_written(case, env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on machines with a GPU
    build, names = CASES[case]
    out = tmp_path / "out"
    argv = build(env, tmp_path, out)
    out_arg = Path(argv[argv.index("--out") + 1])
    watch = [tmp_path, env.root, out_arg] if not str(out_arg).startswith("/proc") else [tmp_path, env.root]
    assert_refused(main, argv, capsys, names=names, watch=watch)
    assert not out.exists()


# ----------------------------------------------------------------------------- the positive side
def _stale(path: Path) -> Path:
    """A hidden temporary file as a killed atomic writer leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    return path


def test_tile_and_extract_resume_remove_stale_temp_files(env, tmp_path):
    tiles, feats = tmp_path / "tiles", tmp_path / "feats"
    assert main(tile_argv(env, tiles)) == 0
    assert main(extract_argv(env, feats, coords=tiles)) == 0
    stale = [_stale(tiles / "patches" / ".a.h5.x1y2z3.tmp"), _stale(tiles / ".summary.csv.abc.tmp"), _stale(feats / ".a.h5.q9w8e7.tmp")]
    not_ours = _stale(tiles / "notes" / ".draft.txt.k1.tmp")  # a folder tile does not write: left alone
    assert main(tile_argv(env, tiles)) == 0
    assert main(extract_argv(env, feats, coords=tiles)) == 0
    assert not any(p.exists() for p in stale)
    assert list(tmp_path.rglob("*.tmp")) == [not_ours]


def test_extract_under_sharding_removes_only_its_own_temp_files(env, tmp_path):
    feats = tmp_path / "feats"
    mine, other = _stale(feats / ".a.h5.abc.tmp"), _stale(feats / ".b.h5.abc.tmp")  # slide b belongs to no shard of ours
    assert main(extract_argv(env, feats, "--shard", "0/2")) == 0
    assert not mine.exists() and other.exists()


def test_one_slide_file_as_slides(env, tmp_path):
    assert main(tile_argv(env, tmp_path / "t", slides=env.slides / "a.tif")) == 0
    assert (tmp_path / "t" / "patches" / "a.h5").is_file()


def test_bench_resume_removes_stale_temp_files_and_changes_no_result(env, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(env.bench_done, out)
    before = (out / "results.csv").read_text()
    stale = [_stale(out / ".results.csv.k3j2.tmp"), _stale(out / "runs" / "mean" / ".bench.json.a1.tmp")]
    assert main(bench_argv(env, out)) == 0
    assert not any(p.exists() for p in stale) and not list(out.rglob("*.tmp"))
    assert (out / "results.csv").read_text() == before


def test_bench_overwrite_starts_afresh_with_the_new_settings(env, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(env.bench_done, out)
    _stale(out / ".summary.md.zz.tmp")
    assert main(bench_argv(env, out, "--epochs", "2", "--overwrite")) == 0
    stored = json.loads((out / "bench_config.json").read_text())
    assert stored["config"]["train"]["epochs"] == 2
    bench_state = json.loads((out / "runs" / "mean" / "bench.json").read_text())
    assert bench_state["fingerprint"]["train"]["epochs"] == 2
    assert not list(out.rglob("*.tmp"))
    assert main(bench_argv(env, out, "--epochs", "2")) == 0  # and the new directory resumes


def test_refused_bench_rerun_leaves_the_settings_file_alone(env, tmp_path, capsys):
    out = tmp_path / "bench"
    shutil.copytree(env.bench_done, out)
    before = (out / "bench_config.json").read_bytes()
    code, err = run_cli(main, bench_argv(env, out, "--seed", "4"), capsys)
    assert code == 2 and "seed: 0 -> 4" in err
    assert (out / "bench_config.json").read_bytes() == before


def test_failed_bench_leaves_nothing_that_refuses_the_retry(env, tmp_path, monkeypatch):
    out = tmp_path / "bench"

    def crash(*args, **kwargs):
        raise RuntimeError("training crashed")

    with monkeypatch.context() as m:
        m.setattr("mmil.crossval.cross_validate", crash)
        with pytest.raises(RuntimeError, match="training crashed"):
            main(bench_argv(env, out, "--epochs", "3"))
    assert not out.exists()  # nothing worth keeping: the directory it made is gone
    assert main(bench_argv(env, out)) == 0  # a retry with other settings runs


def test_bench_resumes_a_started_cross_validation_with_the_same_settings(env, tmp_path):
    out = started_only(env, tmp_path)
    fold0 = (out / "runs" / "mean" / "fold_0" / "result.json").read_bytes()
    assert main(bench_argv(env, out)) == 0
    assert (out / "runs" / "mean" / "fold_0" / "result.json").read_bytes() == fold0  # the finished fold is reused
    assert (out / "bench_config.json").is_file() and (out / "runs" / "mean" / "bench.json").is_file()
