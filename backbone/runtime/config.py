"""YAML config files -> frozen dataclasses, with strict keys and ``--set a.b=c`` overrides.

Each tool declares its own schema as (nested) frozen dataclasses and calls :func:`load_config`;
this module knows nothing about any particular tool. Nested dataclass fields are config sections.
Supported leaf types: bool, int, float, str, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``Literal[...]`` and ``dict[str, X]``. Lists from YAML become tuples so configs stay hashable.

Errors are :class:`UserError` with one line naming the source (file or ``--set``) and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


def load_config(path: str | Path | None, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (or start from the schema defaults when None), apply overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: {problem}{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    origins: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        set_by_dotted_key(raw, key, value, schema, source=f"--set {item}")
        origins[key] = f"--set {item}"
    return config_from_dict(schema, raw, source=source, origins=origins)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is typed by ``yaml.safe_load``."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.1")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML (e.g. "a: b: c"): keep the literal string, the schema decides
    return key, value


def set_by_dotted_key(raw: dict[str, Any], key: str, value: Any, schema: type, source: str) -> None:
    """Set ``raw[a][b] = value`` for key ``a.b``, checking every part against the schema."""
    parts = key.split(".")
    node, node_schema = raw, schema
    for depth, part in enumerate(parts):
        field_types = _field_types(node_schema)
        if part not in field_types:
            section = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"{source}: unknown key {'.'.join(parts[: depth + 1])!r}{_did_you_mean(part, field_types)} "
                f"(known in {section}: {', '.join(sorted(field_types))})"
            )
        if depth == len(parts) - 1:
            node[part] = value
            return
        child_type = field_types[part]
        if not _is_dataclass_type(child_type):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])!r} is not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_schema = child, child_type


def config_from_dict(
    schema: type[T], raw: Mapping[str, Any], source: str = "<dict>", origins: Mapping[str, str] | None = None
) -> T:
    """Build and validate ``schema`` from a plain (e.g. YAML-loaded) mapping."""
    return _build(schema, raw, prefix="", source=source, origins=origins or {})


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples -> lists) for YAML dumps and checkpoints."""
    return _to_plain(dataclasses.asdict(config))


def dump_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, in schema field order (atomically: a resumed run rewrites it,
    and a kill then must not leave half of it)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (for resume warnings)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += config_diff(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


# --- internals ----------------------------------------------------------------------------------


def _field_types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(schema: type[T], raw: Any, prefix: str, source: str, origins: Mapping[str, str]) -> T:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origins.get(where, source)}: {where} must be a mapping, got {raw!r}")
    field_types = _field_types(schema)
    for key in raw:
        if key not in field_types:
            raise ConfigError(
                f"{source}: unknown key {prefix + str(key)!r}{_did_you_mean(str(key), field_types)} "
                f"(known in {where}: {', '.join(sorted(field_types))})"
            )
    values: dict[str, Any] = {}
    for field in dataclasses.fields(schema):
        dotted = prefix + field.name
        tp = field_types[field.name]
        if field.name in raw:
            if _is_dataclass_type(tp):
                values[field.name] = _build(tp, raw[field.name] or {}, dotted + ".", source, origins)
            else:
                values[field.name] = _convert(raw[field.name], tp, dotted, origins.get(dotted, source))
        elif _is_dataclass_type(tp) and field.default is dataclasses.MISSING:
            # A missing section is built from its own defaults (default_factory or not).
            values[field.name] = _build(tp, {}, dotted + ".", source, origins)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {dotted!r}")
    return schema(**values)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp``; coerce only where YAML is known to be ambiguous."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} expects {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                pass
        fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value in args:
            return value
        fail("one of " + ", ".join(repr(a) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a class name "1" written without quotes
        fail("a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)} items")
        return tuple(
            _convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            fail("a mapping")
        key_type, value_type = args
        return {
            _convert(k, key_type, f"{key}.{k}", source): _convert(v, value_type, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if _is_dataclass_type(tp):
        return _build(tp, value, key + ".", source, {})
    raise TypeError(f"config schema type {tp!r} of {key!r} is not supported")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def add_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line arguments every training tool shares: config, overrides, run directory, resume."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: all defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/<config stem>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT has a checkpoint")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in total, with a resumable checkpoint (smoke tests)",
    )
    return parser
