"""Typed YAML: a mapping checked against frozen dataclasses, with errors that say where.

``parse(Recipe, data, (), ctx)`` builds the dataclass, checking every key and type on the
way; a wrong one is a :class:`ConfigError` naming the file, the line (``read_yaml`` keeps
the line of every key path) or the command-line override, the key path and the closest
valid key. Field metadata: ``choices`` (allowed values), ``internal`` (not a YAML key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Ctx:
    """Where a value came from, for errors: the file, the line of every key path, the
    overrides given on the command line, and the classes a plain string may stand for
    (``{cls: field}``: ``base: minilm`` is ``base: {source: minilm}``)."""

    source: str
    lines: dict[tuple[str, ...], int]
    overridden: dict[tuple[str, ...], str]
    shorthand: Mapping[type, str] = field(default_factory=dict)

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        where = self.source
        # an override replaces everything under its key: the file's lines there are stale
        prefixes = [path[:n] for n in range(len(path), -1, -1)]
        override = next((p for p in prefixes if p in self.overridden), None)
        line = next((p for p in prefixes if p in self.lines), None)
        if override is not None:
            where += f" (override {self.overridden[override]!r})"
        elif line is not None:
            where += f", line {self.lines[line]}"
        dotted = ".".join(path)
        # a message that starts with the key path already says where
        key = f" {dotted}:" if path and not message.startswith(dotted + " ") else ""
        return ConfigError(f"{where}:{key} {message}")


def hints(cls: type) -> dict[str, Any]:
    """The YAML keys of a dataclass and their types (``internal`` fields left out)."""
    resolved = typing.get_type_hints(cls)
    return {
        f.name: resolved[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")
    }


def unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def type_name(tp: Any) -> str:
    tp = unwrap(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def parse(tp: Any, value: Any, path: tuple[str, ...], ctx: Ctx) -> Any:
    optional = unwrap(tp) is not tp or tp is type(None)
    if value is None:
        if optional or tp is Any:
            return None
        raise ctx.error(path, f"must be {type_name(tp)}, not null")
    tp = unwrap(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        assert isinstance(tp, type)
        return parse_dataclass(tp, value, path, ctx)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ctx.error(path, f"must be {type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(parse(item, v, (*path, str(i)), ctx) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ctx.error(path, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML reads 1e-3 (no dot) as a string
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(path, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ctx.error(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.error(path, f"must be a string, got {value!r}")
        return value
    raise ctx.error(path, f"unsupported schema type {tp}")  # pragma: no cover


def parse_dataclass(cls: type, value: Any, path: tuple[str, ...], ctx: Ctx) -> Any:
    if isinstance(value, str) and cls in ctx.shorthand:
        value = {ctx.shorthand[cls]: value}
    if not isinstance(value, dict):
        raise ctx.error(path, f"must be a mapping, got {value!r}")
    keys = hints(cls)
    for key in value:
        if key not in keys:
            raise ctx.error(
                (*path, str(key)),
                f"unknown key{did_you_mean(str(key), keys)}; valid keys here: {', '.join(keys)}",
            )
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in keys.items():
        f = fields[name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in value:
            if required:
                raise ctx.error((*path, name), f"missing required key ({type_name(tp)})")
            continue
        parsed = parse(tp, value[name], (*path, name), ctx)
        choices = f.metadata.get("choices")
        if choices is not None and parsed not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ctx.error(
                (*path, name),
                f"{parsed!r} is not one of {shown}"
                + did_you_mean(str(parsed), [c for c in choices if c]),
            )
        kwargs[name] = parsed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # ConfigError too: a check in __post_init__
        raise ctx.error(_blamed(path, value, str(exc)), str(exc)) from None


def _blamed(path: tuple[str, ...], value: dict, message: str) -> tuple[str, ...]:
    """The key a dataclass's own check complains about (the first key of ``value`` that its
    message names, as in ``training.epochs must be > 0``): the error then points at that
    key's line or override, not at the mapping's first line."""
    found = []
    for key in value:
        hit = re.search(rf"(?:^|\W){re.escape(str(key))}(?!\w)", message)
        if hit:
            found.append((hit.start(), str(key)))
    return (*path, min(found)[1]) if found else path


def yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """``<source>, line N: invalid YAML: <problem>``: one form for every YAML file read."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}, line {mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(f"{where}: invalid YAML: {problem}")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter in two ways that matter for configuration files:

    - a key given twice in one mapping is an error naming both lines (PyYAML keeps the last
      one silently, so ``epochs: 1`` further down would quietly win);
    - aliases (``*name``) are refused: a configuration never needs them, and a kilobyte of
      nested aliases expands to gigabytes (the "billion laughs" document).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in peftkit's YAML files; "
                "write the value out where it is used",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class gives its own error
                continue
            if line != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {line}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed by :class:`StrictLoader`; a bad document is a one-line ConfigError."""
    return read_yaml(text, source)[0]


def read_text(path: Any, what: str = "file") -> str:
    """A UTF-8 file's text; unreadable or not UTF-8 is a one-line ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the {what} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def read_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The YAML document and the line of every key path in it (``("training", "epochs")``),
    read by :class:`StrictLoader` (no duplicate keys, no aliases)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    walk_lines(node, (), lines)
    return data, lines


def walk_lines(node: Any, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            out[sub] = key.start_mark.line + 1
            walk_lines(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            sub = (*path, str(i))
            out[sub] = value.start_mark.line + 1
            walk_lines(value, sub, out)
