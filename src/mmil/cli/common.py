"""What the ``mmil`` commands share: option groups read back from the flags, threads, devices, groupings."""
from __future__ import annotations

import argparse
from typing import Any

from mmpl.cliargs import positive_int
from mmpl.config import given_flags, layered_config

from ..errors import MMILInputError

THREADS_HELP = "CPU threads for torch (default: torch's choice); small models often run fastest on 1, especially on a busy machine"


def options_from_args(args: argparse.Namespace, cls, prefix: str = ""):
    """``cls`` with the flags of its fields that were given (declared by :func:`mmpl.config.add_config_flags`)."""
    return layered_config(cls, None, given_flags(args, cls, prefix=prefix), error=MMILInputError)


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def device_option(args: argparse.Namespace, flag_given: bool, key: str = "device") -> str:
    """How to name the device in a message: ``--device`` when the flag (or no ``--config``) gave it, else the YAML key."""
    return "--device" if flag_given or not args.config else f"{args.config}: {key}"


def check_device(device: str, option: str = "--device") -> None:
    """Fail at the start, before anything is written, on a device this machine lacks."""
    from ..evaluate import resolve_device

    resolve_device(device, option)


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
