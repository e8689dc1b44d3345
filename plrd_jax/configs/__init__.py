"""Presets as data: every named setup (a family schedule, a Sheared run, a pretraining size, a paper's commands)
is a TOML file in this folder, `<kind>/<name>.toml`, read by one loader.

    load_preset("family", "plrd")      -> dict, as written in family/plrd.toml
    load_config("my_schedule.toml")    -> dict from a user's file in the same format (.toml or .json)
    build(Schedule, data)              -> the dataclass, nested dataclasses and tuples converted by type hints

A file holds the dataclass's fields by name (unknown keys are an error, absent ones take the defaults); TOML has
no null, so a field left out is its default (None where the default is None). `Presets(kind, cls)` is the
read-only mapping name -> built preset that each method exposes as `PRESETS`.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class ConfigFileError(ValueError):
    """A preset or config file that is missing, unreadable, or does not fit its dataclass."""


def preset_names(kind: str) -> list[str]:
    """Names of the presets of `kind` ("family", "sheared", "pretrain", "papers"), sorted."""
    return sorted(p.stem for p in (HERE / kind).glob("*.toml"))


def load_preset(kind: str, name: str) -> dict[str, Any]:
    path = HERE / kind / f"{name}.toml"
    if not path.is_file():
        raise ConfigFileError(f"unknown {kind} preset {name!r}; expected one of {', '.join(preset_names(kind))}")
    return load_config(path)


def load_config(path: str | Path) -> dict[str, Any]:
    """The dict in a TOML (or, by extension, JSON) file; a one-line error naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigFileError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {err}") from None


def build(cls, data: Mapping[str, Any], where: str = ""):
    """An instance of dataclass `cls` from `data`: nested dataclasses from tables, tuples from arrays, ints
    where floats are expected widened; `where` (a dotted path) prefixes error messages."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{where}: expected a table of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigFileError(f"{where}: unknown field(s) {', '.join(unknown)}; {cls.__name__} has "
                              f"{', '.join(fields)}")
    hints = typing.get_type_hints(cls, vars(__import__(cls.__module__, fromlist=["_"])))
    return cls(**{name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _convert(options[0], value, where) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_data(obj) -> dict[str, Any]:
    """The TOML-ready dict of a dataclass instance (None fields left out)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return clean(dataclasses.asdict(obj))


class Presets(Mapping):
    """name -> `build(cls, load_preset(kind, name))`, read from disk on each access."""

    def __init__(self, kind: str, cls):
        self.kind, self.cls = kind, cls

    def __getitem__(self, name: str):
        if name not in self:
            raise KeyError(name)
        return build(self.cls, load_preset(self.kind, name), f"{self.kind}/{name}.toml")

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (HERE / self.kind / f"{name}.toml").is_file()

    def __iter__(self):
        return iter(preset_names(self.kind))

    def __len__(self) -> int:
        return len(preset_names(self.kind))
