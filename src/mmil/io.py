"""Atomic file writes: a result or checkpoint is either complete or absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

# One atomic-write primitive for the whole distribution, from the shared foundation.
from mmpl.fsio import atomic_path, check_output_dir, check_output_file, remove_stale_temp_files

__all__ = ["atomic_path", "check_output_dir", "check_output_file", "remove_stale_temp_files", "write_json", "write_text"]


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
