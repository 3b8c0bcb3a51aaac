"""Checking and repairing a registry: what :meth:`Registry.verify`, ``check``, ``doctor``
and ``rebuild_index`` do, and the clean-up of crashed writes when a registry opens.

A check re-hashes each entry's files against the index; the doctor also lists what the
index and the version folders disagree on (a folder with no row, an unfinished write, a
link, a folder without ``peftkit.json``); a rebuild re-indexes a folder from the
``peftkit.json`` it carries once its files match the hashes recorded there. Nothing here
deletes a folder, but the clean-up on open, which removes only folders this registry's
own marker proves it staged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from peftkit.errors import ConfigError, IntegrityError
from peftkit.registry.entries import (
    MAX_VERSION,
    META_FIELDS,
    Entry,
    Problem,
    Report,
    check_metadata,
    encode_row,
)
from peftkit.registry.files import (
    META_FILE,
    OWN_FILES,
    PENDING_FILE,
    compare_hashes,
    unusable_version_folders,
    version_folders,
    walk,
)
from peftkit.registry.index import INSERT_ROW, Index, raise_counter
from peftkit.registry.metadata import read_json, write_meta_file
from peftkit.registry.staging import clear_marker, marked_by, remove_if_orphan_stage, remove_tree


def verify_entry(entry: Entry, adapters: Path) -> Entry:
    """``entry`` when its folder (inside ``adapters``, reached without a link out) holds
    exactly the files the index records; IntegrityError naming each file that differs."""
    path = entry.path
    inside = os.path.realpath(path) == os.path.join(
        os.path.realpath(adapters), entry.name, str(entry.version)
    )
    actual = {rel: p for rel, p in walk(path) if rel not in OWN_FILES}
    problems = compare_hashes(entry.files, actual if path.is_dir() and inside else {})
    if not inside and path.exists():
        problems.insert(0, f"its folder leads out of the registry (to {os.path.realpath(path)})")
    if problems:
        raise IntegrityError(
            f"adapter {entry.ref} at {path} does not match the index: "
            + "; ".join(problems)
            + f". Restore the files, or remove the entry ('peftkit adapters rm {entry.ref}', "
            f"or Registry.remove({entry.ref!r}))"
        )
    return entry


def check_entries(root: Path, entries: Iterable[Entry], adapters: Path) -> Report:
    """The report of :func:`verify_entry` on each of ``entries``."""
    ok, problems = [], []
    for e in entries:
        try:
            verify_entry(e, adapters)
            ok.append(e.ref)
        except IntegrityError as exc:
            kind = "missing-folder" if not e.path.is_dir() else "files-differ"
            problems.append(Problem(kind, e.ref, str(exc)))
    return Report(str(root), ok=tuple(ok), problems=tuple(problems))


def folder_problems(indexed: Iterable[Entry], adapters: Path) -> list[Problem]:
    """What the version folders and the ``indexed`` entries disagree on: folders with no
    row, indexed folders without ``peftkit.json``, links in ``adapters/``."""
    known = {(e.name.lower(), e.version) for e in indexed}
    problems = []
    for name, version, folder in version_folders(adapters):
        if (name.lower(), version) not in known:
            problems.append(unindexed_problem(folder))
        elif not (folder / META_FILE).is_file():
            problems.append(
                Problem(
                    "no-metadata",
                    f"{name}@{version}",
                    f"{folder} has no {META_FILE}; run 'peftkit adapters rebuild' "
                    "(or Registry.rebuild_index()) to write it",
                )
            )
    problems += [unusable_problem(folder) for folder in unusable_version_folders(adapters)]
    problems += [
        Problem("link", str(p), "a symbolic link in adapters/: left alone; remove it by hand")
        for p in (adapters.iterdir() if adapters.is_dir() else ())
        if p.is_symlink()
    ]
    return problems


def reindex_folders(conn: sqlite3.Connection, adapters: Path) -> tuple[list[str], list[Problem]]:
    """Insert a row for each version folder the index lacks (inside the write
    transaction), keeping every name's counter above its folders: the refs added and the
    folders that could not be trusted."""
    indexed = {(n.lower(), v) for n, v in conn.execute("SELECT name, version FROM entries")}
    added, problems = [], []
    for name, version, folder in version_folders(adapters):
        raise_counter(conn, name, version)
        if (name.lower(), version) in indexed:
            continue
        problem = _reindex(conn, name, version, folder)
        if problem is None:
            added.append(f"{name}@{version}")
        else:
            problems.append(problem)
    problems += [unusable_problem(folder) for folder in unusable_version_folders(adapters)]
    return added, problems


def write_missing_meta(entries: Iterable[Entry]) -> None:
    """Write ``peftkit.json`` into each entry's folder that lacks it."""
    for entry in entries:
        if entry.path.is_dir() and not (entry.path / META_FILE).exists():
            with contextlib.suppress(OSError):
                write_meta_file(entry.path, entry)


