"""One argparse behaviour for both command lines: one-line errors (exit 2) and range-checked numbers.

Every numeric option is declared with one of the types below, so a value out of range stops the
command at parse time, before anything is read or written, with one line naming the option.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (the usage is one `--help` away)."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ranged(kind: type, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value <= high`` (``<`` when open).

    >>> ranged(float, 0, 1, high_open=True)("0.5")
    0.5
    """
    lo_sym, hi_sym = (">" if low_open else ">="), ("<" if high_open else "<=")

    def parse(text: str):
        value = _number(kind, text)
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {lo_sym} {low:g}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {hi_sym} {high:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} in range"  # argparse prints this name on type errors
    return parse


positive_int = ranged(int, 1)
non_negative_int = ranged(int, 0)
positive_float = ranged(float, 0, low_open=True)
non_negative_float = ranged(float, 0)
fraction = ranged(float, 0, 1)                      # [0, 1]
open_fraction = ranged(float, 0, 1, high_open=True)  # [0, 1)
