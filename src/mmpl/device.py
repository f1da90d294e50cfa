"""One device resolver for every command of both wings."""
from __future__ import annotations

import os
from typing import Mapping

from .errors import InputError

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (auto: this rank's GPU under torchrun, else the first GPU, else Apple mps, else cpu)"


def resolve_device(device, option: str = "--device", env: Mapping[str, str] | None = None, error: type[Exception] = InputError):
    """A ``torch.device`` this machine has, from ``cpu``/``cuda``/``cuda:N``/``mps``/``auto`` (or a device).

    ``auto`` picks ``cuda:LOCAL_RANK`` under torchrun, ``cuda`` when a GPU is present, ``mps`` on an
    Apple GPU, else ``cpu``.
    A CUDA device on a machine without CUDA, an index past the last GPU, or any other text raises
    ``error`` naming ``option``, so commands can check it before they write anything.
    """
    import torch

    env = os.environ if env is None else env
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(env.get('LOCAL_RANK', 0))}") if "LOCAL_RANK" in env else torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise error(f"{option} {device!r}: {err}; use {DEVICE_HELP}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise error(f"{option} {device}: not supported; use {DEVICE_HELP}")
    if dev.type == "mps" and not _mps_available():
        raise error(f"{option} {device}: no Apple GPU (mps) on this machine; use --device cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{option} {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise error(f"{option} {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
