"""One progress helper: tqdm bars on a terminal, nothing in a log file (bars in logs are noise)."""
from __future__ import annotations

import sys
from typing import Iterable


def show_progress(enabled: bool) -> bool:
    """Bars are drawn only when asked for and stderr is a terminal."""
    return bool(enabled) and sys.stderr.isatty()


def progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None, leave: bool = False,
             unit: str = "it") -> Iterable:
    """``iterable`` wrapped in a tqdm bar counting ``unit`` (e.g. ``"bag"``) when :func:`show_progress`, else itself."""
    if not show_progress(enabled):
        return iterable
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit)


def progress_bar(enabled: bool, total: int, desc: str, leave: bool = False, unit: str = "it"):
    """A manual tqdm bar counting ``unit`` (call ``update``/``close``), or ``None`` when bars are off."""
    if not show_progress(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, unit=unit)
