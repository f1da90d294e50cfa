"""The foundation both wings stand on (mmpl): ranges, strict coercion, layered configs, the YAML reader,
output locations and atomic writes, the JSON NaN policy and the device resolver."""
from __future__ import annotations

import argparse
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mmpl.cliargs import OneLineParser, Range, fraction, open_fraction, positive_float, positive_int, ranged
from mmpl.config import (
    ConfigFile,
    add_config_flags,
    check_fields,
    coerce,
    differences,
    flatten,
    given_flags,
    layered_config,
    load_config,
    option,
    read_yaml_mapping,
)
import mmpl.device
from mmpl.device import resolve_device
from mmpl.errors import InputError
from mmpl.fsio import OutputPathError, atomic_path, check_output_dir, check_output_file
from mmpl.jsonio import nan_from_null, read_json, write_json
from mmpl.progress import progress


class WingError(InputError):
    """Stands for a wing's own error type (MMILInputError, PruneLimitError)."""


# ============================================================================ Range
def test_range_parses_and_refuses_with_the_broken_bound():
    assert positive_int("3") == 3 and isinstance(positive_int("3"), int)
    assert open_fraction("0.5") == 0.5 and fraction("1") == 1.0
    cases = [(positive_int, "0", "must be >= 1, got 0"), (positive_int, "1.5", "expected an integer, got '1.5'"),
             (open_fraction, "1", "must be < 1, got 1"), (positive_float, "0", "must be > 0, got 0"),
             (positive_float, "nan", "expected a finite number, got 'nan'"), (fraction, "x", "expected a number, got 'x'"),
             (Range(int, 0, 2**32 - 2), str(2**32), "must be <= 4294967294, got 4294967296")]
    for kind, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            kind(text)
        assert str(err.value) == message


def test_range_contains_and_describe():
    assert positive_int.contains(1) and not positive_int.contains(0) and not positive_int.contains(1.5)
    assert not positive_int.contains(True) and not positive_int.contains("3") and not positive_float.contains(math.inf)
    assert open_fraction.contains(0.0) and not open_fraction.contains(1.0) and not fraction.contains(math.nan)
    assert positive_int.describe() == ">= 1" and positive_float.describe() == "> 0"
    assert open_fraction.describe() == "in [0, 1)" and Range(float, 0, 1, low_open=True, high_open=True).describe() == "in (0, 1)"
    assert Range(int, 0, 2**32 - 2).describe() == "in [0, 4294967294]"  # integers in full, not 4.29e+09
    assert Range(float, high=2.5).describe() == "<= 2.5" and Range(int).describe() == "an integer"
    assert ranged(float, 0, 1, high_open=True) == open_fraction


def test_range_with_words():
    lam = Range(float, 0, words=("auto",))
    assert lam("auto") == "auto" and lam("1e-3") == 1e-3 and lam.contains("auto") and not lam.contains("often")
    assert lam.describe() == ">= 0 or 'auto'"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number or 'auto', got 'often'"):
        lam("often")


def test_range_as_a_flag_type_gives_one_line_naming_the_flag(capsys):
    parser = OneLineParser(prog="tool")
    parser.add_argument("--epochs", type=positive_int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "tool: error: argument --epochs: must be >= 1, got 0 (see tool --help)"


# ============================================================================ coercion
@pytest.mark.parametrize("value,hint,expected", [
    (5, int, 5), ("5", int, 5), (" -3 ", int, -3), (5, float, 5.0), ("2e-4", float, 2e-4), (1.5, float, 1.5),
    (True, bool, True), ("false", bool, False), ("True", bool, True), (None, int | None, None), ("7", int | None, 7),
    ("auto", int | str, "auto"), ("300", int | str, 300), ([1, "2"], list[int], [1, 2]), ([1, 2], tuple[float, float], (1.0, 2.0)),
    ({"a": 1}, dict, {"a": 1}), (3, str, "3"),
])
def test_coerce_accepts(value, hint, expected):
    out = coerce(value, hint, "key")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value,hint,message", [
    (5.0, int, "expected an integer"), ("5.0", int, "expected an integer"), (300.0, int, "expected an integer"),
    (True, int, "expected an integer"), ("ten", int, "expected an integer"), ("yes", bool, "expected true or false"),
    (1, bool, "expected true or false"), (True, float, "expected a number"), ("x", float, "expected a number"),
    (math.nan, float, "expected a finite number"), ("inf", float, "expected a finite number"), (5, list[int], "expected a list"),
    ([1, 2], str, "expected text"), (None, int, "expected an integer"),
])
def test_coerce_is_strict(value, hint, message):
    with pytest.raises(WingError, match=f"^where: {message}"):
        coerce(value, hint, "where", WingError)


# ============================================================================ config dataclasses
@dataclass
class Inner(ConfigFile):
    config_error = WingError

    lr: float = option(0.1, help="learning rate", type=positive_float)
    steps: int = option(10, help="steps", type=positive_int)

    def __post_init__(self):
        check_fields(self, "inner.", WingError)


