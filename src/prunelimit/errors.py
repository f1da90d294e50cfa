"""The one exception type `prunelimit` raises for bad input."""
from __future__ import annotations

from mmpl.errors import InputError

__all__ = ["PruneLimitError"]


class PruneLimitError(InputError):
    """A one-line, user-facing error: what is wrong and how to fix it.

    Subclasses ValueError so callers that already catch ValueError keep working;
    the CLI turns it into a single line on stderr and a non-zero exit code.
    """
