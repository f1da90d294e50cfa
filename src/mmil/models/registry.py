"""Model registry: ``name -> builder`` (the habit of timm's ``_registry``).

Every family module decorates its builders with :func:`register_model`; the CLI's
``--model`` choices, ``mmil bench`` and the tests that walk every model all read
:func:`list_models`.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(in_dim, n_classes, **kwargs)`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """Build the model registered as ``name``.

    Raises ``ValueError`` naming the known models for an unknown name, and
    ``TypeError`` naming the bad keyword for an option the model does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as err:
        raise TypeError(f"model {name!r}: {err}") from None
