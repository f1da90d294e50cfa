"""Runs stored before a training option existed resume under the values they ran with (``LEGACY_TRAIN_VALUES``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from mmil.bench_dir import state_differences
from mmil.cli import main
from mmil.config import LEGACY_TRAIN_VALUES, ExperimentConfig, TrainConfig, with_legacy_train_values
from mmil.crossval import config_differences
from mmil.errors import MMILInputError
from mmil.train_state import check_fingerprint, fingerprint

ROOT = Path(__file__).resolve().parents[1]
NEWEST = ("calib_fraction", "temperature_prior")  # the options of issue 15, the last ones added


def _legacy_train() -> TrainConfig:
    return TrainConfig(**LEGACY_TRAIN_VALUES)


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_legacy_values_are_train_options_and_the_recipe_before_issue_10():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(LEGACY_TRAIN_VALUES) <= fields
    v1 = TrainConfig(**yaml.safe_load((ROOT / "configs" / "mmil_recipe_v1.yaml").read_text())["train"])
    assert {k: getattr(v1, k) for k in LEGACY_TRAIN_VALUES} == LEGACY_TRAIN_VALUES
    # a value a stored run has is never replaced
    assert with_legacy_train_values({"center_slides": "median"})["center_slides"] == "median"


def test_run_config_without_new_options_compares_at_their_old_values():
    given = ExperimentConfig(train=_legacy_train()).to_dict()
    stored = {**given, "train": _without(given["train"], NEWEST)}
    assert config_differences(stored, given) == []
    now = ExperimentConfig().to_dict()  # today's defaults: a MAP temperature, and the issue-10 recipe
    diffs = config_differences({**now, "train": _without(now["train"], NEWEST)}, now)
    assert diffs == ["train.temperature_prior: null -> 1.0"]


def test_resume_state_without_new_options_is_accepted_only_at_their_old_values(tmp_path):
    legacy = fingerprint("abmil", {}, _legacy_train(), ["a", "b"], ["c"])
    stored = {**legacy, "train": _without(legacy["train"], NEWEST)}
    check_fingerprint(tmp_path / "last_state.safetensors", {"fingerprint": stored}, legacy)  # no error
    current = fingerprint("abmil", {}, TrainConfig(), ["a", "b"], ["c"])
    with pytest.raises(MMILInputError, match=r"differs in: train\)"):
        check_fingerprint(tmp_path / "last_state.safetensors", {"fingerprint": {**current, "train": _without(current["train"], NEWEST)}}, current)


def test_bench_state_without_new_options_compares_at_their_old_values(tmp_path):
    train = dataclasses.asdict(_legacy_train())
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"fingerprint": {"model": "abmil", "train": _without(train, NEWEST)}}))
    assert state_differences(path, {"model": "abmil", "train": train}) == []
    assert state_differences(path, {"model": "abmil", "train": {**train, "calib_fraction": 0.2}}) == ["train.calib_fraction: 0.0 -> 0.2"]


def test_cli_resumes_a_finished_run_written_before_the_newest_options(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "synth"), "--n-slides", "8", "--seed", "1", "--in-dim", "8",
                 "--min-instances", "20", "--max-instances", "40", "--signal", "8"]) == 0
    (tmp_path / "mle.yaml").write_text("train: {temperature_prior: null}\n")
    run = tmp_path / "run"
    argv = ["train", "--features", str(tmp_path / "synth" / "features"), "--labels", str(tmp_path / "synth" / "labels.csv"),
            "--out", str(run), "--folds", "2", "--epochs", "1", "--min-epochs", "1", "--repeats", "1", "--no-progress",
            "--model", "abmil", "--embed-dim", "8"]
    assert main([*argv, "--config", str(tmp_path / "mle.yaml")]) == 0
    stored = json.loads((run / "config.json").read_text())  # as the version before issue 15 wrote it
    (run / "config.json").write_text(json.dumps({**stored, "train": _without(stored["train"], NEWEST)}))
    weights = {p: p.read_bytes() for p in run.glob("fold_*/checkpoint/model.safetensors")}
    assert len(weights) == 2
    assert main([*argv, "--config", str(tmp_path / "mle.yaml")]) == 0  # resumed: every fold is finished
    assert {p: p.read_bytes() for p in run.glob("fold_*/checkpoint/model.safetensors")} == weights
    capsys.readouterr()
    assert main(argv) == 2  # today's default temperature prior is another calibration: refused, naming the old value
    err = capsys.readouterr().err
    assert "train.temperature_prior: null -> 1.0" in err and "--overwrite" in err
