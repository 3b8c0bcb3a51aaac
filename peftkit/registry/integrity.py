"""The registry checked as a whole: :meth:`Registry.verify` (one entry's files re-hashed),
:meth:`Registry.check` (one entry or all, reported), :meth:`Registry.doctor` (also what the
index, the folders and the journal disagree on) and :meth:`Registry.rebuild_index` (rows
restored from the folders and the journal); plus :func:`refuse_other_folder`, which keeps a
registry from being made inside a folder of other things.

The four are :class:`~peftkit.registry.store.Registry` methods defined here and bound in its
class body (``doctor = integrity.doctor``), so ``self`` is the registry; the per-entry and
per-folder work is ``check``, the journal's part ``journal``.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.errors import RegistryError
from peftkit.registry.check import (
    check_entries,
    folder_problems,
    reindex_folders,
    verify_entry,
    write_missing_meta,
)
from peftkit.registry.entries import Entry, Problem, Report
from peftkit.registry.journal import JOURNAL_FILE

if TYPE_CHECKING:
    from peftkit.registry.store import Registry

# what a registry folder consists of: a folder holding anything else is not one
_OWN_NAMES = frozenset({"adapters", "tmp", JOURNAL_FILE})
_OWN_PREFIX = "index.sqlite"  # the index, its -wal / -shm and damaged copies moved aside


def refuse_other_folder(root: Path) -> None:
    """RegistryError when ``root`` has no index yet but holds files a registry does not
    consist of: a registry is never made inside a folder of other things (a missing or
    empty folder becomes a new registry)."""
    if os.path.lexists(root / _OWN_PREFIX) or not root.is_dir():
        return
    try:
        other = sorted(
            p.name
            for p in root.iterdir()
            if p.name not in _OWN_NAMES and not p.name.startswith(_OWN_PREFIX)
        )
    except OSError as exc:
        raise RegistryError(f"cannot open the adapter registry at {root}: {exc}") from None
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise RegistryError(
            f"{root} is not a peftkit registry (it has no index.sqlite) and holds other "
            f"files ({shown}); give an empty or new folder for a registry"
        )


def verify(self: Registry, ref: str | Entry) -> Entry:
    """Re-hash every file of the entry; IntegrityError names each file that differs
    from the index (changed: both hashes; missing; or not in the index)."""
    return verify_entry(self.get(ref), self._adapters)


def check(self: Registry, ref: str | Entry | None = None) -> Report:
    """Re-hash one entry's files (``ref``) or every entry's; problems are reported,
    nothing is changed."""
    damaged = self._db.damage_problem()
    if damaged is not None:
        return Report(str(self.root), problems=(damaged,))
    entries = [self.get(ref)] if ref is not None else self.list()
    return check_entries(self.root, entries, self._adapters)


def doctor(self: Registry) -> Report:
    """:meth:`check` of every entry, plus what the index and the folders disagree on
    (version folders with no row, unfinished registrations, links, missing metadata)
    and the journal's skipped lines and disagreements with the index; writes nothing."""
    report, intact = self.check(), self._db.damage is None
    found = self._journal.check(self._db.conn() if intact else None, self._adapters)
    folders = folder_problems(self.list(), self._adapters) if intact else []
    try:
        self._db.refuse_hard_link()
    except RegistryError as exc:
        folders.append(Problem("link", str(self._db.path), str(exc)))
    problems = (*report.problems, *folders, *found.problems)
    return dataclasses.replace(report, problems=problems, warnings=tuple(found.warnings))


def rebuild_index(self: Registry) -> Report:
    """Re-create the rows missing from the index from the version folders'
    ``peftkit.json`` (each folder's files checked against the hashes it records), and
    write ``peftkit.json`` where an indexed folder lacks it; then restore the aliases,
    promotion decisions and later metrics that ``journal.jsonl`` records (see
    :mod:`peftkit.registry.journal`; the report lists them). A damaged index is first
    moved aside (``index.sqlite.damaged-<time>``, never deleted) and a fresh one made.
    Folders whose files do not match, or that have no metadata, are reported and left
    as they are. Version counters are kept above every version found."""
    self._db.refuse_read_only()
    self._journal.refuse_link()  # before anything is moved
    aside = self._db.move_damaged_aside()
    try:
        with self._db.write() as conn:
            added, problems = reindex_folders(conn, self._adapters)
            replayed = self._journal.replay(conn, self._adapters)
    except sqlite3.DatabaseError as exc:
        raise self._db.error(exc) from None
    write_missing_meta(self.list())
    return Report(
        str(self.root),
        problems=(*problems, *replayed.problems),
        added=tuple(added),
        moved_aside=None if aside is None else str(aside),
        restored=tuple(replayed.restored),
        warnings=tuple(replayed.warnings),
    )
