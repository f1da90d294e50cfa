"""The base of every user-facing input error in the distribution.

Each wing subclasses it (``mmil.errors.MMILInputError``, ``prunelimit.errors.PruneLimitError``);
foundation helpers take the class to raise, so callers keep catching their own type.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file or option and the fix; CLIs print it as one line, exit 2."""
