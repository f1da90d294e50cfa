"""Output locations that are checked before any computing, and writes that never half-happen.

Rules every command that writes follows:

- check the output location first (:func:`check_output_file`, :func:`check_output_dir`): the parent
  exists or can be made, it is writable, and a directory is not where a file is expected;
- write atomically (:func:`atomic_path`): a temporary file beside the target is renamed onto it, so a
  reader or a resumed run never sees half a file;
- a symlink is written *through* (its target is replaced, never the link), and a character device or
  FIFO (``/dev/stdout``, ``/dev/null``, a named pipe) is written into directly, never replaced.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_SUFFIX = ".tmp"


class OutputPathError(ValueError):
    """An output location that cannot be used; the message names it and the fix."""


def _stream_target(path: Path) -> bool:
    """True for an existing character device or FIFO (written into, never renamed onto)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def resolve_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` must change: a symlink chain is followed to its end."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``'s target; rename it onto the target on success.

    On an exception the temporary file is removed and the target is left as it was. A symlink is
    followed (the link itself stays a link); a character device or FIFO gets the bytes written
    straight into it once the caller has finished writing the temporary file.
    """
    target = resolve_target(path)
    if _stream_target(path):
        yield from _stream_into(Path(path))
        return
    if target.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _stream_into(device: Path) -> Iterator[Path]:
    """Collect the output in a private temporary file, then copy it into the device or FIFO."""
    fd, tmp = tempfile.mkstemp(suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as src, open(device, "wb") as dst:
            dst.write(src.read())
    finally:
        tmp_path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and not path.is_symlink():
        path = path.parent
    return path


def _probe_writable(directory: Path) -> bool:
    """Whether a file can really be created in ``directory`` (os.access lies for root and read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _check_creatable(path: Path, option: str) -> None:
    """The nearest existing ancestor of a missing ``path`` is a writable directory."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is not a directory; choose another location")
    if not _probe_writable(ancestor):
        raise OutputPathError(f"{option} {path}: cannot create files in {ancestor} (not writable); choose another location")


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that a result file can be written at ``path`` before any computing starts.

    Accepts a new file whose parent exists or can be made, an existing regular file (replaced
    atomically), a symlink to either (written through), or a character device / FIFO (written into).
    Returns ``path`` as a :class:`Path`; raises :class:`OutputPathError` naming ``option``.
    """
    path = Path(path)
    if _stream_target(path):
        return path
    target = resolve_target(path)
    if target.is_dir():
        raise OutputPathError(f"{option} {path} is a directory; give a file path (e.g. {path / 'out'}...)")
    if target.exists() and not target.is_file():
        raise OutputPathError(f"{option} {path} is not a regular file; give a file path")
    if target.exists():
        if not _probe_writable(target.parent) or not os.access(target, os.W_OK):
            raise OutputPathError(f"{option} {path}: cannot replace it ({target.parent} is not writable); choose another location")
        return path
    _check_creatable(target, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that ``path`` is (or can be made) a writable directory, before any computing starts."""
    path = Path(path)
    target = resolve_target(path)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{option} {path} exists and is not a directory; give a directory path")
    if target.is_dir():
        if not _probe_writable(target):
            raise OutputPathError(f"{option} {path}: cannot create files in it (not writable); choose another location")
        return path
    _check_creatable(target, option)
    return path


def remove_stale_temp_files(directory: str | os.PathLike) -> int:
    """Delete ``.NAME.*.tmp`` files that a killed writer left in ``directory`` (recursively); return how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    count = 0
    for tmp in directory.rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()
            count += 1
    return count
