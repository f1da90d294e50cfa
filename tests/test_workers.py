"""``--workers K``: folds in worker processes give the sequential run's results, and resume per fold (issue 12)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from mmil.config import TrainConfig
from mmil.crossval import cross_validate
from mmil.data import BagDataset
from mmil.data.synth import synthetic_bags
from mmil.parallel import run_folds, split_threads

MODEL, KWARGS = "abmil", {"embed_dim": 16, "attn_dim": 8, "dropout": 0.25}


@pytest.mark.parametrize("threads, workers, expected", [(2, 2, 1), (1, 2, 1), (16, 3, 5), (8, 1, 8), (3, 4, 1)])
def test_threads_are_split_between_workers(threads, workers, expected):
    assert split_threads(threads, workers) == expected


def test_without_workers_tasks_run_in_order_in_this_process():
    assert run_folds(divmod, [(7, 2), (9, 4), (1, 5)], 1) == [(3, 1), (2, 1), (0, 1)]


def _comparable(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    for fold in metrics["folds"]:
        fold.pop("train_seconds")
    return metrics


def test_two_workers_give_the_sequential_metrics_and_resume_per_fold(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same (single-threaded) summation order in this process and in the workers
    try:
        ds = BagDataset.from_bags(synthetic_bags(24, seed=3, in_dim=8, min_instances=8, max_instances=16, signal=6.0))
        cfg = TrainConfig(epochs=3, min_epochs=100, patience=50, lr=1e-2, progress=False)
        seq = cross_validate(ds, MODEL, KWARGS, cfg, tmp_path / "seq", folds=3, repeats=2)
        # an interrupted parallel run: fold 0 finished before the stop ...
        cross_validate(ds, MODEL, KWARGS, cfg, tmp_path / "par", folds=3, repeats=2, only_folds=[0])
        done = (tmp_path / "par" / "fold_0" / "result.json").stat().st_mtime_ns
        assert not (tmp_path / "par" / "fold_1").exists() and not (tmp_path / "par" / "metrics.json").exists()
        # ... then resumed with two workers: fold 0 is read back, folds 1 and 2 train in two processes
        par = cross_validate(ds, MODEL, KWARGS, dataclasses.replace(cfg, workers=2), tmp_path / "par", folds=3, repeats=2)
    finally:
        torch.set_num_threads(previous)
    assert (tmp_path / "par" / "fold_0" / "result.json").stat().st_mtime_ns == done
    assert _comparable(tmp_path / "par") == _comparable(tmp_path / "seq")
    assert [o.fold for o in par.folds] == [o.fold for o in seq.folds] == [0, 1, 2]
    for k in range(3):
        assert (tmp_path / "par" / f"fold_{k}" / "predictions.csv").read_text() == (tmp_path / "seq" / f"fold_{k}" / "predictions.csv").read_text()
        a = load_file(tmp_path / "par" / f"fold_{k}" / "checkpoint" / "model.safetensors")
        b = load_file(tmp_path / "seq" / f"fold_{k}" / "checkpoint" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
