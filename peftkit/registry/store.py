"""The adapter registry: an SQLite index plus one folder of files per adapter version.

Layout under ``root``::

    index.sqlite               one row per adapter version (stdlib sqlite3, WAL)
    adapters/<name>/<version>/ the files as registered, plus peftkit.json: the entry's
                               metadata and the sha256 of each file (so a lost index can
                               be rebuilt from the folders: rebuild_index())
    tmp/                       staging folders of registrations in progress

A registration copies the adapter files into a staging folder in ``tmp/`` that carries a
marker naming this registry (hashing and fsyncing every file), then in one
``BEGIN IMMEDIATE`` transaction allocates the version, writes ``peftkit.json``, renames the
staged folder into ``adapters/``, inserts the row and takes the marker out. A removal marks
the folder in its transaction and deletes it after the commit. So a crash leaves only
folders that carry this registry's marker; the next ``Registry(root)`` removes those (and
only those). Anything else unknown (a folder without a row, a row without a folder, files
that differ) is reported by :meth:`Registry.doctor`, never deleted. Versions are never
reused, even after a removal.

``peftkit.json`` is written by the registry and is not in an entry's ``files`` (it holds
their hashes, so it cannot hash itself); checks ignore it, as they ignore the marker.

Example::

    reg = Registry(cache_dir() / "registry")
    e = reg.register("sst2", "runs/sst2/adapter", method="lora", labels=("neg", "pos"),
                     base_fingerprint=fp.id, base=fp.to_dict())
    e.ref                                                # 'sst2@1'
    reg.load_path("sst2", expected_fingerprint=fp.id).path   # verified folder for peft
    reg.export("sst2@1", "out/sst2")    # PeftModel.from_pretrained(base, "out/sst2")
    Registry("/mnt/snapshot/registry", read_only=True).list()   # a read-only copy
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from peftkit.errors import (
    ConfigError,
    FingerprintMismatch,
    IntegrityError,
    RegistryError,
    did_you_mean,
)
from peftkit.registry.entries import (
    COLUMNS,
    JSON_COLUMNS,
    META_FIELDS,
    Entry,
    Problem,
    Report,
    check_json_mapping,
    check_metadata,
    check_name,
    check_run_id,
    describe_base,
    encode_row,
    parse_ref,
    ref_str,
)
from peftkit.registry.files import (
    META_FILE,
    OWN_FILES,
    PENDING_FILE,
    check_files_agree,
    clear_marker,
    compare_hashes,
    export_files,
    fill_stage,
    is_inside,
    marked_by,
    move_into_place,
    new_stage,
    read_json,
    refuse_links,
    remove_if_orphan_stage,
    remove_tree,
    source_files,
    version_folders,
    walk,
    write_marker,
    write_meta_file,
)

__all__ = ["Entry", "Problem", "Registry", "Report"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 2
_BUSY_TIMEOUT_S = 30.0
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_SCHEMA = (
    # One counter per name (case-insensitive, as many file systems are): versions are
    # allocated from it, so a removed version number is never handed out again.
    "CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY COLLATE NOCASE,"
    " last_version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (name TEXT NOT NULL, version INTEGER NOT NULL,"
    " method TEXT NOT NULL, task TEXT NOT NULL, labels TEXT NOT NULL,"
    " base_fingerprint TEXT NOT NULL, base TEXT NOT NULL, quantization TEXT, template TEXT,"
    " verbalizer TEXT, metrics TEXT NOT NULL, files TEXT NOT NULL, tags TEXT NOT NULL,"
    " created TEXT NOT NULL, run_id TEXT, PRIMARY KEY (name, version))",
)
# v2: the run id of each entry, and a meta table: this registry's id (what its staging
# markers name) and the generation, bumped by every committed write.
_V2 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_run_id ON entries (run_id)",
)
_DAMAGE_WORDS = ("malformed", "not a database", "corrupt", "disk image")
_T = TypeVar("_T")


def _index_errors(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn SQLite's errors inside ``method`` into a RegistryError that says what to do
    (a damaged index is checked with quick_check and named as such)."""

    @functools.wraps(method)
    def guarded(self: Registry, *args: Any, **kwargs: Any) -> _T:
        self._refuse_if_damaged()
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise self._index_error(exc) from None

    return guarded


