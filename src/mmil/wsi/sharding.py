"""Sharding of ``mmil extract`` across processes: ``--shard I/N`` or torchrun's ``RANK``/``WORLD_SIZE``."""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import MMILInputError


def shard_arg(text: str) -> tuple[int, int]:
    """argparse type of ``--shard I/N``."""
    import argparse  # noqa: PLC0415

    try:
        return parse_shard(text)
    except MMILInputError:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise MMILInputError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise MMILInputError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def normalize_shard(value: Any) -> tuple[int, int] | None:
    """A shard from a config: ``None``, ``"I/N"`` or ``[I, N]`` -> ``(I, N)``; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_shard(value)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not (value[1] >= 1 and 0 <= value[0] < value[1]):
        raise MMILInputError(f"shard must be I/N or [I, N] with 0 <= I < N, got {value!r} (--shard)")
    return int(value[0]), int(value[1])


def resolve_shard(shard: tuple[int, int] | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """The explicit shard, else torchrun's ``(RANK, WORLD_SIZE)``, else ``(0, 1)``."""
    if shard is not None:
        return shard
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def shard_items(items: Sequence, index: int, count: int) -> list:
    """Round-robin share ``items[index::count]`` (shares are disjoint and cover ``items``)."""
    return list(items[index::count])