def _reindex(conn: sqlite3.Connection, name: str, version: int, folder: Path) -> Problem | None:
    """Insert the row of an unindexed version folder from its peftkit.json; the problem
    instead when it cannot be trusted."""
    if folder.is_symlink() or (folder / PENDING_FILE).exists():
        return unindexed_problem(folder)
    where = f"{name}@{version}"
    try:
        saved = read_json(folder / META_FILE)
        meta = check_metadata({k: saved.get(k) for k in META_FIELDS})
        files = saved.get("files")
        if (saved.get("name"), saved.get("version")) != (name, version):
            raise ConfigError(
                f"it names {saved.get('name')}@{saved.get('version')}, not its folder"
            )
        if not isinstance(files, dict) or not files:
            raise ConfigError("it records no file hashes")
    except (ConfigError, OSError) as exc:
        return Problem("unindexed-folder", where, f"{folder}: cannot be re-indexed: {exc}")
    actual = {rel: p for rel, p in walk(folder) if rel not in OWN_FILES}
    differ = compare_hashes(files, actual)
    if differ:
        return Problem("files-differ", where, "; ".join(differ) + "; not indexed, left as it is")
    row = {**meta, "name": name, "version": version, "files": files}
    row.update(created=str(saved.get("created") or ""), run_id=saved.get("run_id"))
    try:
        conn.execute(INSERT_ROW, encode_row(row))
    except sqlite3.IntegrityError as exc:
        return Problem("unindexed-folder", where, f"{folder}: cannot be indexed: {exc}")
    return None


def unusable_problem(folder: Path) -> Problem:
    """The problem of a numbered folder whose number is no version the index can hold."""
    return Problem(
        "unindexed-folder",
        str(folder),
        f"its name is not a version number from 1 to {MAX_VERSION}; not indexed, left as "
        "it is: rename or remove it by hand",
    )


def unindexed_problem(folder: Path) -> Problem:
    """The problem of a version folder the index has no row for."""
    if folder.is_symlink():
        return Problem("link", str(folder), "a symbolic link, not a version folder: left alone")
    if (folder / PENDING_FILE).exists():
        return Problem(
            "unfinished",
            str(folder),
            "a registration or removal that did not finish (or one of another index); "
            "left alone: remove it by hand if no peftkit process is writing",
        )
    return Problem(
        "unindexed-folder",
        str(folder),
        "a version folder the index does not list (a lost or restored index?); kept: "
        "run 'peftkit adapters rebuild' (or Registry.rebuild_index()) to index it from its "
        "peftkit.json",
    )


def clean_orphans(index: Index, adapters: Path, tmp: Path) -> None:
    """Remove what crashed writes of this registry left: dead staging folders and
    version folders carrying its marker with no row (checked again under the write
    lock, so a registration between its rename and its commit is waited for). A
    marked folder that has its row is a removal that did not commit: unmarked."""
    for stage in tmp.glob("stage-*"):
        remove_if_orphan_stage(stage, index.owner)

    def marked() -> list[tuple[str, int, Path]]:
        return [
            (n, v, p)
            for n, v, p in version_folders(adapters)
            if not p.is_symlink() and marked_by(p, index.owner)
        ]

    if not marked():
        return
    try:
        with index.write() as conn:
            indexed = {(n.lower(), v) for n, v in conn.execute("SELECT name, version FROM entries")}
            for name, version, path in marked():
                if (name.lower(), version) in indexed:
                    clear_marker(path)
                else:
                    remove_tree(path, adapters)
    except sqlite3.DatabaseError as exc:
        index.error(exc)  # remembered: reads and writes will say so
