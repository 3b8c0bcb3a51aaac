"""Where peftkit finds its YAML libraries and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def library_dir(kind: str) -> Path:
    """The built-in folder of ``kind`` (``"adapters"``, ``"prompts"`` or ``"recipes"``).

    In a source checkout the folders sit at the repository root; in an installed wheel
    they ship as ``peftkit/library/<kind>/``.
    """
    if kind not in ("adapters", "prompts", "recipes"):
        raise ValueError(f"unknown library kind {kind!r}")
    installed = _PKG / "library" / kind
    if installed.is_dir():
        return installed
    return _PKG.parent / kind


def cache_dir() -> Path:
    """peftkit's user cache (``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``)."""
    env = os.environ.get("PEFTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "peftkit"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
