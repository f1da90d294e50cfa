"""One range table per config of ``mmil tile``, ``extract`` and ``heatmap``.

The same :class:`Spec` gives the argparse ``type`` of a command-line option (checked
once at parse time) and checks the merged config (``--config`` YAML with the flags
on top), so a value out of range is refused the same way wherever it came from,
with one line naming the key and its option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mmpl.cliargs import ranged

from ..errors import MMILInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text", dict: "a mapping"}


@dataclass(frozen=True)
class Spec:
    """Type and range of one config value (``low``/``high`` inclusive unless ``*_open``)."""

    kind: type
    option: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is allowed

    def arg_type(self) -> Callable[[str], Any]:
        """The argparse ``type`` of the option (numbers only)."""
        return ranged(self.kind, self.low, self.high, low_open=self.low_open, high_open=self.high_open)

    def describe(self) -> str:
        text = _KIND_NAMES[self.kind]
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if lo and hi:
            left, right = ("(" if self.low_open else "["), (")" if self.high_open else "]")
            return f"{text} in {left}{self.low:g}, {self.high:g}{right}"
        return " ".join(t for t in (text, lo or hi) if t)

    def check(self, value: Any, key: str) -> Any:
        """``value`` converted to ``kind``; raises :class:`MMILInputError` naming ``key`` and the option."""
        if value is None and self.optional:
            return None
        converted = _convert(value, self.kind)
        if converted is None or (self.kind in (int, float) and not self._in_range(converted)):
            hint = f" ({self.option})" if self.option else ""
            raise MMILInputError(f"{key} must be {self.describe()}, got {value!r}{hint}")
        return converted

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or None when it is not one (YAML gives ints for floats, never the reverse)."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is dict:
        return dict(value) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value) if math.isfinite(value) else None


def check_fields(obj: Any, specs: Mapping[str, Spec], prefix: str = "") -> None:
    """Check (and convert in place) every field of ``obj`` named in ``specs``."""
    for name, spec in specs.items():
        setattr(obj, name, spec.check(getattr(obj, name), prefix + name))


def check_device(device: str, option: str = "--device") -> "torch.device":
    """``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has; anything else is refused naming ``option``."""
    import torch  # noqa: PLC0415

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MMILInputError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise MMILInputError(f"{option} {device}: not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MMILInputError(f"{option} {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MMILInputError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


# ----------------------------------------------------------------------------- the tables
TISSUE_SPECS = {
    "seg_downsample": Spec(float, "--seg-downsample", 1),
    "max_seg_pixels": Spec(int, "", 1),
    "use_otsu": Spec(bool, "--no-otsu"),
    "sthresh": Spec(int, "--sthresh", 0, 255),
    "median_size": Spec(int, "--median-size", 1),
    "close_size": Spec(int, "--close-size", 0),
    "min_tissue_area": Spec(float, "--min-tissue-area", 0),
    "min_hole_area": Spec(float, "--min-hole-area", 0),
    "max_holes": Spec(int, "--max-holes", 0),
    "ref_patch_um": Spec(float, "", 0, low_open=True),
}

TILING_SPECS = {
    "target_magnification": Spec(float, "--target-mag", 0, low_open=True),
    "patch_size": Spec(int, "--patch-size", 8),
    "overlap": Spec(float, "--overlap", 0, 1, high_open=True),
    "min_tissue_fraction": Spec(float, "--min-tissue-fraction", 0, 1),
    "base_magnification": Spec(float, "--base-magnification", 0, low_open=True, optional=True),
    "thumbnail_size": Spec(int, "--thumbnail-size", 16),
    "overwrite": Spec(bool, "--overwrite"),
}

EXTRACT_SPECS = {
    "backbone": Spec(str, "--backbone"),
    "weights": Spec(str, "--weights", optional=True),
    "random_weights": Spec(bool, "--random-weights"),
    "seed": Spec(int, "--seed", 0),
    # -1 = the backbone's default, 0 or None = the coordinate file's target patch size
    "input_size": Spec(int, "--input-size", -1, optional=True),
    "batch_size": Spec(int, "--batch-size", 1),
    "workers": Spec(int, "--workers", 0),
    "device": Spec(str, "--device"),
    "precision": Spec(str, "--precision"),
    "overwrite": Spec(bool, "--overwrite"),
}

HEATMAP_SPECS = {
    "seed": Spec(int, "--seed", 0),
    "repeats": Spec(int, "--repeats", 1),
    "cmap": Spec(str, "--cmap"),
    "alpha": Spec(float, "--alpha", 0, 1),
    "normalize": Spec(str, "--normalize"),
    "thumbnail_size": Spec(int, "--thumbnail-size", 16),
    "patch_size_level0": Spec(int, "--patch-size-level0", 1, optional=True),
    "device": Spec(str, "--device"),
    "dpi": Spec(int, "", 10, 1200),
    "model_kwargs": Spec(dict, ""),
}
