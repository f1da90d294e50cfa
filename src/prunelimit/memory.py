"""How much memory there is, and how much autograd keeps: the Hessian operator's cache budget."""
from __future__ import annotations

import os
from typing import Iterable

import torch

FALLBACK_BYTES = 4 << 30  # when the platform tells nothing


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: the GPU's free memory, else MemAvailable of /proc/meminfo, else sysconf."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BYTES


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward (the `exclude` tensors not counted).

    Use ``with meter.hooks(): ...`` around the forward and backward passes to be measured.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
