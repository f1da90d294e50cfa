"""One way to configure a command: a dataclass, optionally a YAML file, and flags derived from the dataclass.

A config field that users may set from the command line is declared with :func:`option`, which
stores its help text (and optionally its flag name, argparse type, choices, ``nargs``) in the
field's metadata. :func:`add_config_flags` declares one flag per such field; :func:`given_flags`
collects those the user gave; :func:`layered_config` lays them over a YAML file over the defaults
(nested configs from nested mappings), coercing every value to the field's annotated type with
the one strict :func:`coerce`, so flags and YAML keys are checked by the same code. A numeric
field whose ``type`` is a :class:`mmpl.cliargs.Range` is range-checked at parse time and again by
:func:`check_fields` (for YAML values and Python callers)::

    @dataclass
    class TrainConfig(ConfigFile):
        epochs: int = option(200, help="maximum epochs", type=positive_int)

        def __post_init__(self):
            check_fields(self, error=MyError)

    add_config_flags(parser, TrainConfig)               # --epochs N
    cfg = layered_config(TrainConfig, args.config, given_flags(args, TrainConfig), error=MyError)

Every function takes the error class to raise (default :class:`mmpl.errors.InputError`), so each
wing keeps its own type.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .cliargs import Range
from .errors import InputError

_MISSING = dataclasses.MISSING


# ============================================================================ fields and flags
def option(default: Any = _MISSING, *, help: str, flag: str | None = None, type: Any = None, choices=None,
           metavar: str | tuple[str, ...] | None = None, nargs: int | str | None = None, required: bool = False,
           default_factory: Any = _MISSING, cli: bool = True) -> Any:
    """A dataclass field with a command-line flag (``--field-name`` unless ``flag`` is given).

    ``type`` is the argparse type (of each item when ``nargs`` is given: a list or tuple field);
    ``required`` makes the flag mandatory on the command line; ``cli=False`` keeps it YAML-only.
    """
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "metavar": metavar, "nargs": nargs,
            "required": required, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a command-line flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") and "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return "required"
    default = f.default_factory() if f.default_factory is not _MISSING else f.default
    if default is _MISSING:
        return "see above"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def _item_type(hint: Any) -> Any:
    """The argparse type of a flag of a field annotated ``hint``: the items' for a list or tuple."""
    base = _base_type(hint)
    if typing.get_origin(base) in (list, tuple):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        return _base_type(args[0]) if args else str
    return base


