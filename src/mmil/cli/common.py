"""What the ``mmil`` commands share: option groups read back from the flags, threads, devices, groupings.

The common flags (``--threads``, ``--device``, ``--no-progress``, ``--seed``) come from
:func:`mmpl.cliargs.add_common_flags`; :func:`add_common` is its ``mmil`` form.
"""
from __future__ import annotations

import argparse
from typing import Any

from mmpl.cliargs import add_common_flags
from mmpl.config import given_flags, layered_config, read_yaml_mapping
from mmpl.device import DEVICE_HELP

from ..errors import MMILInputError


def options_from_args(args: argparse.Namespace, cls, prefix: str = ""):
    """``cls`` with the flags of its fields that were given (declared by :func:`mmpl.config.add_config_flags`)."""
    return layered_config(cls, None, given_flags(args, cls, prefix=prefix), error=MMILInputError)


def add_common(parser: argparse.ArgumentParser, *, seed: str | None = None, device: str | None = None,
               progress: str | None = None, dests: dict[str, str] | None = None) -> None:
    """The common flags on an ``mmil`` command: ``seed``/``device``/``progress`` say what the flag drives
    here; a flag given no text is accepted but marked unused (``--threads`` is always applied)."""
    helps = {"seed": seed, "device": f"{device}: {DEVICE_HELP}" if device else None, "no_progress": progress}
    unused = tuple(name for name, text in helps.items() if text is None)
    add_common_flags(parser, dests=dests, helps={k: v for k, v in helps.items() if v}, unused=unused)


def default_device_auto(args: argparse.Namespace, dest: str = "device", keys: tuple[str, ...] = ("device",)) -> None:
    """The command line's device default is ``auto``: set ``args.<dest>`` to it when neither ``--device``
    nor the ``--config`` YAML (at the nested ``keys``) names a device."""
    if getattr(args, dest, None) is not None:
        return
    values: Any = read_yaml_mapping(args.config, MMILInputError, "--config") if getattr(args, "config", None) else {}
    for key in keys[:-1]:
        values = values.get(key) if isinstance(values, dict) else None
    if not (isinstance(values, dict) and values.get(keys[-1]) is not None):
        setattr(args, dest, "auto")


def device_option(args: argparse.Namespace, flag_given: bool, key: str = "device") -> str:
    """How to name the device in a message: ``--device`` when the flag (or no ``--config``) gave it, else the YAML key."""
    return "--device" if flag_given or not args.config else f"{args.config}: {key}"


def check_device(device: str, option: str = "--device") -> str:
    """Fail at the start, before anything is written, on a device this machine lacks; else the
    device's torch name (``auto`` resolved: ``cpu``, ``cuda``, ``cuda:1``)."""
    from ..evaluate import resolve_device

    return str(resolve_device(device, option))


def check_grouping(grouping: str | None) -> None:
    from ..grouping import GROUPINGS

    if grouping is not None and grouping not in GROUPINGS:
        raise MMILInputError(f"--grouping {grouping!r}: unknown grouping; choose one of: {', '.join(GROUPINGS)}")


def model_args(items: list[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` items as model options (VALUE parsed as YAML)."""
    import yaml

    kwargs: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MMILInputError(f"--model-arg {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return kwargs
