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


# ============================================================================ the flags of every command
MAX_SEED = 2**32 - 2  # numpy and scikit-learn take seeds below 2**32; some commands also use seed + 1
seed_int = Range(int, 0, MAX_SEED)
#: What the common flags mean when a command does not give them (``--device``'s None means "auto";
#: a command that reads a YAML --config keeps the file's value, see :func:`add_common_flags`).
COMMON_DEFAULTS = {"threads": None, "device": "auto", "no_progress": False, "seed": 0}
COMMON_FLAGS = ("--threads", "--device", "--no-progress", "--seed")
COMMON_TITLE = "common options (the same on every command of mmil and prunelimit)"
UNUSED = "accepted on every command for uniformity; this command does not use it"
_COMMON_HELP = {
    "threads": "CPU threads for torch; small models often run fastest on 1, especially on a busy machine",
    "device": "auto, cpu, cuda or cuda:N (auto: this rank's GPU under torchrun, else the first GPU, else cpu)",
    "no_progress": "no progress bars or progress lines (without it, bars are drawn on a terminal only)",
    "seed": "seed of every random choice the command makes",
}


def add_common_flags(parser: argparse.ArgumentParser, *, dests: dict[str, str] | None = None,
                     helps: dict[str, str] | None = None, unused: tuple[str, ...] = ()) -> None:
    """Give ``parser`` the four flags every sub-command of both CLIs takes: ``--threads N``,
    ``--device {auto,cpu,cuda,cuda:N}`` (default auto), ``--no-progress`` and ``--seed S`` (default 0).

    Every flag is stored as "not given" (None; False for ``--no-progress``), so a YAML ``--config``
    value is only overridden by a flag the user typed; ``dests`` names the attribute a flag fills
    (e.g. ``{"device": "train_device"}`` to feed a nested config's field), ``helps`` says what the
    flag means for this command, and the names in ``unused`` are marked as accepted but unused.
    A flag the parser already has (the command declared it itself) is left as it is, and calling
    this twice adds nothing, so a CLI can call it on every sub-command after building them.
    """
    taken = set(getattr(parser, "_option_string_actions", {}))
    if all(flag in taken for flag in COMMON_FLAGS):
        return
    group = parser.add_argument_group(COMMON_TITLE)
    dests, helps = dests or {}, helps or {}

    def text(name: str, default: str) -> str:
        why = UNUSED if name in unused else helps.get(name, _COMMON_HELP[name])
        return f"{why} (default: {default})" if default and "(default:" not in why else why

    if "--threads" not in taken:
        group.add_argument("--threads", dest=dests.get("threads", "threads"), type=positive_int, metavar="N",
                           default=None, help=text("threads", "torch's choice"))
    if "--device" not in taken:
        group.add_argument("--device", dest=dests.get("device", "device"), default=None, metavar="DEVICE",
                           help=text("device", "auto"))
    if "--no-progress" not in taken:
        group.add_argument("--no-progress", dest=dests.get("no_progress", "no_progress"), action="store_true",
                           default=False, help=text("no_progress", ""))
    if "--seed" not in taken:
        group.add_argument("--seed", dest=dests.get("seed", "seed"), type=seed_int, metavar="S", default=None,
                           help=text("seed", "0"))


def add_common_flags_everywhere(subparsers_action) -> None:
    """:func:`add_common_flags` on every sub-command of an ``add_subparsers`` action that lacks them."""
    for parser in dict.fromkeys(subparsers_action.choices.values()):
        add_common_flags(parser)


def apply_common_flags(args: argparse.Namespace) -> None:
    """Act on the common flags that need no command: ``--threads`` sets torch's CPU threads."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        import torch  # noqa: PLC0415 - only commands that run torch pay for the import

        torch.set_num_threads(threads)
