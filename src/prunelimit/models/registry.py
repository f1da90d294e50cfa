"""Model registry for the pruning zoo: ``name -> builder(in_shape, num_classes)``.

Zoo builders register themselves with :func:`register_model`; any other model is
reached by an import path ``package.module:factory`` (the factory is called with
``(in_shape, num_classes)`` when it accepts two arguments, with nothing otherwise; see
:mod:`prunelimit.factories` for the checks and messages).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from ..errors import PruneLimitError
from ..factories import resolve_import_path, user_model  # noqa: F401  (resolve_import_path re-exported)


@dataclass(frozen=True)
class ModelSpec:
    """A registered builder and the per-network defaults the paper used.

    ``default_lam`` is the paper's l1 strength on CIFAR-length schedules;
    ``uses_conv`` sets the default of the null-mass correction p0 (the paper
    applies it to the conv nets and sets p0 = 0 for the FC nets).
    """

    name: str
    builder: Callable[..., nn.Module]
    family: str
    uses_conv: bool
    default_lam: float
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, family: str, uses_conv: bool, default_lam: float, description: str = ""):
    """Decorator registering ``builder(in_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, family, uses_conv, default_lam, description or (builder.__doc__ or "").strip().splitlines()[0])
        return builder

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered zoo names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_spec(name: str) -> ModelSpec | None:
    """The registry entry for a zoo name; ``None`` for an import path."""
    return _REGISTRY.get(name)


def is_import_path(name: str) -> bool:
    """``package.module:attr`` names a user object rather than a registry entry."""
    return ":" in name


def create_model(name: str, in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (or a user model ``package.module:factory``) for the data's shape.

    ``in_shape`` is one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
    Unknown names raise :class:`PruneLimitError` listing the zoo.
    """
    in_shape = tuple(int(s) for s in in_shape)
    num_classes = int(num_classes)
    if num_classes < 2:
        raise PruneLimitError(f"model {name!r}: num_classes must be >= 2, got {num_classes}")
    if is_import_path(name):
        return user_model(name, in_shape, num_classes, **kwargs)
    spec = _REGISTRY.get(name)
    if spec is None:
        raise PruneLimitError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}, or give 'package.module:factory'"
        )
    try:
        return spec.builder(in_shape, num_classes, **kwargs)
    except TypeError as err:
        raise PruneLimitError(f"model {name!r}: {err}") from None
