"""What several commands share: the registry folder they open, and a count flag's type."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftkit.errors import ConfigError

DEFAULT_REGISTRY = "registry"


def open_registry(args: argparse.Namespace):
    """The registry at ``--registry``; a missing folder is bad input, not an empty registry."""
    from peftkit.registry.store import Registry

    root = Path(args.registry)
    if not root.is_dir():
        raise ConfigError(f"no registry at {root.resolve()}; give --registry DIR")
    return Registry(root)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
