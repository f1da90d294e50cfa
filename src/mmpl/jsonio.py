"""JSON with one NaN policy for the whole distribution: non-finite floats are written as ``null``.

JSON has no NaN; ``json.dumps`` would write the non-standard token ``NaN`` that strict readers
(browsers, ``jq``, pandas with ``orient``) reject. Readers that need NaN back use :func:`nan_from_null`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .fsio import atomic_path


def to_builtin(obj: Any) -> Any:
    """Numpy/torch scalars and arrays -> plain Python, recursively; non-finite floats -> ``None``."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_builtin(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__module__.startswith("torch"):
        return to_builtin(obj.detach().cpu().tolist())
    return obj


def nan_from_null(obj: Any) -> Any:
    """Inverse of the NaN policy for numeric records: ``None`` -> ``nan``, recursively."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: nan_from_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_from_null(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text under the NaN policy (raises if anything non-finite slipped through)."""
    return json.dumps(to_builtin(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON, atomically, non-finite floats as ``null``."""
    text = dumps(obj, indent)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """Read a JSON file; a corrupt file raises ``error`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err}); delete it and rerun the step that writes it") from None
