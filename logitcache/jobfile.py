"""YAML job files and typed dataclass construction from mappings, shared by the capture and train configs.

Errors say which dotted key is wrong, what was found and what was expected.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


def read_job_file(path: str, kind: str) -> dict[str, Any]:
    """The mapping in a YAML job file, minus its ``kind`` marker (which must equal ``kind`` if present)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; "
                          "fix the syntax (indentation, brackets, quotes)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping; found {type(data).__name__}")
    found = data.pop("kind", kind)
    if found != kind:
        raise ConfigError(f"config file {path} has kind {found!r}; `logitcache {kind}` expects kind {kind!r}")
    return data


def from_mapping(cls: type, data: Any, prefix: str = "", *, nested: dict | None = None) -> Any:
    """``cls(**data)`` with every key known and every leaf of the right type, recursing into the
    dataclass fields ``nested`` names (``{(cls, field): field_cls}``); errors name the dotted key."""
    nested = nested or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; found {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            did_you_mean = f"; did you mean {prefix + hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; expected one of {', '.join(sorted(known))}{did_you_mean}"
            )
        sub = nested.get((cls, key))
        if not sub:
            _check_type(known[key].type, value, prefix + key)
        kwargs[key] = from_mapping(sub, value, f"{prefix}{key}.", nested=nested) if sub else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid {prefix or 'config'}: {exc}") from exc


# the annotations config dataclasses use (strings under `from __future__ import annotations`) -> accepted types
_LEAF_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "int | None": (int, type(None)), "str | None": (str, type(None)), "float | None": (int, float, type(None))}


def _check_type(annotation: Any, value: Any, name: str) -> None:
    """Refuse a value of the wrong type (a YAML ``"512"`` for an int, ``"false"`` for a bool) by name."""
    allowed = _LEAF_TYPES.get(annotation) if isinstance(annotation, str) else None
    if allowed is None:
        return
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ConfigError(f"{name} must be {annotation.replace(' | None', ' or null')}; found "
                          f"{type(value).__name__} {value!r}. Fix it in the config (in YAML a quoted value is a string).")


__all__ = ["from_mapping", "read_job_file"]
