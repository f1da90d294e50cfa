"""Config fields declared once: their flag, help, range and type drive the parser and the checks.

Every option of an ``mmil`` command is a field of a config dataclass declared with
:func:`mmpl.config.option`. A numeric field takes a :class:`Range` as its ``type``, which is

* the argparse ``type`` of its flag (:func:`mmpl.config.add_config_flags`): a value out of
  range stops the command at parse time, with one line naming the flag;
* the check of the merged config (:func:`check_fields`, called by each config's own checks):
  the same range for a value from a ``--config`` YAML file, with a message naming the file,
  the key and the flag.

:func:`layered_config` builds a config from its defaults, then the YAML file, then the flags
given (nested configs such as ``train:`` from nested mappings), coercing every value to its
field's annotated type with :func:`mmpl.config.coerce`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmpl.cliargs import ranged
from mmpl.config import coerce, flag_name, read_yaml_mapping as _read_yaml_mapping

from .errors import MMILInputError


@dataclass(frozen=True)
class Range:
    """A numeric type with bounds (``low``/``high`` inclusive unless ``*_open``): an argparse ``type``
    (see :func:`mmpl.cliargs.ranged`) whose bounds the config checks can read back."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text: str) -> int | float:
        return ranged(self.kind, self.low, self.high, low_open=self.low_open, high_open=self.high_open)(text)

    def describe(self) -> str:
        """``">= 1"``, ``"> 0"``, ``"in [0, 1)"``."""
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if lo and hi:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return lo or hi or "a finite number"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


POSITIVE_INT = Range(int, 1)
NON_NEGATIVE_INT = Range(int, 0)
POSITIVE_FLOAT = Range(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = Range(float, 0)
FRACTION = Range(float, 0, 1)  # [0, 1]
OPEN_FRACTION = Range(float, 0, 1, high_open=True)  # [0, 1)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A ``--config`` YAML (or JSON) file holding a mapping of options (:func:`mmpl.config.read_yaml_mapping`)."""
    return _read_yaml_mapping(path, MMILInputError)


def _flag_hint(f: dataclasses.Field) -> str:
    """`` (--flag)`` for a field with a command-line flag, else nothing."""
    return f" ({flag_name(f)})" if f.metadata.get("cli") and "help" in f.metadata else ""


def _coerced(f: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    try:
        return coerce(value, hint, where, MMILInputError)
    except MMILInputError as err:
        raise MMILInputError(f"{err}{_flag_hint(f)}") from None


def check_fields(obj: Any, prefix: str = "") -> None:
    """Coerce every field of the dataclass ``obj`` to its annotated type, in place, and check the
    range of those whose ``type`` is a :class:`Range`; a bad value raises :class:`MMILInputError`
    naming the key (after ``prefix``, e.g. ``"tissue."``) and its flag. Nested configs are skipped."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        key = prefix + f.name
        value = _coerced(f, hints[f.name], getattr(obj, f.name), key)
        kind = f.metadata.get("type")
        if isinstance(kind, Range) and value is not None and not kind.contains(value):
            raise MMILInputError(f"{key} must be {kind.describe()}, got {value!r}{_flag_hint(f)}")
        setattr(obj, f.name, value)


def load_config(cls, values: Mapping[str, Any], source: str = ""):
    """``cls`` from a mapping of options: unknown keys are refused, a nested config field is read
    from a nested mapping, and every value is coerced to its field's type. Messages start with
    ``source`` (the YAML file) and name the key and its flag."""
    where = f"{source}: " if source else ""
    if not isinstance(values, Mapping):
        raise MMILInputError(f"{where}the top level must be a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        keys = ", ".join(map(repr, unknown))
        raise MMILInputError(f"{where}unknown key{'s' if len(unknown) > 1 else ''} {keys}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if value is not None and not isinstance(value, Mapping):
                raise MMILInputError(f"{where}`{name}` must be a mapping of options, got {type(value).__name__}")
            kwargs[name] = load_config(hints[name], value or {}, f"{source} ({name})" if source else "")
        else:
            kwargs[name] = _coerced(fields[name], hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except MMILInputError as err:
        raise MMILInputError(f"{where}{err}" if source and not str(err).startswith(source) else str(err)) from None


class ConfigFile:
    """``to_dict``, ``from_dict`` and ``from_yaml`` of a config dataclass (read by :func:`load_config`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # nested configs become nested mappings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config"):
        return load_config(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path):
        """Read a YAML (or JSON) config; unknown keys and bad values raise :class:`MMILInputError` naming the file."""
        return cls.from_dict(read_yaml_mapping(path), str(path))


def layered_config(cls, yaml_path: str | Path | None, flags: Mapping[str, Any], nested: Mapping[str, Mapping[str, Any]] | None = None):
    """``cls`` from its defaults, then the YAML file ``yaml_path`` (if any; read and checked on its
    own first, so a bad file is refused even where a flag would override the bad key), then the
    ``flags`` given; ``nested`` holds the flags of nested mappings (``{"train": {...}}``)."""
    base = load_config(cls, read_yaml_mapping(yaml_path), str(yaml_path)) if yaml_path else cls()
    values = dataclasses.asdict(base)
    values.update(flags)
    for name, given in (nested or {}).items():
        values[name] = {**values[name], **given}
    return load_config(cls, values)


# ----------------------------------------------------------------------------- comparing settings
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