def add_config_flags(parser, cls, *, prefix: str = "", exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Declare one flag per :func:`option` field of ``cls`` on ``parser`` (or an argument group).

    Every flag defaults to ``None`` (= not given), so a YAML value is only overridden by a flag the
    user typed. ``defaults`` replaces the default shown in the help text (e.g. a per-command default).
    A field with choices has no metavar unless it declares one, so ``--help`` lists the choices.
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
        metavar = meta.get("metavar") or (None if meta.get("choices") is not None else f.name.upper())
        extra = {"nargs": meta["nargs"]} if meta.get("nargs") is not None else {}
        parser.add_argument(flag_name(f), dest=prefix + f.name, type=meta.get("type") or _item_type(hints[f.name]),
                            choices=meta.get("choices"), default=None, required=bool(meta.get("required")),
                            metavar=metavar, help=text, **extra)


def given_flags(args: argparse.Namespace, cls, *, prefix: str = "") -> dict[str, Any]:
    """``{field: value}`` for the flags of ``cls`` that were given on the command line."""
    out = {}
    for f in flag_fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


# ============================================================================ YAML
def read_yaml_mapping(path: str | Path, error: type[Exception] = InputError, option: str = "") -> dict[str, Any]:
    """Read a YAML (or JSON) file holding a mapping of options; an empty file is an empty mapping.

    A missing file, a directory, a file that is not UTF-8 text, invalid YAML (with the line and
    column of the problem) or a top level that is not a mapping raise ``error`` naming the file,
    after ``option`` (e.g. ``"--config"``) when given.
    """
    import yaml

    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise error(f"{where}: is a directory; give a YAML config file")
    if not path.is_file():
        raise error(f"{where}: config file not found")
    try:
        data = yaml.safe_load(path.read_bytes())  # bytes: YAML detects UTF-8/UTF-16 from the BOM
    except OSError as err:
        raise error(f"{where}: cannot read it ({err.strerror or err}); check its permissions") from None
    except yaml.reader.ReaderError as err:
        raise error(f"{where}: not a UTF-8 text file ({err.reason} at position {err.position}); give a YAML config") from None
    except yaml.YAMLError as err:
        raise error(f"{where}: not valid YAML ({_yaml_problem(err)}); fix the file{_yaml_position(err)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise error(f"{where}: the top level must be a mapping of options, got {type(data).__name__}")
    return data


def _yaml_problem(err: Exception) -> str:
    problem = getattr(err, "problem", None) or (str(err).splitlines()[0] if str(err) else "")
    return problem or "syntax error"


def _yaml_position(err: Exception) -> str:
    """`` at line L, column C`` of a YAML syntax error (1-based), or nothing when PyYAML gives no mark."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


# ============================================================================ coercion
def _base_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else str
    return hint


def coerce(value: Any, hint: Any, where: str, error: type[Exception] = InputError) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, lists/tuples/dicts of them, optionals, unions).

    Strict: an int is a Python int or a string of digits (not ``5.0`` nor ``"5.0"``); a bool is a
    bool or the text true/false (not ``"yes"``, not 1); a float is an int, a float or a numeric
    string (YAML 1.1 reads ``2e-4`` as text); NaN and infinity are refused. ``error`` names ``where``.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), where, error)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [coerce(v, args[0], where, error) for v in value] if args else list(value)
        return tuple(items) if (origin or hint) is tuple else items
    kind = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}.get(hint)
    return kind(value, where, error) if kind else value


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
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise error(f"{where}: expected true or false, got {value!r}")


_INTEGER_TEXT = re.compile(r"[+-]?\d+")


def _coerce_int(value: Any, where: str, error: type[Exception]) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise error(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str, error: type[Exception]) -> float:
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise error(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise error(f"{where}: expected a finite number, got {value!r}")
    return number


def _coerce_str(value: Any, where: str, error: type[Exception]) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise error(f"{where}: expected text, got {value!r}")
    return str(value)


# ============================================================================ config dataclasses
def _flag_hint(f: dataclasses.Field) -> str:
    """`` (--flag)`` for a field with a command-line flag, else nothing."""
    return f" ({flag_name(f)})" if f.metadata.get("cli") and "help" in f.metadata else ""


def _coerced(f: dataclasses.Field, hint: Any, value: Any, where: str, error: type[Exception]) -> Any:
    try:
        return coerce(value, hint, where, error)
    except error as err:
        raise type(err)(f"{err}{_flag_hint(f)}") from None


def check_fields(obj: Any, prefix: str = "", error: type[Exception] = InputError) -> None:
    """Coerce every field of the dataclass ``obj`` to its annotated type, in place, and check the
    range of those whose ``type`` is a :class:`~mmpl.cliargs.Range`; a bad value raises ``error``
    naming the key (after ``prefix``, e.g. ``"tissue."``) and its flag. Nested configs are skipped."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        key = prefix + f.name
        value = _coerced(f, hints[f.name], getattr(obj, f.name), key, error)
        kind = f.metadata.get("type")
        if isinstance(kind, Range) and value is not None:
            bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if not kind.contains(v)]
            if bad:
                raise error(f"{key} must be {kind.describe()}, got {bad[0]!r}{_flag_hint(f)}")
        setattr(obj, f.name, value)


def load_config(cls, values: Mapping[str, Any], source: str = "", error: type[Exception] = InputError):
    """``cls`` from a mapping of options: unknown keys are refused, a nested config field is read
    from a nested mapping, and every value is coerced to its field's type. Messages start with
    ``source`` (the YAML file) and name the key and its flag."""
    where = f"{source}: " if source else ""
    if not isinstance(values, Mapping):
        raise error(f"{where}the top level must be a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        keys = ", ".join(map(repr, unknown))
        raise error(f"{where}unknown key{'s' if len(unknown) > 1 else ''} {keys}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if value is not None and not isinstance(value, Mapping):
                raise error(f"{where}`{name}` must be a mapping of options, got {type(value).__name__}")
            kwargs[name] = load_config(hints[name], value or {}, f"{source} ({name})" if source else "", error)
        else:
            kwargs[name] = _coerced(fields[name], hints[name], value, f"{where}{name}", error)
    try:
        return cls(**kwargs)
    except error as err:
        raise type(err)(f"{where}{err}" if source and not str(err).startswith(source) else str(err)) from None


class ConfigFile:
    """``to_dict``, ``from_dict`` and ``from_yaml`` of a config dataclass (read by :func:`load_config`);
    errors are ``config_error`` (set it in a subclass to the wing's own type)."""

    config_error: ClassVar[type[Exception]] = InputError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # nested configs become nested mappings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config"):
        return load_config(cls, data, source, cls.config_error)

    @classmethod
    def from_yaml(cls, path: str | Path):
        """Read a YAML (or JSON) config; unknown keys and bad values raise ``config_error`` naming the file."""
        return cls.from_dict(read_yaml_mapping(path, cls.config_error), str(path))


def layered_config(cls, yaml_path: str | Path | None, flags: Mapping[str, Any],
                   nested: Mapping[str, Mapping[str, Any]] | None = None, error: type[Exception] = InputError):
    """``cls`` from its defaults, then the YAML file ``yaml_path`` (if any; read and checked on its
    own first, so a bad file is refused even where a flag would override the bad key), then the
    ``flags`` given; ``nested`` holds the flags of nested mappings (``{"train": {...}}``)."""
    base = load_config(cls, read_yaml_mapping(yaml_path, error), str(yaml_path), error) if yaml_path else cls()
    values = dataclasses.asdict(base)
    values.update(flags)
    for name, given in (nested or {}).items():
        values[name] = {**values[name], **given}
    return load_config(cls, values, "", error)


# ============================================================================ comparing settings
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": value}`` (empty mappings vanish; values JSON-normalised)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def differences(stored: Mapping[str, Any], given: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: stored -> given`` for every key whose values differ (what a refused rerun names)."""
    a, b = flatten(stored, prefix), flatten(given, prefix)
    unset = "(unset)"

    def show(v: Any) -> str:
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:16] + "..."  # hashes: the start tells them apart

    return [f"{k}: {show(a.get(k, unset))} -> {show(b.get(k, unset))}" for k in sorted(set(a) | set(b)) if a.get(k, unset) != b.get(k, unset)]