@dataclass
class Outer(ConfigFile):
    config_error = WingError

    name: str = option("a", help="name", choices=("a", "b"))
    size: int = option(2, help="size", type=Range(int, 2), metavar="N")
    span: tuple[float, float] = option((0.1, 0.2), help="span", type=open_fraction, nargs=2, metavar=("LO", "HI"))
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        check_fields(self, error=WingError)


def test_check_fields_coerces_in_place_and_names_key_and_flag():
    assert Inner(lr="2e-4", steps="3") == Inner(lr=2e-4, steps=3)
    with pytest.raises(WingError, match=r"^inner\.steps must be >= 1, got 0 \(--steps\)$"):
        Inner(steps=0)
    with pytest.raises(WingError, match=r"^inner\.steps: expected an integer, got 2\.5 \(--steps\)$"):
        Inner(steps=2.5)
    with pytest.raises(WingError, match=r"span must be in \[0, 1\), got 1\.5"):
        Outer(span=(0.1, 1.5))


def test_load_config_reads_nested_mappings():
    cfg = load_config(Outer, {"size": "3", "inner": {"lr": "1e-3"}}, "c.yaml", WingError)
    assert cfg == Outer(size=3, inner=Inner(lr=1e-3)) and isinstance(cfg.inner, Inner)
    for values, message in [({"sise": 3}, r"^c\.yaml: unknown key 'sise'; valid keys: name, size, span, inner$"),
                            ({"inner": {"lr": 0}}, r"^c\.yaml \(inner\): inner\.lr must be > 0, got 0\.0 \(--lr\)$"),
                            ({"inner": [1]}, r"`inner` must be a mapping"), ({"size": 1}, r"^c\.yaml: size must be >= 2")]:
        with pytest.raises(WingError, match=message):
            load_config(Outer, values, "c.yaml", WingError)
    assert Outer.from_dict(Outer().to_dict()) == Outer()


def test_layered_config_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 5\nname: b\ninner: {lr: 2e-4, steps: 7}\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Outer)
    add_config_flags(parser, Inner, prefix="inner_")
    args = parser.parse_args(["--size", "9", "--steps", "11"])
    flags, nested = given_flags(args, Outer), {"inner": given_flags(args, Inner, prefix="inner_")}
    assert flags == {"size": 9} and nested == {"inner": {"steps": 11}}
    cfg = layered_config(Outer, path, flags, nested, WingError)
    assert (cfg.name, cfg.size, cfg.inner.lr, cfg.inner.steps, cfg.span) == ("b", 9, 2e-4, 11, (0.1, 0.2))
    assert layered_config(Outer, None, {}, error=WingError) == Outer()
    assert Outer.from_yaml(path).size == 5
    path.write_text("size: 1\n")  # a bad file is refused even where a flag overrides the key
    with pytest.raises(WingError, match="c.yaml: size must be >= 2"):
        layered_config(Outer, path, {"size": 9}, error=WingError)


def test_config_flags_show_choices_and_take_nargs_and_required():
    @dataclass
    class Cmd:
        dim: int | None = option(None, help="dimension", type=positive_int, required=True)
        sizes: list[int] = option(default_factory=lambda: [1, 2], help="sizes", type=positive_int, nargs="*", metavar="N")

    parser = argparse.ArgumentParser(prog="cmd")
    add_config_flags(parser, Outer)
    add_config_flags(parser, Cmd)
    text = parser.format_help()
    assert "--name {a,b}" in text and "--span LO HI" in text and "--size N" in text
    assert "(default: 0.1 0.2)" in text and "(default: required)" in text and "(default: 1 2)" in text
    args = parser.parse_args(["--dim", "4", "--span", "0.3", "0.4", "--sizes"])
    assert given_flags(args, Cmd) == {"dim": 4, "sizes": []} and given_flags(args, Outer) == {"span": [0.3, 0.4]}
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --dim is required


def test_flatten_and_differences():
    stored = {"model": "a", "train": {"lr": 1e-3, "epochs": 5}, "hash": "0123456789abcdef" * 4}
    given = {"model": "a", "train": {"lr": 2e-3}, "hash": "f" * 64, "extra": [1, 2]}
    assert flatten(stored)["train.lr"] == 1e-3 and "train" not in flatten(stored)
    assert differences(stored, given) == ["extra: \"(unset)\" -> [1, 2]", "hash: \"0123456789abcde... -> \"fffffffffffffff...",
                                          "train.epochs: 5 -> \"(unset)\"", "train.lr: 0.001 -> 0.002"]
    assert differences(stored, stored, "x.") == []


