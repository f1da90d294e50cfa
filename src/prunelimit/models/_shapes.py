"""Shape checks shared by the conv families."""
from __future__ import annotations

from typing import Sequence

from ..errors import PruneLimitError


def image_shape(in_shape: Sequence[int], model_name: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` or a one-line error for non-image inputs."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PruneLimitError(
            f"model {model_name!r} needs image inputs of shape (channels, height, width), got {shape}; "
            "use an FC model (fc5, fc12, lenet300) for flat inputs"
        )
    return shape  # type: ignore[return-value]
