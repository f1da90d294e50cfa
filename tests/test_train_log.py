"""Training logs off a terminal (mmil.train_log): one line per epoch, history.csv every epoch, curves, TensorBoard."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from mmil import train_log
from mmil.cli import main
from mmil.config import TrainConfig
from mmil.data import BagDataset
from mmil.data.synth import synthetic_bags
from mmil.errors import MMILInputError
from mmil.train import train_fold
from mmil_toys import register_toys

TOY = register_toys()
LINE = re.compile(r"^(\S+) (fold_\d+) epoch (\d+)/(\d+)  train_loss (\S+)  val_loss (\S+)  val_auc (\S+)  lr (\S+)  \S+s(  best so far)?$")


def _bags(n=16, seed=0):
    return BagDataset.from_bags(synthetic_bags(n, seed=seed, in_dim=8, min_instances=10, max_instances=20, signal=8.0, positive_fraction=(0.1, 0.2)))


def _cfg(**kw):
    base = dict(epochs=4, min_epochs=100, patience=50, lr=1e-2, selection="loss", select_min_epoch=1, progress=True)
    return TrainConfig(**(base | kw))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    """16 synthetic slides with a fixed train/val/test split (one fold), both classes in val and test."""
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--n-slides", "16", "--seed", "3", "--in-dim", "8", "--min-instances", "10",
                 "--max-instances", "20", "--signal", "8"]) == 0
    rows = _rows(out / "labels.csv")
    seen: dict[str, int] = {}
    lines = ["slide_id,label,split"]
    for r in rows:
        k = seen[r["label"]] = seen.get(r["label"], -1) + 1
        lines.append(f"{r['slide_id']},{r['label']},{('val', 'test')[k] if k < 2 else 'train'}")
    (out / "split.csv").write_text("\n".join(lines) + "\n")
    return out


def test_train_off_a_terminal_prints_one_line_per_epoch(split_data, tmp_path):
    """`mmil train` with stdout and stderr in a file: exactly one line per epoch, matching history.csv."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    argv = [sys.executable, "-m", "mmil", "train", "--features", str(split_data / "features"), "--labels", str(split_data / "split.csv"),
            "--out", str(run), "--epochs", "3", "--min-epochs", "1", "--repeats", "1", "--model", "mean", "--embed-dim", "4", "--threads", "1"]
    with open(log, "w") as f:
        assert subprocess.run(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL, timeout=300).returncode == 0
    text = log.read_text()
    assert "\r" not in text  # no progress bar in a file
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    assert len([t for t in text.splitlines() if " epoch " in t]) == len(lines) == 3
    assert [(m[1], m[2], int(m[3]), int(m[4])) for m in lines] == [("mean", "fold_0", e, 3) for e in (1, 2, 3)]
    history = _rows(run / "fold_0" / train_log.HISTORY_NAME)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    for m, r in zip(lines, history):
        assert float(m[5]) == pytest.approx(float(r["train_loss"]), abs=6e-5)
        assert float(m[6]) == pytest.approx(float(r["val_loss"]), abs=6e-5)
        assert float(m[8]) == pytest.approx(float(r["lr"]), rel=1e-2)
    best = json.loads((run / "fold_0" / "result.json").read_text())["best_epoch"]
    assert lines[best - 1][9] is not None  # the kept epoch was marked when it was kept
    assert [int(r["kept"]) for r in history] == [int(e == best) for e in (1, 2, 3)]
    assert (run / "fold_0" / train_log.CURVES_NAME).stat().st_size > 0