# ============================================================================ YAML
def test_read_yaml_mapping_reads_mappings_and_empty_files(tmp_path):
    (tmp_path / "ok.yaml").write_text("a: 1\nb: [x, y]\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "utf16.yaml").write_bytes("a: 2\n".encode("utf-16"))
    assert read_yaml_mapping(tmp_path / "ok.yaml") == {"a": 1, "b": ["x", "y"]}
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {} and read_yaml_mapping(tmp_path / "utf16.yaml") == {"a": 2}


@pytest.mark.parametrize("name,content,message", [
    ("missing.yaml", None, r"missing\.yaml: config file not found$"),
    ("adir", "dir", r"adir: is a directory; give a YAML config file$"),
    ("bad.yaml", b"epochs: [1,\n", r"bad\.yaml: not valid YAML \(.*\); fix the file at line 2, column 1$"),
    ("tab.yaml", b"a: 1\nb:\n\tc: 2\n", r"tab\.yaml: not valid YAML \(.*\); fix the file at line 3, column 1$"),
    ("list.yaml", b"- 1\n- 2\n", r"list\.yaml: the top level must be a mapping of options, got list$"),
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"binary\.yaml: not a UTF-8 text file \(.*\); give a YAML config$"),
    ("latin1.yaml", "name: caf\u00e9\n".encode("latin-1"), r"latin1\.yaml: not a UTF-8 text file"),
])
def test_read_yaml_mapping_errors_name_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WingError, match=message) as err:
        read_yaml_mapping(path, WingError, "--config")
    assert str(err.value).startswith(f"--config {path}: ") and "\n" not in str(err.value)


# ============================================================================ output locations and atomic writes
def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    os.mkfifo(path)
    return path


def test_check_output_file(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "old.txt")
    fifo = _fifo(tmp_path / "pipe")
    for ok in (tmp_path / "new.txt", tmp_path / "sub" / "deeper" / "new.txt", tmp_path / "old.txt", tmp_path / "link", fifo):
        assert check_output_file(ok, "--out") == ok
    with pytest.raises(OutputPathError, match=r"^--out .* is a directory; give a file path"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(OutputPathError, match=r"old\.txt is not a directory"):
        check_output_file(tmp_path / "old.txt" / "x.json", "--out")
    if Path("/proc").is_dir():
        with pytest.raises(OutputPathError, match=r"^--out /proc/xyz: cannot create files in /proc \(not writable\)"):
            check_output_file("/proc/xyz", "--out")


def test_check_output_dir(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    fifo = _fifo(tmp_path / "pipe")
    for ok in (tmp_path, tmp_path / "new" / "run", tmp_path / "dirlink"):
        assert check_output_dir(ok, "--out") == ok
    for bad in (tmp_path / "afile", fifo):
        with pytest.raises(OutputPathError, match=r"exists and is not a directory"):
            check_output_dir(bad, "--out")
    if Path("/proc").is_dir():
        with pytest.raises(OutputPathError, match=r"^--out /proc/xyz: cannot create files in /proc \(not writable\)"):
            check_output_dir("/proc/xyz", "--out")


def test_atomic_path_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_path(link) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_atomic_path_writes_into_a_fifo_without_replacing_it(tmp_path):
    fifo = _fifo(tmp_path / "pipe")
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_path(fifo) as tmp:
        tmp.write_text("through the pipe\n")
    reader.join(timeout=10)
    assert received == [b"through the pipe\n"] and fifo.is_fifo()
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


# ============================================================================ JSON, devices, progress
def test_json_nan_is_null_and_back(tmp_path):
    import numpy as np

    path = tmp_path / "m.json"
    write_json(path, {"auc": float("nan"), "curve": np.array([1.0, np.inf]), "n": np.int64(3)})
    assert "NaN" not in path.read_text() and read_json(path) == {"auc": None, "curve": [1.0, None], "n": 3}
    back = nan_from_null(read_json(path))
    assert math.isnan(back["auc"]) and back["curve"][0] == 1.0 and math.isnan(back["curve"][1])
    path.write_text("{broken")
    with pytest.raises(WingError, match=r"m\.json is not valid JSON"):
        read_json(path, WingError)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mmpl.device, "_mps_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad, message in [("cuda", "--device cuda: CUDA is not available on this machine; use --device cpu"),
                         ("cuda:1", "CUDA is not available"), ("gpu0", "--device 'gpu0'"), ("", "--device ''"),
                         ("meta", "--device meta: not supported")]:
        with pytest.raises(WingError) as err:
            resolve_device(bad, error=WingError)
        assert message in str(err.value)
    with pytest.raises(WingError, match=r"^train\.device cuda:"):
        resolve_device("cuda", "train.device", error=WingError)
    with pytest.raises(WingError, match=r"^--device mps: no Apple GPU"):
        resolve_device("mps", error=WingError)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mmpl.device, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") and resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", env={}) == torch.device("cuda")
    assert resolve_device("auto", env={"LOCAL_RANK": "1"}) == torch.device("cuda:1")


def test_progress_is_the_iterable_itself_off_a_terminal():
    items = [1, 2, 3]
    assert progress(items, True, "bags", unit="bag") is items and progress(items, False, "x") is items
