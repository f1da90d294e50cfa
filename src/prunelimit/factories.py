"""User factories given as ``--model package.module:factory`` and ``--dataset package.module:factory``.

Whatever goes wrong with one (module missing or failing to import, attribute missing, not
callable, wrong signature, raising, returning the wrong type) becomes one
:class:`PruneLimitError` naming the option, the value and what a factory must look like.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from .errors import PruneLimitError

MODEL_FACTORY_HELP = ("expected 'package.module:factory' with factory(in_shape, num_classes) returning a torch.nn.Module "
                      "(in_shape is one sample's shape, e.g. (3, 32, 32); a factory without parameters is called with none)")
DATASET_FACTORY_HELP = ("expected 'package.module:factory' with factory(data_root=None, seed=0) (both parameters optional) "
                        "that must return a prunelimit.data.DatasetBundle or a (train, test) pair of datasets of (input, label) samples")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_import_path(path: str, option: str = "--model", expected: str = MODEL_FACTORY_HELP) -> Callable:
    """Import ``package.module:attr`` and return the (callable) attribute; one-line errors naming ``option``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PruneLimitError(f"{option} {path!r}: {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PruneLimitError(f"{option} {path!r}: cannot import module {module_name!r} ({first_line(err)}); "
                              f"is it on PYTHONPATH? {expected}") from None
    except Exception as err:  # the module itself is broken: SyntaxError, an exception at import time, ...
        raise PruneLimitError(f"{option} {path!r}: importing module {module_name!r} failed "
                              f"({type(err).__name__}: {first_line(err)}); {expected}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise PruneLimitError(f"{option} {path!r}: module {module_name!r} has no attribute {attr!r}; {expected}")
        target = getattr(target, part)
    if not callable(target):
        raise PruneLimitError(f"{option} {path!r}: {attr!r} is of type {type(target).__name__}, not callable; {expected}")
    return target


def call_factory(factory: Callable, path: str, option: str, expected: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``; a signature that does not fit or any exception becomes one line."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C callables have none: just call
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise PruneLimitError(f"{option} {path!r}: the factory's signature {signature} does not fit "
                                  f"({err}); {expected}") from None
    try:
        return factory(*args, **kwargs)
    except Exception as err:
        raise PruneLimitError(f"{option} {path!r}: the factory raised {type(err).__name__}: {first_line(err)}; "
                              f"{expected}") from None


def accepts_two_positionals(func: Callable) -> bool:
    """Whether ``func`` can take ``(in_shape, num_classes)`` (two positional parameters or ``*args``)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return True
    positional = [p for p in sig.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return has_varargs or len(positional) >= 2


def accepted_kwargs(factory: Callable, **kwargs: Any) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``factory``'s signature names (all of them for ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def user_model(path: str, in_shape: tuple[int, ...], num_classes: int, **kwargs: Any):
    """Build the model of ``--model package.module:factory`` (checked to be a torch.nn.Module)."""
    from torch import nn

    factory = resolve_import_path(path, "--model", MODEL_FACTORY_HELP)
    if accepts_two_positionals(factory):
        model = call_factory(factory, path, "--model", MODEL_FACTORY_HELP, in_shape, num_classes, **kwargs)
    else:
        model = call_factory(factory, path, "--model", MODEL_FACTORY_HELP, **kwargs)
    if not isinstance(model, nn.Module):
        raise PruneLimitError(f"--model {path!r}: the factory returned {type(model).__name__}, not a torch.nn.Module; "
                              f"{MODEL_FACTORY_HELP}")
    return model


def user_dataset(path: str, data_root=None, seed: int = 0):
    """The :class:`~prunelimit.data.DatasetBundle` of ``--dataset package.module:factory``.

    The factory receives ``data_root`` and ``seed`` when its signature names them; a returned
    ``(train, test)`` pair gets its sample shape and class count inferred.
    """
    factory = resolve_import_path(path, "--dataset", DATASET_FACTORY_HELP)
    result = call_factory(factory, path, "--dataset", DATASET_FACTORY_HELP,
                          **accepted_kwargs(factory, data_root=data_root, seed=seed))
    try:
        bundle = _as_bundle(result, path)
    except PruneLimitError:
        raise
    except Exception as err:  # e.g. a "dataset" without len() or with samples that are not (input, label)
        raise PruneLimitError(f"--dataset {path!r}: cannot use what the factory returned "
                              f"({type(err).__name__}: {first_line(err)}); {DATASET_FACTORY_HELP}") from None
    bundle.name = bundle.name or path
    return bundle


def _as_bundle(result: Any, path: str):
    import torch

    from .data import DatasetBundle, infer_num_classes

    if isinstance(result, DatasetBundle):
        bundle = result
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        train, test = result
        if len(train) == 0:
            raise PruneLimitError(f"--dataset {path!r}: the training set is empty")
        x0 = torch.as_tensor(train[0][0])
        bundle = DatasetBundle(train, test, tuple(x0.shape), max(infer_num_classes(train), infer_num_classes(test)), path)
    else:
        raise PruneLimitError(f"--dataset {path!r}: the factory returned {type(result).__name__}; {DATASET_FACTORY_HELP}")
    if len(bundle.train) == 0 or len(bundle.test) == 0:
        raise PruneLimitError(f"--dataset {path!r}: empty train or test set")
    if int(bundle.num_classes) < 2:
        raise PruneLimitError(f"--dataset {path!r}: the data has {bundle.num_classes} class(es); classification needs at least 2")
    return bundle
