"""The one exception type for bad user input in :mod:`mmil`.

Raise it with a message that names the offending file (or option) and the fix;
the CLI prints it as a single line and exits with status 2.
"""
from mmpl.errors import InputError


class MMILInputError(InputError):
    """Bad input: missing/corrupt file, wrong shape, NaN, empty bag, unknown option."""
