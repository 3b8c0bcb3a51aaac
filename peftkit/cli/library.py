"""``peftkit recipes|presets|prompts list|show``: the built-in YAML libraries."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

_KINDS = {"recipes": "recipes", "presets": "adapters", "prompts": "prompts"}  # CLI word -> library


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for kind, help_text in (
        ("recipes", "the built-in recipes"),
        ("presets", "the built-in adapter presets"),
        ("prompts", "the built-in prompt sets"),
    ):
        p = sub.add_parser(kind, help=help_text)
        ksub = p.add_subparsers(title="actions", metavar="ACTION", required=True)
        k = ksub.add_parser("list", help=f"list {help_text}")
        k.set_defaults(func=cmd_library_list, kind=kind)
        k = ksub.add_parser("show", help="print one file")
        k.add_argument("name")
        k.set_defaults(func=cmd_library_show, kind=kind)


def cmd_library_list(args: argparse.Namespace) -> int:
    from peftkit.config.library import available, library_dir

    folder = library_dir(_KINDS[args.kind])
    for name in available(_KINDS[args.kind]):
        print(f"{name:<28} {_summary(folder / f'{name}.yaml')}")
    return 0


def cmd_library_show(args: argparse.Namespace) -> int:
    """Print the file after checking it is one of its kind: readable UTF-8, valid YAML, and
    a recipe / preset / prompt set that loads (an error names what is wrong, in one line)."""
    from peftkit.config.library import KINDS, find
    from peftkit.config.schema import read_text

    kind = _KINDS[args.kind]
    path = find(kind, args.name)  # a folder or device given is refused there
    text = read_text(path, KINDS[kind])
    _load(kind, path)  # a file that is not a valid recipe / preset / prompt set is refused
    print(text, end="")
    return 0


# each kind's loader ("module:function"), imported only when a file of that kind is shown
_LOADERS = {
    "recipes": "peftkit.config.recipes:load_recipe",
    "adapters": "peftkit.config.presets:load_preset",
    "prompts": "peftkit.prompting.templates:load_prompt_set",
}


def _load(kind: str, path: Path) -> None:
    module, _, name = _LOADERS[kind].partition(":")
    getattr(importlib.import_module(module), name)(path)


def _summary(path: Path) -> str:
    """The first comment line of a YAML file that is not the command that runs it."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith(("peftkit ", "Run:", "run:")):
            return text
        if line and not line.startswith("#"):
            break
    return ""
