"""Command-line overrides (``key.path=value``) applied to a YAML mapping before it is parsed,
each key checked against the schema so a typo names the closest valid key."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin

import yaml

from peftkit.config.schema import hints, unwrap
from peftkit.errors import ConfigError, did_you_mean


def apply_overrides(
    raw: dict[str, Any],
    overrides: Sequence[str],
    root: type,
    shorthand: Mapping[type, str] | None = None,
    top: str = "the file",
) -> dict[str, Any]:
    """``["training.epochs=1", "adapter=probe"]`` applied to a copy of ``raw``, a mapping
    the dataclass ``root`` will be parsed from.

    Values are YAML scalars (``1`` int, ``1e-3`` float, ``true``, ``null``, ``[a, b]``). A key
    the schema does not have is an error naming the closest valid one. ``shorthand``: the
    classes a plain string may stand for (``{BaseSpec: "source"}``), so ``base.dtype=...``
    on ``base: minilm`` extends it to a mapping. ``top``: what errors call the mapping.
    """
    shorthand = shorthand or {}
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: write key.path=value (e.g. training.epochs=1)")
        keys = tuple(key.strip().split("."))
        _check_override_path(root, keys, item, top)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and value == text.strip() and text.strip() != text:
            value = text.strip()
        node: Any = out
        for i, k in enumerate(keys[:-1]):
            nxt = _child(node, k, item)
            if isinstance(nxt, str) and _shorthand_at(root, shorthand, keys[: i + 1]):
                nxt = {_shorthand_at(root, shorthand, keys[: i + 1]): nxt}
            elif not isinstance(nxt, (dict, list)):
                nxt = {}
            _set_child(node, k, nxt, item)
            node = nxt
        _set_child(node, keys[-1], value, item)
    return out


def _child(node: Any, key: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, item)]
    return node.get(key)


def _set_child(node: Any, key: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, item)] = value
    else:
        node[key] = value


def _index(node: list[Any], key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {item!r}: no item {key!r} in a list of {len(node)}")
    return int(key)


def override_keys(overrides: Sequence[str]) -> dict[tuple[str, ...], str]:
    """Each override's key path -> the override as written (for errors that name it)."""
    return {tuple(o.partition("=")[0].strip().split(".")): o for o in overrides}


def _shorthand_at(root: type, shorthand: Mapping[type, str], keys: tuple[str, ...]) -> str | None:
    cls = _type_at(root, keys)
    return shorthand.get(cls) if isinstance(cls, type) else None


def _type_at(root: type, keys: tuple[str, ...]) -> Any:
    """The schema type at ``keys`` (``dict`` for open mappings); raises for unknown keys."""
    tp: Any = root
    for depth, key in enumerate(keys):
        tp = unwrap(tp)
        if tp is dict or get_origin(tp) is dict:
            return dict
        if get_origin(tp) is tuple and key.isdigit():
            tp = get_args(tp)[0]
            continue
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise KeyError((depth, []))
        keys_here = hints(tp)
        if key not in keys_here:
            raise KeyError((depth, list(keys_here)))
        tp = keys_here[key]
    return unwrap(tp)


def _check_override_path(root: type, keys: tuple[str, ...], item: str, top: str) -> None:
    try:
        _type_at(root, keys)
    except KeyError as exc:
        depth, valid = exc.args[0]
        where = ".".join(keys[:depth]) or top
        if not valid:
            raise ConfigError(
                f"override {item!r}: {where} is a single value and has no key {keys[depth]!r}"
            ) from None
        raise ConfigError(
            f"override {item!r}: {where} has no key {keys[depth]!r}"
            + did_you_mean(keys[depth], valid)
            + f"; valid keys: {', '.join(valid)}"
        ) from None
