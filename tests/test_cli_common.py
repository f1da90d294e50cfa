"""Every sub-command of both CLIs takes the same common flags, has its own description, and (prunelimit)
lists only the options its steps read."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from mmpl.cliargs import COMMON_FLAGS, COMMON_TITLE, MAX_SEED, apply_common_flags

from mmil.cli import build_parser as mmil_parser, main as mmil_main
from prunelimit.cli import COMMAND_GROUPS, COMMON_FIELDS, FLAG_GROUPS, build_parser as prunelimit_parser
from prunelimit.config import STEP_SETTINGS, RunConfig

#: The argparse value of each common flag when not given ("not given": the command's default applies).
NOT_GIVEN = {"--threads": None, "--device": None, "--no-progress": False, "--seed": None}
#: The default each flag's help must state (compare's --seed stands for its --seeds list, documented).
SHOWN = {"--threads": "default: torch's choice", "--device": "default: auto", "--seed": "default: 0"}


def _subcommands(build):
    parser = build()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices.items())


ALL = [(f"mmil {n}", p) for n, p in _subcommands(mmil_parser)] + [(f"prunelimit {n}", p) for n, p in _subcommands(prunelimit_parser)]


def test_every_subcommand_is_walked():
    names = {n for n, _ in ALL}
    assert {"mmil train", "mmil bench", "mmil extract", "mmil synth", "prunelimit compare", "prunelimit list-models"} <= names
    assert len(names) >= 19


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_common_flags_with_the_same_defaults(name, parser):
    actions = parser._option_string_actions
    for flag in COMMON_FLAGS:
        assert flag in actions, f"{name} lacks {flag}"
        assert actions[flag].default == NOT_GIVEN[flag], (name, flag, actions[flag].default)
    for flag, text in SHOWN.items():
        if (name, flag) != ("prunelimit compare", "--seed"):
            assert text in actions[flag].help, (name, flag, actions[flag].help)
    groups = {a.option_strings[0]: g.title for g in parser._action_groups for a in g._group_actions if a.option_strings}
    assert all(groups[flag] == COMMON_TITLE for flag in COMMON_FLAGS), (name, {f: groups[f] for f in COMMON_FLAGS})


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_seed_out_of_range_is_refused_naming_the_flag(name, parser, capsys):
    for bad in ("-1", str(MAX_SEED + 1), "x"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--seed", bad])
        assert exit_.value.code == 2
        assert "--seed" in capsys.readouterr().err


def test_every_subcommand_has_its_own_description():
    descriptions = [(n, (p.description or "").strip()) for n, p in ALL]
    assert all(len(d) > 20 for _, d in descriptions), [n for n, d in descriptions if len(d) <= 20]
    seen: dict[str, str] = {}
    for name, text in descriptions:
        assert text not in seen, f"{name} repeats the description of {seen.get(text)}"
        seen[text] = name


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _field_flags(names) -> set[str]:
    return {"--" + n.replace("_", "-") for n in names}


def test_prunelimit_groups_cover_every_flag_once():
    cli_fields = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("cli", True)}
    grouped = [n for names in FLAG_GROUPS.values() for n in names]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) | set(COMMON_FIELDS) == cli_fields


def test_each_prunelimit_step_lists_only_its_own_options():
    parsers = dict(_subcommands(prunelimit_parser))
    every = _field_flags(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("cli", True))
    for command, groups in COMMAND_GROUPS.items():
        own = _field_flags(n for g in groups for n in FLAG_GROUPS[g]) | _field_flags(COMMON_FIELDS)
        flags = _flags(parsers[command])
        assert flags & every == own & every, command
        wanted = _field_flags(k for k in STEP_SETTINGS.get(command, ()) if k in {f.name for f in dataclasses.fields(RunConfig)})
        assert (wanted & every) <= flags, (command, (wanted & every) - flags)  # what the step's result depends on
    prune_help = parsers["prune"].format_help()
    assert "--lanczos-steps" not in prune_help and "--lam " not in prune_help and "--tolerance" in prune_help
    assert "--tolerance" not in parsers["spectrum"].format_help() and "--probes" in parsers["spectrum"].format_help()
    assert _flags(parsers["run"]) >= every


def test_threads_flag_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            apply_common_flags(argparse.Namespace(threads=n))
            assert torch.get_num_threads() == n
        apply_common_flags(argparse.Namespace(threads=None))  # not given: left as it is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_device_defaults_to_auto_unless_the_yaml_names_one(tmp_path):
    from mmil.cli.common import default_device_auto

    def device(config, flag=None):
        args = argparse.Namespace(config=config, train_device=flag)
        default_device_auto(args, "train_device", ("train", "device"))
        return args.train_device

    with_device = tmp_path / "a.yaml"
    with_device.write_text("train: {device: cpu, epochs: 3}\n")
    without = tmp_path / "b.yaml"
    without.write_text("train: {epochs: 3}\nfolds: 2\n")
    assert device(None) == "auto" and device(str(without)) == "auto"
    assert device(str(with_device)) is None  # the file's cpu applies
    assert device(str(with_device), "cuda") == "cuda"  # a flag wins
    assert RunConfig(model="fc5", dataset="digits").device == "auto"


def test_bench_quiet_is_an_alias_of_no_progress():
    parser = mmil_parser()
    base = ["bench", "--features", "f", "--out", "o"]
    assert parser.parse_args(base + ["--quiet"]).no_progress is True
    assert parser.parse_args(base + ["--no-progress"]).no_progress is True
    assert parser.parse_args(base).no_progress is False


def test_seed_flag_reaches_the_command(tmp_path):
    """`mmil synth --seed 3` writes what the library writes with seed 3, and not what seed 0 gives."""
    import h5py

    from mmil.data.synth import write_synthetic_dataset

    small = ["--n-slides", "3", "--in-dim", "4", "--min-instances", "5", "--max-instances", "8"]
    assert mmil_main(["synth", "--out", str(tmp_path / "cli"), "--seed", "3", "--no-progress", "--threads", "1", *small]) == 0
    write_synthetic_dataset(tmp_path / "lib3", n_slides=3, in_dim=4, min_instances=5, max_instances=8, seed=3)
    write_synthetic_dataset(tmp_path / "lib0", n_slides=3, in_dim=4, min_instances=5, max_instances=8, seed=0)

    def features(root):
        with h5py.File(sorted((root / "features").glob("*.h5"))[0]) as f:
            return np.asarray(f["features"])

    assert np.array_equal(features(tmp_path / "cli"), features(tmp_path / "lib3"))
    a, b = features(tmp_path / "cli"), features(tmp_path / "lib0")
    assert a.shape != b.shape or not np.array_equal(a, b)
