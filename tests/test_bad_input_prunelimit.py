"""Bad input to `prunelimit`: one error line naming the option or file, exit 2, no traceback, nothing changed on disk.

Plus the good cases next to them: a resumed run removes stale temporary files, --overwrite starts
afresh, --out may be a symlink to a directory, and a failed run does not block its retry.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bad_input import assert_refused, run_cli
from prunelimit.cli import main
from prunelimit.config import RunConfig

NEW = ["--model", "lenet300", "--dataset", "digits", "--epochs", "1", "--no-progress"]


def _setup(tmp: Path) -> None:
    """Files the cases point at: config files, a regular file, run directories."""
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "notyaml.yaml").write_text("epochs: [1,\n")
    (tmp / "unknown.yaml").write_text("model: lenet300\nlanczos: 3\n")
    (tmp / "wrongtype.yaml").write_text("epochs: many\n")
    (tmp / "range.yaml").write_text("epochs: 0\n")
    (tmp / "momentum.yaml").write_text("momentum: 1.5\n")
    (tmp / "steps.yaml").write_text("lanczos_steps: 1\n")
    (tmp / "list.yaml").write_text("- epochs\n- 3\n")
    (tmp / "cuda.yaml").write_text("device: cuda\n")
    (tmp / "cfgdir.yaml").mkdir()
    stored = RunConfig("lenet300", "digits").resolved().to_yaml()
    (tmp / "other").mkdir()
    (tmp / "other" / "config.yaml").write_text(stored)
    (tmp / "cluttered").mkdir()
    (tmp / "cluttered" / "config.yaml").write_text(stored)
    (tmp / "cluttered" / "notes.txt").write_text("mine\n")


def _run(*extra: str) -> list[str]:
    return ["run", "--out", "{out}", *NEW, *extra]


def _factory(model: str = "lenet300", dataset: str = "digits") -> list[str]:
    return ["run", "--out", "{out}", "--model", model, "--dataset", dataset, "--epochs", "1", "--no-progress"]


# (id, argv with {out} = tmp/run and {tmp} = tmp, strings the error line must contain)
CASES = [
    # numeric options, every subcommand that has them, checked at parse time
    ("epochs-0", _run("--epochs", "0"), ["--epochs"]),
    ("lam-negative", _run("--lam=-1e-3"), ["--lam", ">= 0"]),  # (argparse reads a bare -1e-3 as an option)
    ("lr-zero", _run("--lr", "0"), ["--lr"]),
    ("lr-nan", ["train", "--out", "{out}", *NEW, "--lr", "nan"], ["--lr"]),
    ("batch-size-0", ["train", "--out", "{out}", *NEW, "--batch-size", "0"], ["--batch-size"]),
    ("weight-decay-negative", _run("--weight-decay", "-0.1"), ["--weight-decay"]),
    ("probes-0", ["spectrum", "--out", "{out}", "--probes", "0"], ["--probes"]),
    ("trace-samples-0", ["spectrum", "--out", "{out}", "--trace-samples", "0"], ["--trace-samples"]),
    ("hessian-samples-0", ["spectrum", "--out", "{out}", "--hessian-samples", "0"], ["--hessian-samples"]),
    ("hessian-batch-size-0", ["spectrum", "--out", "{out}", "--hessian-batch-size", "0"], ["--hessian-batch-size"]),
    ("eps-batch-size-0", _run("--eps-batch-size", "0"), ["--eps-batch-size"]),
    ("lanczos-max-steps-1", ["spectrum", "--out", "{out}", "--lanczos-max-steps", "1"], ["--lanczos-max-steps"]),
    ("lanczos-steps-1", ["spectrum", "--out", "{out}", "--lanczos-steps", "1"], ["--lanczos-steps"]),
    ("tolerance-1", ["prune", "--out", "{out}", "--tolerance", "1"], ["--tolerance"]),
    ("prune-ratio-1", ["prune", "--out", "{out}", "--prune-ratio", "1.0"], ["--prune-ratio"]),
    ("prune-ratio-negative", ["report", "--out", "{out}", "--prune-ratio", "-0.5"], ["--prune-ratio"]),
    ("threads-0", ["train", "--out", "{out}", *NEW, "--threads", "0"], ["--threads"]),
    ("seed-negative", ["predict", "--out", "{out}", "--seed", "-1"], ["--seed"]),
    ("seed-too-large", _run("--seed", str(2**32)), ["--seed", "4294967294"]),
    ("epochs-not-integer", _run("--epochs", "1.5"), ["--epochs"]),
    # data-dependent size: checked after loading the data, before training
    ("eps-batch-size-too-large", _run("--eps-batch-size", "5000"), ["--eps-batch-size", "5000"]),
    # output location
    ("out-is-a-file", ["run", "--out", "{tmp}/afile", *NEW], ["--out", "afile", "not a directory"]),
    ("out-under-a-file", ["run", "--out", "{tmp}/afile/run", *NEW], ["--out", "afile", "not a directory"]),
    ("out-empty", ["run", "--out", "", *NEW], ["--out", "empty"]),
    ("out-not-writable", ["run", "--out", "/proc/prunelimit_test", *NEW], ["--out", "/proc/prunelimit_test", "not writable"]),
    # user factories
    ("model-module-missing", _factory("pl_no_such_module:make"), ["--model", "pl_no_such_module:make", "factory(in_shape, num_classes)"]),
    ("model-attr-missing", _factory("pl_factories:missing"), ["--model", "pl_factories:missing", "no attribute"]),
    ("model-not-callable", _factory("pl_factories:NOT_CALLABLE"), ["--model", "not callable", "torch.nn.Module"]),
    ("model-factory-raises", _factory("pl_factories:raises"), ["--model", "pl_factories:raises", "boom from the model factory"]),
    ("model-wrong-signature", _factory("pl_factories:needs_depth"), ["--model", "needs_depth", "depth", "factory(in_shape, num_classes)"]),
    ("model-returns-int", _factory("pl_factories:returns_int"), ["--model", "returned int", "torch.nn.Module"]),
    ("model-does-not-fit-data", _factory("pl_factories:wrong_shape"), ["--model", "pl_factories:wrong_shape", "--dataset", "digits"]),
    ("model-unknown-name", _factory("fc6"), ["unknown model 'fc6'"]),
    ("dataset-module-missing", _factory(dataset="pl_no_such_module:data"), ["--dataset", "pl_no_such_module:data", "DatasetBundle"]),
    ("dataset-factory-raises", _factory(dataset="pl_factories:data_raises"), ["--dataset", "no data here", "DatasetBundle"]),
    ("dataset-wrong-type", _factory(dataset="pl_factories:data_wrong_type"), ["--dataset", "returned str", "DatasetBundle"]),
    ("dataset-wrong-signature", _factory(dataset="pl_factories:data_wrong_signature"), ["--dataset", "split", "factory(data_root=None, seed=0)"]),
    ("dataset-root-missing", _factory("fc5", "mnist") + ["--data-root", "{tmp}/nowhere"], ["--data-root", "nowhere"]),
    # --config files
    ("config-missing", _run("--config", "{tmp}/missing.yaml"), ["--config", "missing.yaml"]),
    ("config-is-a-directory", _run("--config", "{tmp}/cfgdir.yaml"), ["--config", "cfgdir.yaml"]),
    ("config-not-yaml", _run("--config", "{tmp}/notyaml.yaml"), ["notyaml.yaml", "not valid YAML", "line 2"]),
    ("config-not-a-mapping", _run("--config", "{tmp}/list.yaml"), ["list.yaml", "mapping"]),
    ("config-unknown-key", _run("--config", "{tmp}/unknown.yaml"), ["--config", "unknown.yaml", "lanczos"]),
    ("config-wrong-type", _run("--config", "{tmp}/wrongtype.yaml"), ["--config", "wrongtype.yaml", "epochs", "integer"]),
    ("config-out-of-range", ["run", "--out", "{out}", "--model", "fc5", "--dataset", "digits", "--config", "{tmp}/range.yaml"],
     ["range.yaml", "epochs", ">= 1"]),
    ("config-yaml-only-key", _run("--config", "{tmp}/momentum.yaml"), ["momentum.yaml", "momentum", "[0, 1)"]),
    ("config-lanczos-steps", _run("--config", "{tmp}/steps.yaml"), ["steps.yaml", "lanczos_steps"]),
    # device
    ("device-cuda-unavailable", _run("--device", "cuda"), ["--device", "cuda", "not available"]),
    ("device-cuda-from-config", _run("--config", "{tmp}/cuda.yaml"), ["cuda.yaml", "device", "not available"]),
    ("device-nonsense", _run("--device", "gpu0"), ["--device", "gpu0"]),
    # run directories
    ("rerun-other-model", ["run", "--out", "{tmp}/other", "--model", "fc5", "--no-progress"],
     ["model: 'lenet300' stored vs 'fc5' given", "--overwrite"]),
    ("rerun-other-dataset", ["train", "--out", "{tmp}/other", "--dataset", "mnist5k", "--no-progress"],
     ["dataset: 'digits' stored vs 'mnist5k' given", "--overwrite"]),
    ("overwrite-unknown-files", ["run", "--out", "{tmp}/cluttered", "--overwrite", *NEW], ["--overwrite", "notes.txt"]),
    ("step-without-run", ["predict", "--out", "{out}"], ["not a prunelimit run directory"]),
    ("step-without-its-input", ["predict", "--out", "{tmp}/other"], ["no train.json yet", "prunelimit train"]),
]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv,names", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_refused(tmp_path, capsys, no_cuda, argv, names):
    if "/proc/prunelimit_test" in argv and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    _setup(tmp_path)
    argv = [a.format(out=tmp_path / "run", tmp=tmp_path) for a in argv]
    assert_refused(main, argv, capsys, names=[n.format(tmp=tmp_path) for n in names], watch=[tmp_path])
    assert "pl_no_such_module" not in sys.modules


def test_matrix_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_oserror_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import prunelimit.cli as cli

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.yaml"))

    monkeypatch.setattr(cli, "_overrides", denied)
    assert_refused(main, ["run", "--out", str(tmp_path / "run"), *NEW], capsys,
                   names=["locked.yaml", "Permission denied"], watch=[tmp_path])


# ---------------------------------------------------------------------------- good cases
def _train(out, capsys, *extra: str, model: str = "lenet300") -> None:
    code, err = run_cli(main, ["train", "--out", str(out), "--model", model, "--dataset", "digits", "--epochs", "1",
                               "--no-progress", *extra], capsys)
    assert code == 0, err


def test_failed_run_leaves_nothing_and_the_retry_works(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--model", "pl_factories:nan_model", "--dataset", "digits", "--epochs", "1", "--no-progress"]
    assert_refused(main, argv, capsys, names=["training loss became nan", "lower --lr"], watch=[tmp_path])
    assert not out.exists()
    _train(out, capsys, "--lr", "0.01")  # the retry with other options (here another model) is not refused
    assert "model: lenet300" in (out / "config.yaml").read_text()


def test_leftover_files_of_a_killed_first_run_do_not_block_the_retry(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # killed after writing model.json but before config.yaml: no run was recorded, so nothing is refused
    (out / "model.json").write_text(json.dumps({"model": "fc5", "dataset": "digits", "in_shape": [1, 8, 8], "num_classes": 10}))
    (out / ".config.yaml.k1ll3d.tmp").write_text("model: fc")
    _train(out, capsys)
    assert json.loads((out / "model.json").read_text())["model"] == "lenet300"
    assert not (out / ".config.yaml.k1ll3d.tmp").exists()


def test_resume_removes_stale_temp_files(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, capsys)
    stale = [out / ".train.json.k1ll3d.tmp", out / ".model.safetensors.x7.tmp"]
    for path in stale:
        path.write_text("half a file")
    stamp = json.loads((out / "train.json").read_text())["stamp"]
    _train(out, capsys)  # done: skipped, but the directory is tidied
    assert not any(p.exists() for p in stale)
    assert json.loads((out / "train.json").read_text())["stamp"] == stamp
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, capsys)
    (out / ".report.json.dead.tmp").write_text("")
    (out / "report.json").write_text("{}")  # a result the new run must not inherit
    before = json.loads((out / "train.json").read_text())["stamp"]
    _train(out, capsys, "--overwrite", "--seed", "3", model="pl_factories:tiny_mlp")
    assert json.loads((out / "train.json").read_text())["stamp"] != before
    stored = (out / "config.yaml").read_text()
    assert "model: pl_factories:tiny_mlp" in stored and "seed: 3" in stored
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.json", "model.safetensors", "train.json"]


@pytest.mark.parametrize("target_exists", [True, False], ids=["link-to-dir", "link-to-missing-dir"])
def test_out_through_a_symlink_keeps_the_link(tmp_path, capsys, target_exists):
    real = tmp_path / "real" / "run"
    if target_exists:
        real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    _train(link, capsys)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "train.json").is_file() and (real / "config.yaml").is_file()
    _train(link, capsys)  # resumes through the link
    assert link.is_symlink()


def test_device_auto_is_accepted_and_stored_as_auto(tmp_path, capsys, no_cuda):
    out = tmp_path / "run"
    _train(out, capsys, "--device", "auto")  # no GPU here: auto resolves to the CPU
    assert "device: auto" in (out / "config.yaml").read_text()  # resolved per machine, not frozen into the run
