"""Shared checks of the bad-input matrices: exit status 2, one line naming the culprit, nothing changed on disk."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, Sequence


def snapshot(*roots: str | os.PathLike) -> dict[str, tuple]:
    """Every path under ``roots`` (roots included) -> (kind, content hash or link target, mode bits)."""
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        paths = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
        for p in paths:
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p))
            elif not p.exists():
                state[str(p)] = ("absent",)
            elif p.is_dir():
                state[str(p)] = ("dir", stat.S_IMODE(p.stat().st_mode))
            elif p.is_file():
                state[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                state[str(p)] = ("special", stat.S_IFMT(p.stat().st_mode))
    return state


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys) -> tuple[int, str]:
    """Run a CLI ``main`` in-process; return (exit status, stderr). argparse's SystemExit counts as a status."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_refused(main, argv: Sequence[str], capsys, *, names: Sequence[str], watch: Sequence[str | os.PathLike]) -> str:
    """The command exits 2 with one error line that names each of ``names``, and nothing under ``watch`` changes."""
    before = snapshot(*watch)
    code, err = run_cli(main, argv, capsys)
    after = snapshot(*watch)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    for name in names:
        assert str(name) in errors[0], f"{name!r} not named in: {errors[0]}"
    assert after == before, f"output location changed: {set(after.items()) ^ set(before.items())}"
    return errors[0]
