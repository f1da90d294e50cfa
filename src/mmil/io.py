"""Atomic file writes (a result or checkpoint is either complete or absent) and JSON under one NaN policy.

Both come from the shared foundation (:mod:`mmpl.fsio`, :mod:`mmpl.jsonio`): JSON is written
with non-finite floats as ``null``. This module only gathers them under their ``mmil`` name.
"""
from __future__ import annotations

from mmpl.fsio import atomic_path, check_output_dir, check_output_file, remove_stale_temp_files
from mmpl.jsonio import write_json, write_text

__all__ = ["atomic_path", "check_output_dir", "check_output_file", "remove_stale_temp_files", "write_json", "write_text"]
