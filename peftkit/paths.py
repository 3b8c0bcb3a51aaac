"""Where peftkit keeps its caches, and writing a file so that readers never see it half-written."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def cache_dir() -> Path:
    """peftkit's user cache (``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``)."""
    env = os.environ.get("PEFTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "peftkit"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    The temporary file gets a fresh random name, created ``O_EXCL | O_NOFOLLOW``: whatever
    already has that name (a file, a planted link) is left alone and another name is drawn,
    so the write never goes through, nor removes, anything peftkit did not create. On
    failure the temporary file is removed while its name still holds this call's own file
    (the inode created here: a file moved in over it meanwhile stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{_token()}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # 0o666: the umask decides, as open() does
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    made = os.fstat(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            there = os.lstat(tmp)
            if (there.st_dev, there.st_ino) == (made.st_dev, made.st_ino):
                os.unlink(tmp)  # the file this call created, still under its name
        raise


def _token() -> str:
    return secrets.token_hex(6)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
