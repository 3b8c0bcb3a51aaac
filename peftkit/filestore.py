"""Files of the registry: staged, hashed, fsynced copies and their checks.

A registration copies an adapter folder into a staging folder that it locks (``flock``) for
as long as it lives, hashing and fsyncing every file; the staged folder is then renamed into
place. A staging folder whose lock is free and whose process is gone belongs to a dead
registration and is removed (``remove_if_orphan_stage``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: staging folders are then cleaned by age only
    fcntl = None  # type: ignore[assignment]

STALE_STAGE_S = 3600.0  # a staging folder this old is dead even if its pid was reused
CHUNK = 1 << 20


def walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file under ``folder``, sorted."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for fname in sorted(filenames + links):  # linked folders: listed, not followed
            path = Path(dirpath, fname)
            yield path.relative_to(folder).as_posix(), path


def source_files(folder: Path, exclude: Container[str]) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise ConfigError(f"adapter folder {folder} does not exist or is not a folder")
    files = [(rel, p) for rel, p in walk(folder) if rel not in exclude]
    odd = [rel for rel, p in files if not p.is_file()]
    if odd:
        raise ConfigError(
            f"adapter folder {folder} holds entries that are not regular files: {', '.join(odd)}"
        )
    if not files:
        raise ConfigError(
            f"adapter folder {folder} is empty; give the folder save_pretrained wrote"
        )
    return files


def new_stage(tmp: Path) -> tuple[Path, int | None]:
    """A new staging folder under ``tmp`` and the fd of its lock (held while we live)."""
    stage = new_dir(tmp, f"stage-{os.getpid()}-")
    if fcntl is None:
        return stage, None
    lock = os.open(stage, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else holds it
    return stage, lock


def new_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder (with the umask's mode, unlike tempfile.mkdtemp's 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


def fill_stage(stage: Path, sources: Iterable[tuple[str, Path]]) -> dict[str, str]:
    """Copy ``sources`` into ``stage``, fsynced; returns {relpath: sha256}."""
    files = copy_files(sources, stage)
    fsync_tree(stage)
    return files


def copy_files(sources: Iterable[tuple[str, Path]], dst: Path) -> dict[str, str]:
    """Copy each (relpath, source) to ``dst / relpath``; returns {relpath: sha256}."""
    hashes = {}
    for rel, source in sources:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        hashes[rel] = copy_hashed(source, dst / rel)
    return hashes


def copy_hashed(src: Path, dst: Path) -> str:
    digest, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while n := fin.readinto(buf):
            digest.update(view[:n])
            fout.write(view[:n])
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(fh, "sha256").hexdigest()
        digest = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        return digest.hexdigest()


def compare_hashes(expected: Mapping[str, str], actual: Mapping[str, Any]) -> list[str]:
    """Problems between recorded hashes and ``actual`` (relpath -> path, or -> sha256)."""
    problems = []
    for rel, want in expected.items():
        if rel not in actual:
            problems.append(f"file {rel!r} is missing (expected sha256 {want})")
            continue
        value = actual[rel]
        try:
            got = value if isinstance(value, str) else sha256(value)
        except OSError as exc:
            problems.append(f"file {rel!r} cannot be read ({exc.strerror})")
            continue
        if got != want:
            problems.append(f"file {rel!r} has sha256 {got}, expected {want}")
    problems += [f"file {rel!r} is not in the index" for rel in actual if rel not in expected]
    return problems


def move_into_place(stage: Path, final: Path) -> None:
    os.rename(stage, final)
    fsync_dir(final.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_orphan_stage(stage: Path) -> None:
    """Remove a staging folder whose registration died: its lock is free and its process
    is gone, or it is older than an hour (the only test where flock is missing)."""
    match = re.match(r"stage-(\d+)-", stage.name)
    try:
        age = time.time() - stage.stat().st_mtime
        fd = os.open(stage, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        return
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a live registration holds it
        dead = fd is not None and match is not None and not pid_alive(int(match.group(1)))
        if dead or age > STALE_STAGE_S:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
