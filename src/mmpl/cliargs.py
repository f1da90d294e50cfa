"""One argparse behaviour for both command lines: one-line errors (exit 2) and range-checked numbers.

Every numeric option is declared with a :class:`Range` (or one of the ranges below), so a value
out of range stops the command at parse time, before anything is read or written, with one line
naming the option. The same :class:`Range` checks values from YAML files and Python callers
(:func:`mmpl.config.check_fields`), so a bound is written once.
"""
from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (the usage is one `--help` away)."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Range:
    """A number of type ``kind`` with ``low <= value <= high`` (``<`` where open; ``None``: unbounded).

    It is an argparse ``type`` (``Range(int, 1)("3") == 3``; out of range: "must be >= 1, got 0"),
    and the config checks read its bounds back (:meth:`contains`, :meth:`describe`). ``words``
    are texts accepted as they are besides the numbers, e.g. ``("auto",)``.

    >>> Range(float, 0, 1, high_open=True)("0.5")
    0.5
    >>> Range(int, 0, 2**32 - 2).describe()
    'in [0, 4294967294]'
    """

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: tuple[str, ...] = ()

    def __call__(self, text: str) -> int | float | str:
        if text in self.words:
            return text
        value = self._parse(text)
        broken = self._broken_bound(value)
        if broken:
            raise argparse.ArgumentTypeError(f"must be {broken}, got {text}")
        return value

    def _parse(self, text: str) -> int | float:
        noun = ("an integer" if self.kind is int else "a number") + self._or_words()
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number{self._or_words()}, got {text!r}")
        return value

    def _show(self, bound: float) -> str:
        """A bound as text: integers in full (a seed bound 4294967294, not 4.29e+09)."""
        if self.kind is int or (float(bound).is_integer() and abs(bound) < 2**53):
            return str(int(bound))
        return f"{bound:g}"

    def _or_words(self) -> str:
        return "".join(f" or {w!r}" for w in self.words)

    def _broken_bound(self, value: float) -> str | None:
        """The bound ``value`` breaks (">= 1", "< 1"), or None."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{'>' if self.low_open else '>='} {self._show(self.low)}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"{'<' if self.high_open else '<='} {self._show(self.high)}"
        return None

    def contains(self, value) -> bool:
        """Whether ``value`` (a Python number, or one of ``words``) is allowed: the right kind
        (an integer for ``int``; never a bool), finite and within the bounds."""
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        return math.isfinite(value) and self._broken_bound(value) is None

    def describe(self) -> str:
        """The allowed values as text: ``">= 1"``, ``"> 0"``, ``"in [0, 1)"``, ``">= 0 or 'auto'"``."""
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{self._show(self.low)}, "
                    f"{self._show(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self._show(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self._show(self.high)}"
        else:
            text = "an integer" if self.kind is int else "a finite number"
        return text + self._or_words()


def ranged(kind: type, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Range:
    """The :class:`Range` of ``kind`` from ``low`` to ``high`` (an argparse ``type``).

    >>> ranged(float, 0, 1, high_open=True)("0.5")
    0.5
    """
    return Range(kind, low, high, low_open, high_open)


positive_int = Range(int, 1)
non_negative_int = Range(int, 0)
positive_float = Range(float, 0, low_open=True)
non_negative_float = Range(float, 0)
fraction = Range(float, 0, 1)                      # [0, 1]
open_fraction = Range(float, 0, 1, high_open=True)  # [0, 1)