def test_history_csv_grows_every_epoch(tmp_path, capsys):
    """After each epoch (the callback) history.csv holds exactly the epochs so far, equal to the records."""
    seen, fold = [], tmp_path / "fold_0"

    def check(record):
        rows = _rows(fold / train_log.HISTORY_NAME)
        seen.append(len(rows))
        assert int(rows[-1]["epoch"]) == record["epoch"]
        assert float(rows[-1]["train_loss"]) == record["train_loss"] and float(rows[-1]["val_loss"]) == record["val_loss"]

    res = train_fold(_bags(), _bags(8, seed=1), TOY, {}, _cfg(log_every=2, epochs=5), fold, callback=check)
    assert seen == [1, 2, 3, 4, 5]
    rows = _rows(fold / train_log.HISTORY_NAME)
    assert [int(r["kept"]) for r in rows] == [int(e == res.best_epoch) for e in range(1, 6)]
    assert res.best_epoch == 1 + int(np.argmin([float(r["val_loss"]) for r in rows]))  # selection="loss"
    epochs = [int(m[3]) for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert epochs == [2, 4, 5]  # every 2nd epoch and the last


def test_curves_mark_the_kept_epoch(tmp_path):
    res = train_fold(_bags(), _bags(8, seed=1), TOY, {}, _cfg(progress=False), tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    fig = train_log.curves_figure(history, res.best_epoch)
    kept = [line for ax in fig.get_axes() for line in ax.get_lines() if str(line.get_label()).startswith("kept epoch")]
    assert len(kept) == 2 and all(list(line.get_xdata()) == [res.best_epoch] for line in kept)
    left = fig.get_axes()[0]
    assert list(kept[0].get_ydata()) == pytest.approx([history[res.best_epoch - 1]["val_loss"]])
    val = [line for line in left.get_lines() if line.get_label() == "validation loss"][0]
    assert list(val.get_ydata()) == pytest.approx([h["val_loss"] for h in history])
    d = train_log.curve_data(history, 99)
    assert d["kept_epoch"] is None and list(d["epoch"]) == list(range(1, len(history) + 1))


def test_line_schedule_and_format():
    assert [e for e in range(1, 8) if train_log.logs_epoch(e, 3, last=e == 7)] == [3, 6, 7]
    assert not any(train_log.logs_epoch(e, 0, last=True) for e in range(1, 4))
    assert train_log.line_interval(5, progress=True, terminal=False) == 5
    assert train_log.line_interval(5, progress=True, terminal=True) == 0  # the bar shows instead
    assert train_log.line_interval(5, progress=False, terminal=False) == 0
    rec = {"epoch": 2, "train_loss": 0.5, "val_loss": float("nan"), "val_auc": 0.75, "lr": 1e-3, "seconds": 1.25}
    m = LINE.match(train_log.format_epoch_line("mmil fold_1", rec, 9, kept=True))
    assert m and (m[3], m[4], m[5], m[6], m[7], m[8], m[9]) == ("2", "9", "0.5000", "nan", "0.750", "1.00e-03", "  best so far")


def test_tensorboard_refused_without_the_package(monkeypatch, split_data, tmp_path, capsys):
    monkeypatch.setattr(train_log, "tensorboard_available", lambda: False)
    with pytest.raises(MMILInputError, match="tensorboard"):
        TrainConfig(tensorboard=True)
    run = tmp_path / "run"
    code = main(["train", "--features", str(split_data / "features"), "--labels", str(split_data / "split.csv"), "--out", str(run),
                 "--epochs", "1", "--model", "mean", "--tensorboard"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install tensorboard" in err
    assert not run.exists()


def test_tensorboard_scalars_every_epoch(monkeypatch, tmp_path):
    """With a stand-in SummaryWriter: one scalar per metric and epoch, the values of the records."""
    written: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    res = train_fold(_bags(), _bags(8, seed=1), TOY, {}, _cfg(epochs=3, tensorboard=True, progress=False), tmp_path)
    for h in res.history:
        got = {tag: v for tag, v, step in written if step == h["epoch"]}
        assert got["loss/train"] == h["train_loss"] and got["loss/val"] == h["val_loss"] and got["lr"] == h["lr"]
    assert sorted({s for _, _, s in written}) == [1, 2, 3]
