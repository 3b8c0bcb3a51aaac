"""Where peftkit keeps its caches, and writing a file so that readers never see it half-written."""

from __future__ import annotations

import os
from pathlib import Path


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
