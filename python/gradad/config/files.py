"""Configs as plain data and files: dicts, YAML files (atomic dump) and command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from ..io_utils import atomic_write_text
from .sections import SECTIONS, Config

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML, or a string from the command line) as the type ``annotation``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        annotation = next(a for a in args if a is not type(None))
    expected = getattr(annotation, "__name__", str(annotation))
    bad = TypeError(f"{key} must be {expected}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML reads '1e-3' (no dot) as a string
            except ValueError:
                raise bad from None
        raise bad
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(annotation) in (list, List):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",")]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TypeError(f"{key} must be a list of strings (YAML list or comma-separated), got {value!r}")
    raise TypeError(f"{key}: unsupported field type {annotation!r}")


def _section_from_dict(name: str, cls: type, values: Any, base: Any = None) -> Any:
    if not isinstance(values, Mapping):
        raise TypeError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise KeyError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                       f"valid keys of {name!r}: {', '.join(types)}")
    converted = {k: _convert(v, types[k], f"{name}.{k}") for k, v in values.items()}
    return dataclasses.replace(base, **converted) if base is not None else cls(**converted)


def config_from_dict(values: Mapping[str, Any], base: Optional[Config] = None) -> Config:
    """A :class:`Config` from a nested mapping (as read from YAML); keys that are missing keep
    the value of ``base`` (the defaults when None). Unknown keys raise KeyError."""
    if not isinstance(values, Mapping):
        raise TypeError(f"a config must be a mapping of sections, got {type(values).__name__}")
    base = Config() if base is None else base
    unknown = sorted(set(values) - set(SECTIONS) - {"output_dir"})
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; valid keys: {[*SECTIONS, 'output_dir']}")
    sections = {name: _section_from_dict(name, cls, values[name], getattr(base, name))
                for name, cls in SECTIONS.items() if name in values}
    if "output_dir" in values:
        sections["output_dir"] = _convert(values["output_dir"], str, "output_dir")
    return dataclasses.replace(base, **sections)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """The nested plain-data form of ``cfg`` (what :func:`dump_config` writes)."""
    return dataclasses.asdict(cfg)


# ---- files --------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, base: Optional[Config] = None) -> Config:
    """Reads a YAML config file; missing keys keep the values of ``base`` (defaults when None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    values = {} if values is None else values
    try:
        return config_from_dict(values, base)
    except (KeyError, TypeError, ValueError) as exc:
        raise type(exc)(f"in config file {path}: {exc.args[0] if exc.args else exc}") from None


def config_to_yaml(cfg: Config) -> str:
    """``cfg`` as the YAML text :func:`dump_config` writes (sections in their order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes ``cfg`` as YAML to ``path`` atomically (a temp file in the same folder, then
    os.replace), creating the folder if needed."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(path, config_to_yaml(cfg))


# ---- command-line overrides ---------------------------------------------------------------

def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``overrides`` applied in order, each ``'section.key=value'`` (or
    ``'output_dir=value'``); values are converted to the field's type ('none' for an optional
    field's None, 'true'/'false' for booleans, 'a,b' or '[a, b]' for lists)."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'section.key=value' strings, not one string")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must have the form 'section.key=value'")
        dotted, value = item.split("=", 1)
        dotted = dotted.strip()
        if dotted == "output_dir":
            cfg = config_from_dict({"output_dir": value}, cfg)
            continue
        if dotted.count(".") != 1:
            raise KeyError(f"override {item!r}: key must be 'section.key' with a section among "
                           f"{list(SECTIONS)} (or 'output_dir'), got {dotted!r}")
        section, key = dotted.split(".")
        if section not in SECTIONS:
            raise KeyError(f"override {item!r}: unknown section {section!r}; sections: {list(SECTIONS)}")
        cfg = config_from_dict({section: {key: value}}, cfg)
    return cfg
