"""The `prunelimit` command line: exit codes, one-line errors, no partial output, an end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prunelimit.cli import build_parser, main
from prunelimit.config import RunConfig




def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prunelimit") and ": error: " in lines[0]
    return lines[0]


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings} has no help"


def test_list_models(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    for name in ("fc5", "fc12", "lenet300", "alexnet", "vgg16", "resnet18", "resnet50"):
        assert f"\n{name} " in "\n" + out


@pytest.mark.parametrize("argv,message", [
    (["--model", "fc6", "--dataset", "digits"], "unknown model 'fc6'; choose one of: alexnet"),
    (["--model", "fc5", "--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    (["--model", "fc5", "--dataset", "cifar10"], "pass --data-root DIR with cifar-10-batches-py"),
    (["--model", "fc5", "--dataset", "mnist", "--data-root", "/nonexistent/prunelimit"], "--data-root /nonexistent/prunelimit is not a directory"),
    # numbers are range-checked by argparse at parse time (exit 2 via SystemExit)
    (["--model", "fc5", "--dataset", "digits", "--prune-ratio", "1.5"], "argument --prune-ratio: must be < 1, got 1.5"),
    (["--model", "fc5", "--dataset", "digits", "--tolerance", "-0.1"], "argument --tolerance: must be >= 0, got -0.1"),
    (["--model", "fc5", "--dataset", "digits", "--probes", "0"], "argument --probes: must be >= 1"),
    (["--model", "resnet18", "--dataset", "digits", "--lam", "-1"], "argument --lam: must be >= 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    try:
        code = main(["run", "--out", str(out), *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_argparse_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--out", str(tmp_path), "--model", "fc5", "--dataset", "digits", "--lanczos-steps", "many"])
    assert exit_info.value.code == 2
    assert "expected a positive integer or 'auto', got 'many'" in _error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    _error_line(capsys)


def test_run_directory_of_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(RunConfig("lenet300", "digits").resolved().to_yaml())
    before = (out / "config.yaml").read_text()
    assert main(["run", "--out", str(out), "--model", "fc5", "--dataset", "digits"]) == 2
    assert "holds a run of model 'lenet300'" in _error_line(capsys)
    assert (out / "config.yaml").read_text() == before
    assert main(["predict", "--out", str(tmp_path / "nothing")]) == 2
    assert "not a prunelimit run directory" in _error_line(capsys)


def test_config_yaml_unknown_key_and_missing_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: fc5\ndataset: digits\nlanczos: 3\n")
    assert main(["run", "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "unknown option(s) lanczos" in _error_line(capsys)
    assert main(["run", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file" in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    from prunelimit.errors import PruneLimitError

    with pytest.raises(PruneLimitError):
        main(["--debug", "run", "--out", str(tmp_path / "r"), "--model", "fc6", "--dataset", "digits"])


def test_run_end_to_end_then_steps_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("epochs: 2\nlanczos_steps: 20\nprobes: 1\ntrace_samples: 3\nhessian_samples: 200\nlam: 2e-3\n")
    argv = ["run", "--model", "lenet300", "--dataset", "digits", "--out", str(out), "--config", str(cfg),
            "--seed", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert f"predicted threshold p* = {report['predicted_threshold']:.4f}" in printed
    assert f"actual threshold       = {report['actual_threshold']:.4f}" in printed
    assert report["lanczos_steps"] == 20 and report["seed"] == 1 and report["lam"] == 0.002  # YAML (where 2e-3 is a string), then flags
    stored = (out / "config.yaml").read_text()
    assert "seed: 1" in stored and "epochs: 2" in stored

    # a step command re-uses the directory: done steps print their result without recomputing
    mtime = (out / "prediction.json").stat().st_mtime_ns
    assert main(["predict", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"p* = {report['predicted_threshold']:.4f}" in captured.out
    assert "predict: done (prediction.json), skipping" in captured.err
    assert (out / "prediction.json").stat().st_mtime_ns == mtime
    assert main(["predict", "--out", str(out), "--no-progress", "--force"]) == 0
    assert (out / "prediction.json").stat().st_mtime_ns != mtime


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prunelimit", "run", "--out", "x", "--model", "nope", "--dataset", "digits"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip().splitlines() == ["prunelimit: error: unknown model 'nope'; choose one of: alexnet, fc12, fc5, "
                                                "lenet300, resnet18, resnet50, vgg16, vgg_small, or give 'package.module:factory'"]
