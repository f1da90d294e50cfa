"""Which precision a forward pass runs in: ``--precision auto | fp32 | bf16``.

bf16 autocast pays only where the hardware multiplies bf16 natively: on an AVX2-only CPU
it is *slower* than fp32 (issue 12: 0.74x the fp32 speed at N=10,000), because every
matmul converts its inputs and runs in emulation. ``auto`` (the default) therefore picks
bf16 on a CUDA device that supports it and on a CPU with AMX (``amx_bf16``) or
AVX512-BF16 (``avx512_bf16``), and fp32 everywhere else; the choice is logged once per
device. An explicit ``bf16`` on a CPU without native bf16 is honoured, with one warning.

:func:`choose_precision` is the pure decision (tested with faked capabilities);
:func:`resolve_precision` feeds it this machine's capabilities.
"""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch

from .errors import MMILInputError

#: The ``--precision`` choices (``auto`` last, so "one of fp32, bf16" still reads as before).
PRECISIONS = ("fp32", "bf16", "auto")
#: CPU flags (``/proc/cpuinfo``) that mean native bf16 matrix multiplication.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: ``torch.backends.cpu.get_cpu_capability()`` values with native bf16 matmul.
NATIVE_BF16_CAPABILITIES = ("AVX512_BF16", "AMX")

_said: set[tuple[str, str]] = set()


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The ``flags`` of the first processor in ``cpuinfo`` (empty when unreadable, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | set[str], capability: str = "") -> bool:
    """True when the CPU flags name AMX-BF16 or AVX512-BF16, or torch's CPU capability does."""
    return any(f in flags for f in NATIVE_BF16_CPU_FLAGS) or any(c in capability.upper() for c in NATIVE_BF16_CAPABILITIES)


@functools.lru_cache(maxsize=None)
def this_cpu_has_native_bf16() -> bool:
    """:func:`cpu_has_native_bf16` of this machine's ``/proc/cpuinfo`` and torch's CPU capability."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = ""
    return cpu_has_native_bf16(cpu_flags(), capability)


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the CUDA device supports bf16 (compute capability 8.0 and up)."""
    try:
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    except (RuntimeError, AssertionError):
        return False


def choose_precision(requested: str, device_type: str, *, native_bf16: bool) -> tuple[str, str | None]:
    """The precision to run and a warning (or ``None``).

    ``auto`` -> ``bf16`` when ``native_bf16`` (the device multiplies bf16 natively) else ``fp32``;
    ``fp32`` -> ``fp32``; ``bf16`` -> ``bf16``, with a warning when the device lacks native bf16.
    """
    if requested not in PRECISIONS:
        raise MMILInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return ("bf16" if native_bf16 else "fp32"), None
    if requested == "bf16" and not native_bf16:
        what = "this CPU has neither AMX nor AVX512-BF16" if device_type == "cpu" else f"this {device_type} device lacks bf16 support"
        return "bf16", f"--precision bf16: {what}, so bf16 autocast is emulated and slower than fp32; use --precision auto or fp32"
    return requested, None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively."""
    if device.type == "cuda":
        return cuda_has_bf16(device)
    if device.type == "cpu":
        return this_cpu_has_native_bf16()
    return False


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``requested`` on ``device`` (see :func:`choose_precision`).

    Says once per device which precision ``auto`` chose (one line on stderr), and warns
    once when an explicit ``bf16`` will be emulated.
    """
    device = torch.device(device)
    if requested == "fp32":
        return "fp32"
    chosen, warning = choose_precision(requested, device.type, native_bf16=native_bf16(device))
    key = (requested, str(device))
    if key not in _said:
        _said.add(key)
        if warning is not None:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        elif requested == "auto":
            why = "native bf16 matmul" if chosen == "bf16" else "no native bf16 matmul"
            print(f"mmil: --precision auto -> {chosen} on {device} ({why})", file=sys.stderr, flush=True)
    return chosen
