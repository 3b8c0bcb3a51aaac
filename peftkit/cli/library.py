"""``peftkit recipes|presets|prompts list|show``: the built-in YAML libraries."""

from __future__ import annotations

import argparse
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
    from peftkit.config.library import find

    print(find(_KINDS[args.kind], args.name).read_text(encoding="utf-8"), end="")
    return 0


def _summary(path: Path) -> str:
    """The first comment line of a YAML file that is not the command that runs it."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith(("peftkit ", "Run:", "run:")):
            return text
        if line and not line.startswith("#"):
            break
    return ""