class Registry:
    """Adapters by name and version; safe from several threads and processes at once.

    A registry whose folder or index cannot be written (a mounted snapshot, another user's
    folder), or one opened with ``read_only=True``, reads as usual and refuses writes.

    >>> reg = Registry(tmp / "registry")                       # doctest: +SKIP
    >>> reg.register("sst2", folder, method="lora", labels=["neg", "pos"],
    ...              base_fingerprint="9f2c...").ref            # doctest: +SKIP
    'sst2@1'
    >>> [e.ref for e in reg.list()], reg.get("sst2@1").labels   # doctest: +SKIP
    """

    def __init__(self, root: str | Path, *, read_only: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        self._index = self.root / "index.sqlite"
        self._local = threading.local()
        self._damage: str | None = None  # why the index cannot be used, once found
        self._checked = False  # quick_check passed before this object's first write
        self._owner = ""  # this registry's id (from the index): what its markers name
        self._has_meta = self._has_run_id = True
        self.read_only = read_only or not _writable(self.root, self._index)
        try:
            if self.read_only:
                self._open_read_only()
            else:
                self._adapters.mkdir(parents=True, exist_ok=True)
                self._tmp.mkdir(exist_ok=True)
                self._init_schema()
        except OSError as exc:
            raise RegistryError(f"cannot open the adapter registry at {self.root}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            error = self._index_error(exc)
            if self._damage is None:
                raise error from None
            return  # reads and writes say so; rebuild_index() and doctor() still work
        if not self.read_only:
            self._clean_orphans()

    def __repr__(self) -> str:
        flag = ", read_only=True" if self.read_only else ""
        return f"Registry({str(self.root)!r}{flag})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's index connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writing -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        folder: str | Path,
        *,
        method: str,
        labels: Iterable[str],
        base_fingerprint: str,
        task: str = "",
        base: Mapping[str, Any] | None = None,
        quantization: str | None = None,
        template: str | None = None,
        verbalizer: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        run_id: str | None = None,
    ) -> Entry:
        """Copy ``folder``'s adapter files into the registry as the next version of
        ``name``; ``run_id`` records the run that produced it (see :meth:`find_run`).

        Only the files an adapter folder consists of are copied (others are left out and
        logged); a symbolic link in the folder is refused. When the folder has a
        ``task.json``, its labels and method must agree with the arguments.

        >>> reg.register("sst2", "runs/sst2/adapter", method="lora", labels=["neg", "pos"],
        ...              base_fingerprint=fp.id, metrics={"accuracy": 0.91})  # doctest: +SKIP
        """
        meta = check_metadata(locals())  # picks the metadata arguments out of locals()
        return self._register(
            check_name(name), Path(folder).expanduser(), meta, run_id=check_run_id(run_id)
        )

    @_index_errors
    def set_metrics(
        self, ref: str | Entry, metrics: Mapping[str, Any], *, replace: bool = False
    ) -> Entry:
        """Merge ``metrics`` into the entry's metrics (or replace them all)."""
        checked = check_json_mapping("metrics", metrics)
        with self._write() as conn:
            entry = self.get(ref)
            new = checked if replace else {**entry.metrics, **checked}
            conn.execute(
                "UPDATE entries SET metrics = ? WHERE name = ? AND version = ?",
                (json.dumps(new), entry.name, entry.version),
            )
        return dataclasses.replace(entry, metrics=new)

    @_index_errors
    def remove(self, ref: str | Entry, *, all_versions: bool = False) -> builtins.list[Entry]:
        """Remove ``name@N``, or ``name``'s latest version, or every version of ``name``
        with ``all_versions=True``. Returns what was removed."""
        name, version = parse_ref(ref_str(ref))
        if all_versions and version is not None:
            raise ConfigError(
                f"remove({ref_str(ref)!r}, all_versions=True): give the bare name "
                f"{name!r} to remove every version, or drop all_versions"
            )
        marked: builtins.list[Path] = []
        try:
            with self._write() as conn:
                gone = self.list(name) if all_versions else [self.get(ref)]
                if not gone:
                    raise self._not_found(name, None)
                for e in gone:  # marked inside the transaction: a crash after the commit
                    if is_inside(e.path, self._adapters):  # leaves only proven folders
                        marked.append(e.path)
                        write_marker(e.path, self._owner)
                    elif e.path.exists():
                        log.warning("%s leads out of %s: left alone", e.path, self._adapters)
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
            remove_tree(path, self._adapters)
        return gone

    # -- reading -------------------------------------------------------------------------

    @_index_errors
    def get(self, ref: str | Entry) -> Entry:
        """The entry for ``"name"`` (latest version), ``"name@3"`` or ``"name@latest"``."""
        name, version = parse_ref(ref_str(ref))
        sql = f"SELECT {self._columns()} FROM entries WHERE name = ?"
        if version is None:
            row = self._conn().execute(sql + " ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = self._conn().execute(sql + " AND version = ?", (name, version)).fetchone()
        if row is None:
            raise self._not_found(name, version)
        return self._entry(row)

    @_index_errors
    def list(self, name: str | None = None, *, tag: str | None = None) -> builtins.list[Entry]:
        """Every version, sorted by name then version; filtered by ``name`` and/or ``tag``
        (a filter that matches nothing gives ``[]``; use :meth:`get` for a checked lookup)."""
        sql, args = f"SELECT {self._columns()} FROM entries", []
        if name is not None:
            sql, args = sql + " WHERE name = ?", [check_name(name)]
        rows = self._conn().execute(sql + " ORDER BY name, version", args).fetchall()
        entries = [self._entry(r) for r in rows]
        return entries if tag is None else [e for e in entries if tag in e.tags]

    @_index_errors
    def names(self) -> builtins.list[str]:
        """The names that have at least one version, sorted."""
        rows = self._conn().execute("SELECT DISTINCT name FROM entries ORDER BY name")
        return [r[0] for r in rows]

    @_index_errors
    def find_run(self, run_id: str, name: str | None = None) -> Entry | None:
        """The entry the run ``run_id`` registered (its latest, or ``name``'s), or None.

        A resumed run calls it before registering, so that a run killed between the
        registry's commit and its own record finds its entry instead of adding ``name@2``.
        """
        check_run_id(run_id)
        if not self._has_run_id:
            return None  # a read-only v1 index: no entry records a run
        sql, args = f"SELECT {self._columns()} FROM entries WHERE run_id = ?", [run_id]
        if name is not None:
            sql, args = sql + " AND name = ?", [run_id, check_name(name)]
        row = (
            self._conn()
            .execute(sql + " ORDER BY created DESC, version DESC LIMIT 1", args)
            .fetchone()
        )
        return None if row is None else self._entry(row)

    @_index_errors
    def generation(self) -> int:
        """A number that changes with every committed write (by any process): compare it
        to tell cheaply whether names may resolve to other versions now."""
        if not self._has_meta:  # read-only v1 index: only other connections write
            return int(self._conn().execute("PRAGMA data_version").fetchone()[0])
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def verify(self, ref: str | Entry) -> Entry:
        """Re-hash every file of the entry; IntegrityError names each file that differs
        from the index (changed: both hashes; missing; or not in the index)."""
        return self._verify_entry(self.get(ref))

    def load_path(
        self,
        ref: str | Entry,
        *,
        expected_fingerprint: str | None = None,
        expected_base: Mapping[str, Any] | None = None,
        verify: bool = True,
    ) -> Entry:
        """The entry to load, checked: trained on ``expected_fingerprint`` (the loaded
        base's id; ``expected_base`` only makes the error clearer) and files intact.

        >>> e = reg.load_path("sst2", expected_fingerprint=fp.id)   # doctest: +SKIP
        >>> model.load_adapter(str(e.path), adapter_name=e.name)     # doctest: +SKIP
        """
        entry = self.get(ref)
        if expected_fingerprint is not None and entry.base_fingerprint != expected_fingerprint:
            raise FingerprintMismatch(
                f"adapter {entry.ref} was trained on base "
                f"{describe_base(entry.base_fingerprint, entry.base)}, but the loaded base is "
                f"{describe_base(expected_fingerprint, expected_base or {})}; load the base it "
                f"was trained on, or use an adapter trained on this base"
            )
        return self._verify_entry(entry) if verify else entry

    # -- checks and repair ---------------------------------------------------------------

    def check(self, ref: str | Entry | None = None) -> Report:
        """Re-hash one entry's files (``ref``) or every entry's; problems are reported,
        nothing is changed."""
        damaged = self._damage_problem()
        if damaged is not None:
            return Report(str(self.root), problems=(damaged,))
        entries = [self.get(ref)] if ref is not None else self.list()
        ok, problems = [], []
        for e in entries:
            try:
                self._verify_entry(e)
                ok.append(e.ref)
            except IntegrityError as exc:
                kind = "missing-folder" if not e.path.is_dir() else "files-differ"
                problems.append(Problem(kind, e.ref, str(exc)))
        return Report(str(self.root), ok=tuple(ok), problems=tuple(problems))

    def doctor(self) -> Report:
        """:meth:`check` of every entry, plus what the index and the folders disagree on:
        version folders with no row, unfinished registrations, links, missing metadata."""
        report = self.check()
        if self._damage is not None:
            return report
        indexed = {(e.name.lower(), e.version) for e in self.list()}
        problems = list(report.problems)
        for name, version, folder in version_folders(self._adapters):
            if (name.lower(), version) not in indexed:
                problems.append(self._unindexed_problem(folder))
            elif not (folder / META_FILE).is_file():
                problems.append(
                    Problem(
                        "no-metadata",
                        f"{name}@{version}",
                        f"{folder} has no {META_FILE}; run rebuild_index() "
                        "('peftkit adapters rebuild') to write it",
                    )
                )
        problems += [
            Problem("link", str(p), "a symbolic link in adapters/: left alone; remove it by hand")
            for p in (self._adapters.iterdir() if self._adapters.is_dir() else ())
            if p.is_symlink()
        ]
        return dataclasses.replace(report, problems=tuple(problems))

    def rebuild_index(self) -> Report:
        """Re-create the rows missing from the index from the version folders'
        ``peftkit.json`` (each folder's files checked against the hashes it records), and
        write ``peftkit.json`` where an indexed folder lacks it. A damaged index is first
        moved aside (``index.sqlite.damaged-<time>``, never deleted) and a fresh one made.
        Folders whose files do not match, or that have no metadata, are reported and left
        as they are. Version counters are kept above every folder found."""
        self._refuse_read_only()
        aside = self._move_damaged_aside()
        problems: builtins.list[Problem] = []
        added = []
        try:
            with self._write() as conn:
                indexed = {(e.name.lower(), e.version) for e in self.list()}
                for name, version, folder in version_folders(self._adapters):
                    _raise_counter(conn, name, version)
                    if (name.lower(), version) in indexed:
                        continue
                    problem = self._reindex(conn, name, version, folder)
                    if problem is None:
                        added.append(f"{name}@{version}")
                    else:
                        problems.append(problem)
        except sqlite3.DatabaseError as exc:
            raise self._index_error(exc) from None
        for entry in self.list():
            if entry.path.is_dir() and not (entry.path / META_FILE).exists():
                with contextlib.suppress(OSError):
                    write_meta_file(entry.path, entry)
        return Report(
            str(self.root),
            problems=tuple(problems),
            added=tuple(added),
            moved_aside=None if aside is None else str(aside),
        )

    # -- exchange with plain peft --------------------------------------------------------

    def export(self, ref: str | Entry, dest: str | Path) -> Path:
        """Write the entry to ``dest`` (new or empty folder) as a folder plain peft loads:
        its files (adapter_config.json, adapter_model.safetensors, head.safetensors...)
        plus ``peftkit.json`` with the entry's metadata. Every file is written new (never
        through a link).

        >>> reg.export("sst2@1", "out/sst2")                           # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "out/sst2")         # doctest: +SKIP
        """
        entry = self.get(ref)
        missing = [f for f in _PEFT_FILES if f not in entry.files]
        if missing:
            raise RegistryError(
                f"adapter {entry.ref} cannot be exported as a peft folder: it "
                f"has no {' or '.join(missing)} (its files: "
                f"{', '.join(sorted(entry.files))})"
            )
        dest = Path(dest).expanduser().absolute()
        if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
            raise RegistryError(
                f"cannot export {entry.ref} to {dest}: it exists and is not an "
                f"empty folder; give a new or empty folder"
            )
        self._verify_entry(entry)
        try:
            export_files(entry, dest, lambda: self._verify_entry(entry))
        except OSError as exc:
            raise RegistryError(
                f"cannot export {entry.ref} to {dest}: {exc.strerror or exc}; give a folder "
                "you can write to"
            ) from None
        return dest

    def import_folder(
        self,
        folder: str | Path,
        name: str | None = None,
        *,
        method: str | None = None,
        task: str | None = None,
        labels: Iterable[str] | None = None,
        base_fingerprint: str | None = None,
        base: Mapping[str, Any] | None = None,
        quantization: str | None = None,
        template: str | None = None,
        verbalizer: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Entry:
        """Register a peft folder (``save_pretrained`` output, or an :meth:`export`).

        Metadata comes from the arguments, else from the folder's ``peftkit.json``;
        ``method`` falls back to ``adapter_config.json``'s ``peft_type`` (``"lora"``).
        A plain peft folder needs ``name``, ``labels`` and ``base_fingerprint``. The labels
        and method are checked against ``task.json`` and the head's shape; an export's
        files against the hashes its ``peftkit.json`` records. Symbolic links are refused
        and files that are not part of an adapter folder are left out.
        """
        folder = Path(folder).expanduser()
        refuse_links(folder)  # before any file of it is read
        missing = [f for f in _PEFT_FILES if not (folder / f).is_file()]
        if missing:
            raise ConfigError(
                f"{folder} is not a peft adapter folder: no {' or '.join(missing)}"
                f" (save it with save_pretrained(..., safe_serialization=True))"
            )
        saved = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        given = {k: v for k, v in locals().items() if k in META_FIELDS or k == "name"}
        args = {k: saved.get(k) if v is None else v for k, v in given.items()}
        if args["method"] is None:
            args["method"] = _peft_type(folder / "adapter_config.json")
        lacking = [k for k in ("name", "labels", "base_fingerprint") if args[k] is None]
        if lacking:
            raise ConfigError(
                f"cannot import {folder}: it has no {META_FILE} giving "
                f"{', '.join(lacking)}; pass them, e.g. import_folder(folder, "
                f"'sst2', labels=['neg', 'pos'], base_fingerprint=fp.id)"
            )
        new_name = check_name(args.pop("name"))
        args["task"], args["tags"] = args["task"] or "", args["tags"] or ()
        recorded = saved.get("files")
        expected = None
        if isinstance(recorded, dict):  # an export: check it arrived intact
            expected = {k: v for k, v in recorded.items() if k not in OWN_FILES}
        meta = check_metadata(args)
        return self._register(
            new_name, folder, meta, exclude={META_FILE}, expected=expected, imported=True
        )

    # -- internals: registering ----------------------------------------------------------

    def _register(
        self,
        name: str,
        folder: Path,
        meta: dict[str, Any],
        *,
        exclude: Container[str] = (),
        expected: Mapping[str, str] | None = None,
        run_id: str | None = None,
        imported: bool = False,
    ) -> Entry:
        self._refuse_read_only()
        self._refuse_if_damaged()
        sources, left_out = source_files(folder, exclude)
        if left_out:
            log.warning(
                "%s: left out %s (not part of an adapter folder)", folder, ", ".join(left_out)
            )
        stage, lock = new_stage(self._tmp, self._owner)
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
            try:
                return self._publish(name, stage, files, meta, run_id)
            except sqlite3.DatabaseError as exc:
                raise self._index_error(exc) from None
        finally:
            if lock is not None:
                os.close(lock)
            if stage.exists():  # gone already once published
                remove_tree(stage, self._tmp)

    def _publish(
        self,
        name: str,
        stage: Path,
        files: dict[str, str],
        meta: dict[str, Any],
        run_id: str | None,
    ) -> Entry:
        moved: Path | None = None
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        try:
            with self._write() as conn:
                version = _allocate_version(conn, name, self._highest_folder(name))
                final = self._adapters / name / str(version)
                row = {**meta, "name": name, "version": version, "files": files}
                row.update(created=created, run_id=run_id)
                entry = self._entry(encode_row(row))
                write_meta_file(stage, entry)
                final.parent.mkdir(parents=True, exist_ok=True)
                moved = final
                move_into_place(stage, final)
                conn.execute(
                    f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(COLUMNS))})",
                    encode_row(row),
                )
                # Out before the commit: a crash after it never leaves a committed entry
                # marked (a crash in between leaves an unmarked folder: reported, kept).
                clear_marker(final)
        except BaseException:
            if moved is not None and moved.exists():
                remove_tree(moved, self._adapters)  # staged by this call, never committed
            raise
        return entry

    def _highest_folder(self, name: str) -> int:
        """The highest version folder of ``name`` on disk (any case), indexed or not: new
        versions go above it, so a folder the index lost is never overwritten."""
        lower = name.lower()
        folders = (p for p in self._adapters.iterdir() if p.name.lower() == lower)
        numbers = (v.name for p in folders if p.is_dir() for v in p.iterdir())
        return max((int(n) for n in numbers if n.isdigit()), default=0)

    def _reindex(
        self, conn: sqlite3.Connection, name: str, version: int, folder: Path
    ) -> Problem | None:
        """Insert the row of an unindexed version folder from its peftkit.json; the
        problem instead when it cannot be trusted."""
        if folder.is_symlink() or (folder / PENDING_FILE).exists():
            return self._unindexed_problem(folder)
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
            detail = "; ".join(differ) + "; not indexed, left as it is"
            return Problem("files-differ", where, detail)
        row = {**meta, "name": name, "version": version, "files": files}
        row.update(created=str(saved.get("created") or ""), run_id=saved.get("run_id"))
        try:
            conn.execute(
                f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES "
                f"({', '.join('?' * len(COLUMNS))})",
                encode_row(row),
            )
        except sqlite3.IntegrityError as exc:
            return Problem("unindexed-folder", where, f"{folder}: cannot be indexed: {exc}")
        return None

    def _unindexed_problem(self, folder: Path) -> Problem:
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
            "run rebuild_index() ('peftkit adapters rebuild') to index it from its peftkit.json",
        )

    def _verify_entry(self, entry: Entry) -> Entry:
        path = entry.path
        inside = os.path.realpath(path) == os.path.join(
            os.path.realpath(self._adapters), entry.name, str(entry.version)
        )
        actual = {rel: p for rel, p in walk(path) if rel not in OWN_FILES}
        problems = compare_hashes(entry.files, actual if path.is_dir() and inside else {})
        if not inside and path.exists():
            problems.insert(
                0, f"its folder leads out of the registry (to {os.path.realpath(path)})"
            )
        if problems:
            raise IntegrityError(
                f"adapter {entry.ref} at {path} does not match the index: "
                + "; ".join(problems)
                + f". Restore the files, or remove the entry with remove({entry.ref!r})"
            )
        return entry

    def _not_found(self, name: str, version: int | None) -> RegistryError:
        rows = (
            self._conn()
            .execute("SELECT version FROM entries WHERE name = ? ORDER BY version", (name,))
            .fetchall()
        )
        if rows and version is not None:
            return RegistryError(
                f"adapter {name!r} has no version {version}; its versions are "
                f"{', '.join(str(r[0]) for r in rows)} (registry {self.root})"
            )
        names = self.names()
        if not names:
            return RegistryError(f"no adapter named {name!r}: the registry at {self.root} is empty")
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return RegistryError(
            f"no adapter named {name!r} in the registry at {self.root}"
            f"{did_you_mean(name, names)}; registered: {shown}"
        )

    def _entry(self, row: Iterable[Any]) -> Entry:
        values = dict(zip(COLUMNS, row, strict=True))
        for c in JSON_COLUMNS:
            if values[c] is not None:
                values[c] = json.loads(values[c])
        values["labels"], values["tags"] = tuple(values["labels"]), tuple(values["tags"])
        return Entry(**values, path=self._adapters / values["name"] / str(values["version"]))

    def _columns(self) -> str:
        cols = [c if c != "run_id" or self._has_run_id else "NULL AS run_id" for c in COLUMNS]
        return ", ".join(cols)

    # -- internals: the index ------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own)."""
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            if self.read_only:
                local.conn = _connect_read_only(self._index)
            else:
                local.conn = _connect(self._index)
            local.pid = os.getpid()
        return local.conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``BEGIN IMMEDIATE`` serialises writers across processes.
        Every commit bumps the generation (see :meth:`generation`)."""
        self._refuse_read_only()
        self._refuse_if_damaged()
        conn = self._conn()
        if conn.in_transaction:  # nested use from a method called inside another
            yield conn
            return
        if not self._checked:  # never write into a damaged file
            self._quick_check(conn)
            self._checked = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _init_schema(self) -> None:
        conn = self._conn()
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found != _SCHEMA_VERSION:
            self._checked = False
            with self._write():
                self._migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
        self._owner = conn.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0]

    def _migrate(self, conn: sqlite3.Connection, found: int) -> None:
        """Create the schema (``found == 0``) or bring a v1 index to v2, keeping its rows.
        Runs inside the write transaction (its generation bump needs the meta table)."""
        if found > _SCHEMA_VERSION:
            raise RegistryError(
                f"the registry at {self.root} has schema version {found}, "
                f"newer than this peftkit's {_SCHEMA_VERSION}; upgrade peftkit"
            )
        if found == 1:
            conn.execute("ALTER TABLE entries ADD COLUMN run_id TEXT")
        for statement in (*_SCHEMA, *_V2):
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _open_read_only(self) -> None:
        if not self._index.is_file():
            raise RegistryError(
                f"the registry at {self.root} is read-only and has no index.sqlite; give the "
                "folder of a registry (it holds index.sqlite and adapters/)"
            )
        conn = self._conn()
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > _SCHEMA_VERSION:
            raise RegistryError(
                f"the registry at {self.root} has schema version {found}, "
                f"newer than this peftkit's {_SCHEMA_VERSION}; upgrade peftkit"
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "entries" not in tables:
            raise RegistryError(f"the read-only registry at {self.root} has an empty index")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
        self._has_run_id, self._has_meta = "run_id" in columns, "meta" in tables

    def _refuse_read_only(self) -> None:
        if self.read_only:
            why = (
                "it was opened with read_only=True"
                if _writable(self.root, self._index)
                else "its folder or index.sqlite cannot be written (a read-only mount or "
                "another user's folder?)"
            )
            raise RegistryError(
                f"the registry at {self.root} is read-only: {why}; reading works, but to "
                "register, import, remove or change entries open a writable copy"
            )

    def _refuse_if_damaged(self) -> None:
        if self._damage is not None:
            raise RegistryError(self._damage)

    def _index_error(self, exc: sqlite3.DatabaseError) -> RegistryError:
        """The RegistryError for an SQLite error; damage is confirmed by quick_check and
        remembered, so that no later write goes into the damaged file."""
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            return RegistryError(
                f"the index {self._index} stayed locked by another process for "
                f"{_BUSY_TIMEOUT_S:.0f} s ({exc}); try again when it is done"
            )
        if "readonly" in text or "read-only" in text:
            self.read_only = True
            try:
                self._refuse_read_only()
            except RegistryError as err:
                return err
        detail = self._damage_detail(exc)
        if detail is None:
            return RegistryError(f"the index {self._index} cannot be used: {exc}")
        self._damage = (
            f"the registry index {self._index} is damaged ({detail}); no adapter file was "
            f"touched. Run 'peftkit adapters --registry {self.root} rebuild' (or "
            "Registry.rebuild_index()) to move it aside and rebuild the index from the "
            "version folders"
        )
        return RegistryError(self._damage)

    def _damage_detail(self, exc: sqlite3.DatabaseError) -> str | None:
        """What quick_check says is wrong, or the error itself when the file cannot even
        be checked; None when the index checks out (the error was something else)."""
        try:
            with contextlib.closing(_connect_read_only(self._index)) as probe:
                rows = [r[0] for r in probe.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as check_exc:
            return f"{exc}; quick_check: {check_exc}"
        if rows == ["ok"]:
            damaged = any(w in str(exc).lower() for w in _DAMAGE_WORDS)
            return f"{exc}" if damaged else None
        return f"{exc}; quick_check: " + "; ".join(rows)

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(rows))

    def _damage_problem(self) -> Problem | None:
        if self._damage is None:
            try:
                self._quick_check(self._conn())
                return None
            except sqlite3.DatabaseError as exc:
                self._index_error(exc)
            if self._damage is None:
                return None
        return Problem("damaged-index", str(self._index), self._damage)

    def _move_damaged_aside(self) -> Path | None:
        """Rename a damaged index (and its -wal / -shm) aside and open a fresh one."""
        if self._damage_problem() is None:
            return None
        self.close()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = self._index.with_name(f"{self._index.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self._index}{suffix}")
            if src.exists():
                os.rename(src, f"{aside}{suffix}")
        self._damage, self._checked = None, False
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise self._index_error(exc) from None
        log.warning("moved the damaged index %s aside to %s", self._index, aside)
        return aside

    def _clean_orphans(self) -> None:
        """Remove what crashed writes of this registry left: dead staging folders and
        version folders carrying its marker with no row (checked again under the write
        lock, so a registration between its rename and its commit is waited for). A
        marked folder that has its row is a removal that did not commit: unmarked."""
        for stage in self._tmp.glob("stage-*"):
            remove_if_orphan_stage(stage, self._owner)

        def marked() -> builtins.list[tuple[str, int, Path]]:
            return [
                (n, v, p)
                for n, v, p in version_folders(self._adapters)
                if not p.is_symlink() and marked_by(p, self._owner)
            ]

        if not marked():
            return
        try:
            with self._write() as conn:
                indexed = {
                    (n.lower(), v) for n, v in conn.execute("SELECT name, version FROM entries")
                }
                for name, version, path in marked():
                    if (name.lower(), version) in indexed:
                        clear_marker(path)
                    else:
                        remove_tree(path, self._adapters)
        except sqlite3.DatabaseError as exc:
            self._index_error(exc)  # remembered: reads and writes will say so


def _allocate_version(conn: sqlite3.Connection, name: str, floor: int = 0) -> int:
    """The next version of ``name`` (above ``floor``, the highest folder on disk); call
    inside the write transaction."""
    row = conn.execute("SELECT name, last_version FROM names WHERE name = ?", (name,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO names (name, last_version) VALUES (?, ?)", (name, floor + 1))
        return floor + 1
    if (
        row[0] != name
        and conn.execute("SELECT 1 FROM entries WHERE name = ?", (row[0],)).fetchone()
    ):
        raise ConfigError(
            f"adapter name {name!r} differs only in case from the registered "
            f"{row[0]!r} (names are folders, and many file systems ignore case); "
            f"use {row[0]!r} or another name"
        )
    version = max(row[1], floor) + 1
    conn.execute(
        "UPDATE names SET name = ?, last_version = ? WHERE name = ?", (name, version, row[0])
    )
    return version


def _raise_counter(conn: sqlite3.Connection, name: str, version: int) -> None:
    """Keep ``name``'s version counter at or above ``version`` (a folder found on disk)."""
    conn.execute(
        "INSERT INTO names (name, last_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
        " SET last_version = MAX(last_version, excluded.last_version)",
        (name, version),
    )


def _writable(root: Path, index: Path) -> bool:
    """Whether the registry can be written: its folder (or the nearest existing parent,
    for a new one) and its index, if there is one."""
    if index.exists():
        return os.access(index, os.W_OK) and os.access(root, os.W_OK)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK)


def _peft_type(config_path: Path) -> str:
    peft_type = read_json(config_path).get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise ConfigError(f"{config_path} has no peft_type; pass method= (e.g. method='lora')")
    return peft_type.lower()


def _connect(index: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(index, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:  # switching to WAL needs a moment alone with the file
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return conn
            problem = "SQLite did not switch the index to WAL mode"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                conn.close()
                raise
            problem = str(exc)
        if time.monotonic() > deadline:
            conn.close()
            raise sqlite3.OperationalError(f"{index}: {problem} (database is locked)")
        time.sleep(0.02)


def _connect_read_only(index: Path) -> sqlite3.Connection:
    """A read-only connection: ``mode=ro``, or ``immutable=1`` where SQLite cannot even
    create the shared-memory file a WAL index needs (a read-only mount)."""
    uri = f"file:{quote(str(index))}?mode=ro"
    try:
        return _probe(uri)
    except sqlite3.OperationalError:
        return _probe(uri + "&immutable=1")


def _probe(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn
