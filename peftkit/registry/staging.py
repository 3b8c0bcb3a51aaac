"""Staging folders: how the registry writes a folder so that a crash never leaves a
half-written one it cannot prove it wrote.

A registration copies the files into a staging folder under ``tmp/`` that it locks
(``flock``) for as long as it lives and that carries a marker (:data:`PENDING_FILE`, naming
the registry's id and the process) until the registration commits; the staged folder is
then renamed into place. Only a folder carrying this registry's marker may be removed by a
clean-up (``remove_if_orphan_stage``, and the registry's check of version folders on open);
anything else unknown is reported, and ``remove_tree`` never follows a link out of the
folder it was given. ``register_folder`` is a registration from staging to commit; an
export is staged beside its destination the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Container, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit.errors import IntegrityError, RegistryError
from peftkit.registry.entries import Entry, encode_row, entry_from_row, version_number
from peftkit.registry.files import (
    META_FILE,
    PEFT_FILES,
    PENDING_FILE,
    compare_hashes,
    copy_files,
    fill_stage,
    fsync_dir,
    fsync_tree,
    source_files,
)
from peftkit.registry.index import INSERT_ROW, Index, allocate_version
from peftkit.registry.metadata import check_files_agree, write_meta_file

try:
    import fcntl
except ImportError:  # Windows: staging folders are then cleaned by age only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STALE_STAGE_S = 3600.0  # a staging folder this old is dead even if its pid was reused


def write_marker(folder: Path, owner: str) -> None:
    """Mark ``folder`` as staged by the registry ``owner`` (its id) in this process."""
    payload = {"registry": owner, "pid": os.getpid(), "time": time.time()}
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(folder / PENDING_FILE, flags, 0o644), "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def marked_by(folder: Path, owner: str) -> bool:
    """Whether ``folder`` carries the pending marker of the registry ``owner``."""
    path = folder / PENDING_FILE
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("registry") == owner


def clear_marker(folder: Path) -> None:
    """Take the pending marker out (the folder becomes an ordinary version folder)."""
    (folder / PENDING_FILE).unlink()
    fsync_dir(folder)


def is_inside(path: Path, within: Path) -> bool:
    """Whether ``path`` is a real folder strictly inside ``within``, reached without a
    link that leads out of it."""
    real, root = os.path.realpath(path), os.path.realpath(within)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(within))
    return (
        os.path.isdir(path)
        and not os.path.islink(path)
        and real == os.path.join(root, rel)
        and not rel.startswith(os.pardir)
        and rel != os.curdir
    )


def remove_tree(path: Path, within: Path) -> None:
    """``shutil.rmtree(path)``, only when ``path`` is a real folder inside ``within``
    (no link on the way out of it); otherwise RegistryError, and nothing is removed."""
    if not os.path.lexists(path):
        return
    if not is_inside(path, within):
        real = os.path.realpath(path)
        raise RegistryError(
            f"refusing to remove {path}: it resolves to {real}, which is not a folder inside "
            f"{os.path.realpath(within)} (a symbolic link on the way?); remove it by hand if "
            "it is yours"
        )
    shutil.rmtree(path, ignore_errors=True)


def new_stage(tmp: Path, owner: str) -> tuple[Path, int | None]:
    """A new staging folder under ``tmp``, marked as ``owner``'s, and the fd of its lock
    (held while we live)."""
    stage = new_dir(tmp, f"stage-{os.getpid()}-")
    write_marker(stage, owner)
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


def move_into_place(stage: Path, final: Path) -> None:
    os.rename(stage, final)
    fsync_dir(final.parent)


def remove_if_orphan_stage(stage: Path, owner: str) -> None:
    """Remove a staging folder whose registration died: it carries ``owner``'s marker, its
    lock is free and its process is gone, or it is older than an hour (the only test where
    flock is missing). A folder without the marker is left alone."""
    match = re.match(r"stage-(\d+)-", stage.name)
    if os.path.islink(stage) or not marked_by(stage, owner):
        return
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


def export_entry(entry: Entry, dest: Path, recheck: Callable[[], Entry]) -> Path:
    """Write ``entry`` into ``dest`` (a new or empty folder) as a folder plain peft loads:
    its files and its peftkit.json, staged beside ``dest`` and renamed into place once
    complete. ``recheck`` re-verifies the entry (before, and if a file changed on the
    way); RegistryError for an entry without peft's files, a ``dest`` that holds
    something, or one that cannot be written."""
    missing = [f for f in PEFT_FILES if f not in entry.files]
    if missing:
        raise RegistryError(
            f"adapter {entry.ref} cannot be exported as a peft folder: it has no "
            f"{' or '.join(missing)} (its files: {', '.join(sorted(entry.files))})"
        )
    dest = dest.expanduser().absolute()
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise RegistryError(
            f"cannot export {entry.ref} to {dest}: it exists and is not an "
            f"empty folder; give a new or empty folder"
        )
    recheck()
    try:
        _export_files(entry, dest, recheck)
    except OSError as exc:
        raise RegistryError(
            f"cannot export {entry.ref} to {dest}: {exc.strerror or exc}; give a folder "
            "you can write to"
        ) from None
    return dest


def _export_files(entry: Entry, dest: Path, recheck: Callable[[], Entry]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = new_dir(dest.parent, f".{dest.name}.export-")
    try:
        copied = copy_files(((r, entry.path / r) for r in entry.files), stage)
        if copied != entry.files:  # changed since the check a moment ago
            recheck()
        write_meta_file(stage, entry)
        fsync_tree(stage)
        if dest.exists():
            dest.rmdir()
        os.rename(stage, dest)
    except BaseException:
        remove_tree(stage, dest.parent)
        raise


# -- a removal: marked in its transaction, deleted after the commit -------------------------


def remove_entries(index: Index, adapters: Path, chosen: Callable[[], list[Entry]]) -> list[Entry]:
    """Remove the entries ``chosen()`` gives (called inside the write transaction): each
    folder is marked before its row goes, so a crash after the commit leaves only folders
    the next open may remove, and deleted after the commit. Returns the entries."""
    marked: list[Path] = []
    try:
        with index.write() as conn:
            gone = chosen()
            for e in gone:
                if is_inside(e.path, adapters):  # only a folder proven to be ours is marked
                    marked.append(e.path)
                    write_marker(e.path, index.owner)
                elif e.path.exists():
                    log.warning("%s leads out of %s: left alone", e.path, adapters)
            conn.executemany(
                "DELETE FROM entries WHERE name = ? AND version = ?",
                [(e.name, e.version) for e in gone],
            )
    except BaseException:
        for path in marked:  # not removed after all
            with contextlib.suppress(OSError):
                clear_marker(path)
        raise
    for path in marked:
        remove_tree(path, adapters)
    return gone


# -- a registration: stage, check, publish -------------------------------------------------


def register_folder(
    index: Index,
    root: Path,
    name: str,
    folder: Path,
    meta: dict[str, Any],
    *,
    exclude: Container[str] = (),
    expected: Mapping[str, str] | None = None,
    run_id: str | None = None,
    imported: bool = False,
) -> Entry:
    """Stage ``folder``'s adapter files under ``root/tmp``, check them (against
    ``expected`` hashes, and ``task.json`` and the head's shape against ``meta``), and
    publish them as ``name``'s next version under ``root/adapters``."""
    index.refuse_read_only()
    index.refuse_if_damaged()
    sources, left_out = source_files(folder, exclude)
    if left_out:
        log.warning("%s: left out %s (not part of an adapter folder)", folder, ", ".join(left_out))
    tmp = root / "tmp"
    stage, lock = new_stage(tmp, index.owner)
    try:
        files = fill_stage(stage, sources)
        if expected is not None:
            problems = compare_hashes(expected, files)
            if problems:
                raise IntegrityError(
                    f"cannot import {folder}: its files do not match its "
                    f"{META_FILE}: " + "; ".join(problems)
                )
        if imported or "task.json" in files:
            check_files_agree(stage, meta, f"adapter folder {folder}")
        row = {**meta, "name": name, "files": files, "run_id": run_id}
        try:
            return _publish(index, root / "adapters", stage, row)
        except sqlite3.DatabaseError as exc:
            raise index.error(exc) from None
    finally:
        if lock is not None:
            os.close(lock)
        if stage.exists():  # gone already once published
            remove_tree(stage, tmp)


def _publish(index: Index, adapters: Path, stage: Path, row: dict[str, Any]) -> Entry:
    """In one write transaction: allocate the version, write peftkit.json, rename the
    staged folder into place, insert the row and take the marker out."""
    moved: Path | None = None
    row["created"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    try:
        with index.write() as conn:
            name = row["name"]
            row["version"] = allocate_version(conn, name, _highest_folder(adapters, name))
            final = adapters / name / str(row["version"])
            entry = entry_from_row(encode_row(row), adapters)
            write_meta_file(stage, entry)
            final.parent.mkdir(parents=True, exist_ok=True)
            moved = final
            move_into_place(stage, final)
            conn.execute(INSERT_ROW, encode_row(row))
            # Out before the commit: a crash after it never leaves a committed entry
            # marked (a crash in between leaves an unmarked folder: reported, kept).
            clear_marker(final)
    except BaseException:
        if moved is not None and moved.exists():
            remove_tree(moved, adapters)  # staged by this call, never committed
        raise
    return entry


def _highest_folder(adapters: Path, name: str) -> int:
    """The highest version folder of ``name`` on disk (any case), indexed or not: new
    versions go above it, so a folder the index lost is never overwritten."""
    lower = name.lower()
    folders = (p for p in adapters.iterdir() if p.name.lower() == lower)
    numbers = (v.name for p in folders if p.is_dir() for v in p.iterdir())
    return max((v for v in map(version_number, numbers) if v is not None), default=0)
