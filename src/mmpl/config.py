"""One way to configure a command: a dataclass, optionally a YAML file, and flags derived from the dataclass.

A config field that users may set from the command line is declared with :func:`option`, which
stores its help text (and optionally its flag name, argparse type and choices) in the field's
metadata. :func:`add_config_flags` declares one flag per such field; :func:`given_flags` collects
those the user gave; :func:`build_config` lays them over a YAML file over the defaults, coercing
every value to the field's annotated type, so flags and YAML keys are checked by the same code::

    @dataclass
    class TrainConfig:
        epochs: int = option(200, help="maximum epochs", type=positive_int)

    add_config_flags(parser, TrainConfig)               # --epochs N
    cfg = build_config(TrainConfig, given_flags(args, TrainConfig), yaml_path=args.config)
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from .errors import InputError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, type: Any = None, choices=None,
           metavar: str | None = None, default_factory: Any = _MISSING, cli: bool = True) -> Any:
    """A dataclass field with a command-line flag (``--field-name`` unless ``flag`` is given)."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "metavar": metavar, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a command-line flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") and "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        return "none" if f.default is None else str(f.default)
    return "see above"


def add_config_flags(parser, cls, *, prefix: str = "", exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Declare one flag per :func:`option` field of ``cls`` on ``parser`` (or an argument group).

    Every flag defaults to ``None`` (= not given), so a YAML value is only overridden by a flag the
    user typed. ``defaults`` replaces the default shown in the help text (e.g. a per-command default).
    """
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        if f.name in exclude:
            continue
        meta, shown = f.metadata, (defaults or {}).get(f.name, _default_text(f))
        text = f"{meta['help']} (default: {shown})"
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag_name(f), dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = meta.get("type") or _base_type(hints[f.name])
        parser.add_argument(flag_name(f), dest=prefix + f.name, type=kind, choices=meta.get("choices"), default=None,
                            metavar=meta.get("metavar") or f.name.upper(), help=text)


def given_flags(args: argparse.Namespace, cls, *, prefix: str = "") -> dict[str, Any]:
    """``{field: value}`` for the flags of ``cls`` that were given on the command line."""
    out = {}
    for f in flag_fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def build_config(cls, flags: dict[str, Any] | None = None, *, yaml_path: str | Path | None = None,
                 base: dict[str, Any] | None = None, error: type[Exception] = InputError, source: str = "options"):
    """``cls`` from its defaults, then ``base``, then the YAML file, then ``flags`` (each checked and coerced)."""
    values: dict[str, Any] = dict(base or {})
    where = source
    if yaml_path is not None:
        values.update(read_yaml_mapping(yaml_path, error))
        where = str(yaml_path)
    values.update(flags or {})
    kwargs = typed_kwargs(cls, values, where, error)
    try:
        return cls(**kwargs)
    except error as err:
        raise error(f"{where}: {err}" if where not in str(err) else str(err)) from None


def read_yaml_mapping(path: str | Path, error: type[Exception] = InputError) -> dict[str, Any]:
    """Read a YAML (or JSON) file holding a mapping of options; an empty file is an empty mapping.

    A missing file, invalid YAML, or a top level that is not a mapping raises ``error`` naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "syntax error"
        raise error(f"{path}: not valid YAML ({first}); fix the file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; give a YAML config") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping of options, got {type(data).__name__}")
    return data


def typed_kwargs(cls, data: dict[str, Any], source: str, error: type[Exception] = InputError,
                 skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``data``'s keys against ``cls``'s fields and coerce each value to its field's type."""
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    out = {}
    for key, value in data.items():
        if key not in names:
            raise error(f"{source}: unknown key {key!r}; valid keys: {', '.join(names + list(skip))}")
        out[key] = coerce(value, hints[key], f"{source}: {key}", error)
    return out


def _base_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else str
    return hint


def coerce(value: Any, hint: Any, where: str, error: type[Exception] = InputError) -> Any:
    """Coerce ``value`` to ``hint`` (int, float, bool, str, tuples/lists/dicts, optionals and unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), where, error)
    if origin in (dict,) or hint is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [coerce(v, args[0], where, error) for v in value] if args else list(value)
        return tuple(items) if (origin or hint) is tuple else items
    if hint is bool:
        return _coerce_bool(value, where, error)
    if hint is int:
        return _coerce_int(value, where, error)
    if hint is float:
        if isinstance(value, bool):
            raise error(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise error(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise error(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _coerce_union(value: Any, args: tuple, where: str, error: type[Exception]) -> Any:
    if value is None and type(None) in args:
        return None
    messages = []
    for a in (a for a in args if a is not type(None)):
        try:
            return coerce(value, a, where, error)
        except error as err:
            messages.append(str(err))
    raise error(messages[0] if messages else f"{where}: bad value {value!r}")


def _coerce_bool(value: Any, where: str, error: type[Exception]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    raise error(f"{where}: expected true/false, got {value!r}")


def _coerce_int(value: Any, where: str, error: type[Exception]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error(f"{where}: expected an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise error(f"{where}: expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise error(f"{where}: expected an integer, got {value!r}")
    return int(number)
