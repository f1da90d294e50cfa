"""Bad input to `mmil train | evaluate | predict | prune-limit | import-checkpoint | synth`.

Every case: exit status 2, one error line naming the option or file, no traceback, and the
output location exactly as it was. Plus the good paths the rules promise: writes go through
symlinks and into FIFOs without replacing them, a failed run leaves nothing, `--overwrite`
starts afresh, and a resumed run removes the temporary files a killed writer left.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from bad_input import assert_refused, run_cli
from mmil.cli import main

TINY = ["--model", "mmil", "--embed-dim", "8", "--heads", "2", "--head-dim", "4", "--num-subbags", "2"]
FAST = ["--folds", "2", "--epochs", "1", "--min-epochs", "0", "--repeats", "1", "--lr", "1e-3", "--no-progress", "--threads", "1"]
UNWRITABLE = "/proc/mmil_bad_input_test"  # even root cannot create files in /proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_data")
    assert main(["synth", "--out", str(root), "--n-slides", "10", "--seed", "1", "--in-dim", "6",
                 "--min-instances", "8", "--max-instances", "16", "--signal", "8"]) == 0
    run = root / "run"
    assert main(["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"), "--out", str(run), *FAST, *TINY]) == 0
    return root


def _train(data: Path, out, *extra: str) -> list[str]:
    return ["train", "--features", str(data / "features"), "--labels", str(data / "labels.csv"), "--out", str(out), *FAST, *TINY, *extra]


def _ckpt(data: Path) -> str:
    return str(data / "run" / "fold_0" / "checkpoint")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _labels_with(data: Path, tmp: Path, transform) -> Path:
    lines = (data / "labels.csv").read_text().splitlines()
    return _write(tmp / "labels.csv", "\n".join(transform(lines)) + "\n")


def _blank_case(lines):
    head, first, *rest = lines
    sid, label, _case = first.split(",")
    return [head, f"{sid},{label},", *rest]


def _one_class(lines):
    return [lines[0]] + [",".join([r.split(",")[0], "1", r.split(",")[2]]) for r in lines[1:]]


def _missing_slide(lines):
    return lines + ["slide_that_is_not_there,1,case_x"]


def _duplicate_bag(data: Path, tmp: Path) -> Path:
    feats = tmp / "features"
    shutil.copytree(data / "features", feats)
    torch.save({"features": torch.zeros(4, 6)}, feats / "slide_0.pt")  # beside slide_0.h5
    return feats


def _cases():
    """(id, argv builder(data, tmp) -> argv, names builder(tmp) -> list of names that the message must contain)."""
    out = lambda t: t / "out"  # noqa: E731
    cases = [
        # numeric ranges, checked once at parse time
        ("train-epochs-0", lambda d, t: _train(d, out(t), "--epochs", "0"), ["--epochs"]),
        ("train-lr-negative", lambda d, t: _train(d, out(t), "--lr", "-1"), ["--lr"]),
        ("train-lr-nan", lambda d, t: _train(d, out(t), "--lr", "nan"), ["--lr"]),
        ("train-folds-1", lambda d, t: _train(d, out(t), "--folds", "1"), ["--folds"]),
        ("train-mask-ratio-1.5", lambda d, t: _train(d, out(t), "--mask-ratio", "1.5"), ["--mask-ratio"]),
        ("train-val-fraction-1", lambda d, t: _train(d, out(t), "--val-fraction", "1"), ["--val-fraction"]),
        ("train-threads-0", lambda d, t: _train(d, out(t), "--threads", "0"), ["--threads"]),
        ("train-repeats-0", lambda d, t: _train(d, out(t), "--repeats", "0"), ["--repeats"]),
        ("train-seed-negative", lambda d, t: _train(d, out(t), "--seed", "-3"), ["--seed"]),
        ("train-grouping-unknown", lambda d, t: _train(d, out(t), "--grouping", "spiral"), ["--grouping", "spiral"]),
        ("train-model-arg-no-equals", lambda d, t: _train(d, out(t), "--model-arg", "gated"), ["--model-arg"]),
        # output locations, checked before any computing
        ("train-out-under-file", lambda d, t: _train(d, _write(t / "f", "x") / "run"), ["--out", "is not a directory"]),
        ("train-out-is-file", lambda d, t: _train(d, _write(t / "f", "x")), ["--out", "not a directory"]),
        ("train-out-unwritable", lambda d, t: _train(d, UNWRITABLE + "/run"), ["--out", "not writable"]),
        # input files
        ("train-features-missing", lambda d, t: _replace(_train(d, out(t)), "--features", t / "nope"), ["nope"]),
        ("train-labels-missing", lambda d, t: _replace(_train(d, out(t)), "--labels", t / "nolabels.csv"), ["nolabels.csv"]),
        ("train-labels-semicolon", lambda d, t: _replace(_train(d, out(t)), "--labels", _labels_with(d, t, lambda ls: [x.replace(",", ";") for x in ls])), ["semicolon"]),
        ("train-labels-blank-case", lambda d, t: _replace(_train(d, out(t)), "--labels", _labels_with(d, t, _blank_case)), ["line 2", "case_id"]),
        ("train-labels-one-class", lambda d, t: _replace(_train(d, out(t)), "--labels", _labels_with(d, t, _one_class)), ["labels.csv"]),
        ("train-labels-missing-slide", lambda d, t: _replace(_train(d, out(t)), "--labels", _labels_with(d, t, _missing_slide)), ["slide_that_is_not_there"]),
        ("train-duplicate-h5-pt", lambda d, t: _replace(_train(d, out(t)), "--features", _duplicate_bag(d, t)), ["slide_0.h5", "slide_0.pt"]),
        ("train-config-missing", lambda d, t: _train(d, out(t), "--config", str(t / "none.yaml")), ["none.yaml"]),
        ("train-config-not-yaml", lambda d, t: _train(d, out(t), "--config", str(_write(t / "bad.yaml", "a: [1, 2\n"))), ["bad.yaml"]),
        ("train-config-unknown-key", lambda d, t: _train(d, out(t), "--config", str(_write(t / "k.yaml", "epochz: 3\n"))), ["k.yaml", "epochz"]),
        ("train-config-epochs-0", lambda d, t: _train(d, out(t), "--config", str(_write(t / "e.yaml", "train: {epochs: 0}\n"))), ["e.yaml", "epochs"]),
        # evaluate / predict / prune-limit
        ("predict-out-is-dir", lambda d, t: ["predict", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", str(t)], ["--out", "is a directory"]),
        ("predict-out-under-file", lambda d, t: ["predict", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", str(_write(t / "f", "x") / "p.csv")], ["--out"]),
        ("predict-out-unwritable", lambda d, t: ["predict", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", UNWRITABLE + "/p.csv"], ["--out", "not writable"]),
        ("predict-repeats-0", lambda d, t: ["predict", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", str(t / "p.csv"), "--repeats", "0"], ["--repeats"]),
        ("predict-checkpoint-missing", lambda d, t: ["predict", "--checkpoint", str(t / "ckpt"), "--features", str(d / "features"), "--out", str(t / "p.csv")], ["ckpt"]),
        ("evaluate-out-is-dir", lambda d, t: ["evaluate", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--labels", str(d / "labels.csv"), "--out", str(t)], ["--out", "is a directory"]),
        ("evaluate-no-labels", lambda d, t: ["evaluate", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", str(t / "m.json")], ["--labels"]),
        ("prune-limit-out-is-dir", lambda d, t: ["prune-limit", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--labels", str(d / "labels.csv"), "--out", str(t)], ["--out", "is a directory"]),
        ("prune-limit-lanczos-1", lambda d, t: ["prune-limit", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--labels", str(d / "labels.csv"), "--out", str(t / "l.json"), "--lanczos-steps", "1"], ["--lanczos-steps"]),
        ("prune-limit-tolerance-1.5", lambda d, t: ["prune-limit", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--labels", str(d / "labels.csv"), "--out", str(t / "l.json"), "--tolerance", "1.5"], ["--tolerance"]),
        # import-checkpoint and synth
        ("import-released-missing", lambda d, t: ["import-checkpoint", "--released", str(t / "w.pth"), "--in-dim", "6", "--out", str(t / "ck")], ["w.pth"]),
        ("import-out-is-file", lambda d, t: ["import-checkpoint", "--released", str(t / "w.pth"), "--in-dim", "6", "--out", str(_write(t / "f", "x"))], ["--out"]),
        ("import-n-classes-1", lambda d, t: ["import-checkpoint", "--released", str(t / "w.pth"), "--in-dim", "6", "--n-classes", "1", "--out", str(t / "ck")], ["--n-classes"]),
        ("synth-n-slides-0", lambda d, t: ["synth", "--out", str(t / "s"), "--n-slides", "0"], ["--n-slides"]),
        ("synth-positive-rate-1.5", lambda d, t: ["synth", "--out", str(t / "s"), "--positive-rate", "1.5"], ["--positive-rate"]),
        ("synth-min-over-max", lambda d, t: ["synth", "--out", str(t / "s"), "--min-instances", "50", "--max-instances", "10"], ["--min-instances"]),
        ("synth-out-is-file", lambda d, t: ["synth", "--out", str(_write(t / "f", "x"))], ["--out"]),
    ]
    if not torch.cuda.is_available():
        cases += [
            ("train-device-cuda", lambda d, t: _train(d, out(t), "--device", "cuda"), ["--device"]),
            ("predict-device-cuda", lambda d, t: ["predict", "--checkpoint", _ckpt(d), "--features", str(d / "features"), "--out", str(t / "p.csv"), "--device", "cuda"], ["--device"]),
        ]
    return cases


def _replace(argv: list[str], flag: str, value) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


CASES = _cases()


@pytest.mark.parametrize("build, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(data, tmp_path, capsys, build, names):
    argv = build(data, tmp_path)
    assert_refused(main, argv, capsys, names=names, watch=[tmp_path, data])


def test_failed_run_leaves_nothing_and_the_retry_is_accepted(data, tmp_path, capsys):
    out = tmp_path / "run"
    message = assert_refused(main, _train(data, out, "--lr", "1e30", "--mask-ratio", "0"), capsys, names=["lr"], watch=[tmp_path])
    assert "non-finite" in message and not out.exists()
    assert main(_train(data, out)) == 0  # the retry the message recommends
    assert (out / "metrics.json").is_file()


def test_refused_rerun_names_the_difference_and_overwrite_starts_afresh(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(data, out)) == 0
    (out / "notes.txt").write_text("mine")
    assert_refused(main, _train(data, out, "--weight-decay", "0.5"), capsys, names=["weight_decay", "0.5", "--overwrite"], watch=[tmp_path])
    assert main(_train(data, out, "--weight-decay", "0.5", "--overwrite")) == 0
    assert "weight_decay: 0.5" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are removed


def test_resumed_run_removes_stale_temporary_files(data, tmp_path):
    out = tmp_path / "run"
    assert main(_train(data, out)) == 0
    stale = [out / ".metrics.json.abc123.tmp", out / "fold_0" / ".history.json.x.tmp"]
    for path in stale:
        path.write_text("half a file")
    assert main(_train(data, out)) == 0
    assert not any(p.exists() for p in stale)
    assert not list(out.rglob("*.tmp"))


def test_predict_writes_through_a_symlink(data, tmp_path, capsys):
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    code, err = run_cli(main, ["predict", "--checkpoint", _ckpt(data), "--features", str(data / "features"), "--out", str(link)], capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("slide_id,prob_0,prob_1,pred")


def test_predict_writes_into_a_fifo_without_replacing_it(data, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    code, err = run_cli(main, ["predict", "--checkpoint", _ckpt(data), "--features", str(data / "features"), "--out", str(fifo)], capsys)
    reader.join(timeout=30)
    assert code == 0, err
    assert received and received[0].decode().startswith("slide_id,prob_0")
    assert fifo.is_fifo() and not fifo.is_file()
