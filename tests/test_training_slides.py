"""Checkpoints record the slides they were fitted on; evaluate/predict/heatmap warn (or refuse) when asked to score them;
`mmil heatmap --from-cv` scores every slide with the fold that held it out; CSVs name classes; patient-level means."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mmil.checkpoint import SLIDES_NAME, read_seen_slides, save_checkpoint
from mmil.cli import main
from mmil.errors import MMILInputError
from mmil.evaluate import check_seen_slides, patient_predictions_csv, predictions_csv
from mmil.models import create_model
from mmil.wsi.heatmap_cv import assign_folds

TINY_MMIL = ["--model", "mmil", "--embed-dim", "16", "--heads", "2", "--head-dim", "8", "--num-subbags", "3"]
NAMES = {"0": "normal", "1": "tumor"}


def _tiny_checkpoint(path, slides=None, extra=None):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=4, n_classes=2)
    return save_checkpoint(path, model, "abmil", dict(model.init_kwargs), extra or {"class_names": ["normal", "tumor"]}, slides=slides)


# ----------------------------------------------------------------------------- records and checks, by construction
def test_checkpoint_records_its_slides_and_drops_a_stale_record(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "c", slides={"train": ["s1", "s2"], "val": ["s3"]})
    assert read_seen_slides(ckpt) == {"train": ["s1", "s2"], "val": ["s3"]}
    _tiny_checkpoint(tmp_path / "c")  # other weights saved over it, without a record
    assert not (ckpt / SLIDES_NAME).exists() and read_seen_slides(ckpt) is None
    # a fold checkpoint written before slides.json existed: the run's folds.json tells
    run = tmp_path / "run"
    (run).mkdir()
    (run / "folds.json").write_text(json.dumps([{"fold": 0, "train": ["a"], "val": ["b"], "test": ["c"]},
                                                {"fold": 1, "train": ["c"], "val": ["a"], "test": ["b"]}]))
    _tiny_checkpoint(run / "fold_1" / "checkpoint", extra={"fold": 1})
    assert read_seen_slides(run / "fold_1" / "checkpoint") == {"train": ["c"], "val": ["a"]}


def test_seen_slides_warning_counts_and_refusal(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "c", slides={"train": [f"t{i}" for i in range(6)], "val": ["v0", "v1"]})
    asked = ["x0", "t5", "v1", "t0", "x1", "t2", "t3"]
    line = check_seen_slides(ckpt, asked)
    assert line.startswith(f"5 of 7 slides were seen in training by {ckpt}: 4 training (t5, t0, t2, ...); 1 validation (v1)")
    assert "\n" not in line and "--refuse-training-slides" in line
    assert check_seen_slides(ckpt, ["x0", "x1"]) is None and check_seen_slides(_tiny_checkpoint(tmp_path / "n"), asked) is None
    with pytest.raises(MMILInputError, match="5 of 7 slides.*--refuse-training-slides"):
        check_seen_slides(ckpt, asked, refuse=True)


def test_assign_folds_uses_the_fold_that_held_each_slide_out():
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(15)]
    perm = rng.permutation(15)
    folds = []
    for k in range(3):
        test = [ids[i] for i in perm[k * 5:(k + 1) * 5]]
        rest = [s for s in ids if s not in test]
        folds.append({"fold": k, "test": test, "val": rest[:2], "train": rest[2:]})
    got = assign_folds(folds, ids + ["new"])
    for sid in ids:  # naive: scan the folds for the one whose test set holds the slide
        assert got[sid] == [f["fold"] for f in folds if sid in f["test"]][0]
        assert sid not in folds[got[sid]]["train"] + folds[got[sid]]["val"]
    assert got["new"] == 0  # not in the run: the first fold (none of them saw it)
    assert assign_folds([{"fold": 0, "train": ["a"], "val": [], "test": []}], ["a"]) == {"a": None}


def test_csvs_name_classes_and_patients_are_slide_means():
    rng = np.random.default_rng(1)
    p1 = rng.random(9)
    probs = np.stack([1 - p1, p1], 1)
    cases = ["p1", "p2", "p1", "p3", "p2", "p1", "p4", "p3", "p2"]
    labels = [1, 0, 1, 1, 0, 1, 0, 1, 0]
    rows = list(csv.DictReader(predictions_csv([f"s{i}" for i in range(9)], probs, labels, class_names=["benign", "tumor"], case_ids=cases).splitlines()))
    assert list(rows[0]) == ["slide_id", "case_id", "label", "prob_benign", "prob_tumor", "pred_label"]
    assert [r["pred_label"] for r in rows] == [["benign", "tumor"][int(p > 0.5)] for p in p1]
    assert [r["label"] for r in rows] == [["benign", "tumor"][y] for y in labels]
    patients = list(csv.DictReader(patient_predictions_csv(cases, probs, labels, class_names=["benign", "tumor"]).splitlines()))
    assert list(patients[0]) == ["case_id", "n_slides", "label", "prob_benign", "prob_tumor", "pred_label"]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cases):  # naive group-by
        groups.setdefault(c, []).append(i)
    assert [r["case_id"] for r in patients] == list(groups)
    for r in patients:
        members = groups[r["case_id"]]
        assert int(r["n_slides"]) == len(members)
        mean = probs[members].mean(0)
        assert [float(r["prob_benign"]), float(r["prob_tumor"])] == pytest.approx(mean.tolist(), abs=1e-6)
        assert r["pred_label"] == ["benign", "tumor"][int(mean.argmax())]


# ----------------------------------------------------------------------------- the commands, on a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tmp_path_factory.mktemp("seen")
    assert main(["synth", "--out", str(data), "--n-slides", "12", "--seed", "2", "--in-dim", "8", "--min-instances", "20",
                 "--max-instances", "40", "--signal", "6", "--slides-per-case", "2"]) == 0
    rows = list(csv.DictReader(open(data / "labels.csv")))
    named = data / "named.csv"
    named.write_text("slide_id,label,case_id\n" + "".join(f"{r['slide_id']},{NAMES[r['label']]},{r['case_id']}\n" for r in rows))
    out = data / "run"
    assert main(["train", "--features", str(data / "features"), "--labels", str(named), "--out", str(out), "--folds", "2", "--epochs", "1",
                 "--min-epochs", "1", "--repeats", "1", "--val-fraction", "0.3", "--no-progress", "--threads", "1", *TINY_MMIL]) == 0
    return data, named, out, json.loads((out / "folds.json").read_text())


def test_fold_checkpoints_record_their_slides_and_csvs_use_class_names(run):
    data, named, out, folds = run
    cases = {r["slide_id"]: r["case_id"] for r in csv.DictReader(open(named))}
    for f in folds:
        fold_dir = out / f"fold_{f['fold']}"
        assert json.loads((fold_dir / "checkpoint" / SLIDES_NAME).read_text()) == {"train": f["train"], "val": f["val"]}
        rows = list(csv.DictReader(open(fold_dir / "predictions.csv")))
        assert list(rows[0]) == ["slide_id", "case_id", "label", "prob_normal", "prob_tumor", "pred_label"]
        assert [r["slide_id"] for r in rows] == f["test"]
        for r in rows:
            assert r["pred_label"] == ("tumor" if float(r["prob_tumor"]) > float(r["prob_normal"]) else "normal")
        patients = {r["case_id"]: r for r in csv.DictReader(open(fold_dir / "patient_predictions.csv"))}
        assert set(patients) == {cases[s] for s in f["test"]}
        for case, r in patients.items():
            mine = [float(x["prob_tumor"]) for x in rows if cases[x["slide_id"]] == case]
            assert float(r["prob_tumor"]) == pytest.approx(np.mean(mine), abs=2e-6) and int(r["n_slides"]) == len(mine)


def _stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_evaluate_and_predict_warn_or_refuse_on_training_slides(run, tmp_path, capsys):
    data, named, out, folds = run
    ckpt = out / "fold_0" / "checkpoint"
    n_seen = len(folds[0]["train"]) + len(folds[0]["val"])
    base = ["--checkpoint", str(ckpt), "--features", str(data / "features"), "--repeats", "1", "--threads", "1"]
    assert main(["evaluate", *base, "--labels", str(named)]) == 0
    (line,) = [x for x in _stderr_lines(capsys) if "warning" in x]
    assert line.startswith(f"mmil evaluate: warning: {n_seen} of 12 slides were seen in training")
    assert main(["evaluate", *base, "--labels", str(named), "--out", str(tmp_path / "e.json"), "--refuse-training-slides"]) == 2
    assert not (tmp_path / "e.json").exists() and "--refuse-training-slides" in capsys.readouterr().err
    held_out = tmp_path / "held_out.csv"  # the fold's own test slides: no warning
    held_out.write_text("".join(line for line in open(named) if line.split(",")[0] in folds[0]["test"] + ["slide_id"]))
    assert main(["evaluate", *base, "--labels", str(held_out), "--refuse-training-slides"]) == 0
    assert not [x for x in _stderr_lines(capsys) if "warning" in x]
    assert main(["predict", *base, "--out", str(tmp_path / "p.csv")]) == 0
    assert [x for x in _stderr_lines(capsys) if "warning" in x][0].startswith(f"mmil predict: warning: {n_seen} of 12 slides")
    assert next(csv.reader(open(tmp_path / "p.csv"))) == ["slide_id", "prob_normal", "prob_tumor", "pred_label", "repeat_std"]
    assert main(["predict", *base, "--out", str(tmp_path / "q.csv"), "--refuse-training-slides"]) == 2
    assert not (tmp_path / "q.csv").exists()


def test_heatmap_from_cv_scores_each_slide_with_its_held_out_fold(tmp_path, capsys):
    pytest.importorskip("openslide")
    pytest.importorskip("tifffile")
    from slide_factory import Blob, make_slide

    from mmil.data import load_dataset
    from mmil.wsi.features import write_features_h5
    from mmil.wsi.heatmap import bag_scores

    slides, feats, run = tmp_path / "slides", tmp_path / "features", tmp_path / "run"
    slides.mkdir()
    ids = ["a", "b", "c"]
    coords = np.array([[x, y] for y in range(0, 256, 64) for x in range(0, 256, 64)], dtype=np.int64)
    rng = np.random.default_rng(0)
    for sid in ids:
        make_slide(slides / f"{sid}.tif", [Blob(64, 64, 50, "tumor")], size_um=(128, 128), mpp=0.5, downsamples=(1, 2))
        write_features_h5(feats / f"{sid}.h5", rng.normal(size=(len(coords), 4)).astype(np.float32), coords, {"patch_size_level0": 64}, {})
    plan = [{"fold": 0, "train": ["b"], "val": ["c"], "test": ["a"]}, {"fold": 1, "train": ["a", "c"], "val": [], "test": ["b"]},
            {"fold": 2, "train": ["a"], "val": ["b"], "test": ["c"]}]
    run.mkdir()
    (run / "folds.json").write_text(json.dumps(plan))
    models = {}
    for f in plan:
        torch.manual_seed(10 + f["fold"])  # a different model per fold
        models[f["fold"]] = create_model("abmil", in_dim=4, n_classes=2).eval()
        save_checkpoint(run / f"fold_{f['fold']}" / "checkpoint", models[f["fold"]], "abmil", dict(models[f["fold"]].init_kwargs),
                        {"class_names": ["normal", "tumor"], "fold": f["fold"]}, slides={"train": f["train"], "val": f["val"]})
    common = ["--features", str(feats), "--slides", str(slides), "--repeats", "1", "--thumbnail-size", "64", "--top-k", "2", "--no-progress"]
    assert main(["heatmap", "--from-cv", str(run), "--out", str(tmp_path / "h"), "--refuse-training-slides", *common]) == 0
    assert not [x for x in _stderr_lines(capsys) if "warning" in x]
    summary = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "h" / "summary.csv"))}
    ds = load_dataset(feats)
    for f in plan:
        sid = f["test"][0]
        assert summary[sid]["fold"] == str(f["fold"]) and summary[sid]["status"] == "ok"
        bag = ds[ds.slide_ids.index(sid)]
        _, probs = bag_scores(models[f["fold"]], bag.features, bag.coords, None, [0])  # independent: the held-out fold's model
        assert float(summary[sid]["prob_tumor"]) == pytest.approx(probs[1], abs=1e-5)
        assert (tmp_path / "h" / f"{sid}_top2.png").is_file()
    # one checkpoint on its own training slides: one warning line, or exit 2 and nothing written
    assert main(["heatmap", "--checkpoint", str(run / "fold_1" / "checkpoint"), "--out", str(tmp_path / "w"), *common]) == 0
    (line,) = [x for x in _stderr_lines(capsys) if "warning" in x]
    assert line.startswith("mmil heatmap: warning: 2 of 3 slides were seen in training") and "2 training (a, c)" in line
    assert main(["heatmap", "--checkpoint", str(run / "fold_1" / "checkpoint"), "--out", str(tmp_path / "r"), "--refuse-training-slides", *common]) == 2
    assert not (tmp_path / "r").exists()
    assert main(["heatmap", "--from-cv", str(tmp_path), "--out", str(tmp_path / "x"), *common]) == 2  # not a run folder


def test_predict_patient_means_from_the_label_csvs_case_ids(run, tmp_path, capsys):
    data, named, out, folds = run
    base = ["predict", "--checkpoint", str(out / "fold_1" / "checkpoint"), "--features", str(data / "features"), "--threads", "1"]
    held_out = tmp_path / "held_out.csv"  # fold 1's test slides, labels left empty: prediction needs none
    held_out.write_text("slide_id,label,case_id\n" + "".join(f"{line.split(',')[0]},,{line.split(',')[2]}" for line in open(named)
                                                              if line.split(",")[0] in folds[1]["test"]))
    assert main([*base, "--labels", str(held_out), "--out", str(tmp_path / "p.csv"), "--patient-out", str(tmp_path / "pp.csv"),
                 "--refuse-training-slides"]) == 0
    slides = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["slide_id"] for r in slides] == [line.split(",")[0] for line in held_out.read_text().splitlines()[1:]]
    case_of = {line.split(",")[0]: line.split(",")[2] for line in held_out.read_text().splitlines()[1:]}
    patients = list(csv.DictReader(open(tmp_path / "pp.csv")))
    assert list(patients[0]) == ["case_id", "n_slides", "prob_normal", "prob_tumor", "pred_label"]
    assert sorted(r["case_id"] for r in patients) == sorted(set(case_of.values()))
    for r in patients:  # naive group-by of the slide CSV (rounded to 6 decimals there)
        mine = [float(s["prob_tumor"]) for s in slides if case_of[s["slide_id"]] == r["case_id"]]
        assert float(r["prob_tumor"]) == pytest.approx(np.mean(mine), abs=2e-6) and int(r["n_slides"]) == len(mine)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "q.csv"), "--patient-out", str(tmp_path / "qq.csv")]) == 2  # no case ids known
    assert "--patient-out" in capsys.readouterr().err and not (tmp_path / "q.csv").exists() and not (tmp_path / "qq.csv").exists()
