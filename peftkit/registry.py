"""The adapter registry: an SQLite index plus one folder of files per adapter version.

Layout under ``root``::

    index.sqlite               one row per adapter version (stdlib sqlite3, WAL)
    adapters/<name>/<version>/ the files as registered, sha256 of each in the index
    tmp/                       staging folders of registrations in progress

A registration copies the folder into ``tmp/`` (hashing and fsyncing every file), then in
one ``BEGIN IMMEDIATE`` transaction allocates the version, renames the staged folder into
``adapters/`` and inserts the row. A crash before the commit leaves a staging folder or an
unindexed version folder: neither is ever visible, and the next ``Registry(root)`` removes
both. Versions are never reused, even after a removal.

Example::

    reg = Registry(cache_dir() / "registry")
    e = reg.register("sst2", "runs/sst2/adapter", method="lora", labels=("neg", "pos"),
                     base_fingerprint=fp.id, base=fp.to_dict())
    e.ref                                                # 'sst2@1'
    reg.load_path("sst2", expected_fingerprint=fp.id).path   # verified folder for peft
    reg.export("sst2@1", "out/sst2")    # PeftModel.from_pretrained(base, "out/sst2")
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Container, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit.entries import (
    COLUMNS,
    JSON_COLUMNS,
    META_FIELDS,
    Entry,
    check_json_mapping,
    check_metadata,
    check_name,
    describe_base,
    encode_row,
    parse_ref,
    ref_str,
)
from peftkit.errors import (
    ConfigError,
    FingerprintMismatch,
    IntegrityError,
    RegistryError,
    did_you_mean,
)
from peftkit.filestore import (
    compare_hashes,
    copy_files,
    fill_stage,
    fsync_tree,
    move_into_place,
    new_dir,
    new_stage,
    remove_if_orphan_stage,
    source_files,
    walk,
)

__all__ = ["Entry", "Registry"]

_SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 30.0
_META_FILE = "peftkit.json"  # the entry's metadata inside an exported folder
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
    " created TEXT NOT NULL, PRIMARY KEY (name, version))",
)


class Registry:
    """Adapters by name and version; safe from several threads and processes at once.

    >>> reg = Registry(tmp / "registry")                       # doctest: +SKIP
    >>> reg.register("sst2", folder, method="lora", labels=["neg", "pos"],
    ...              base_fingerprint="9f2c...").ref            # doctest: +SKIP
    'sst2@1'
    >>> [e.ref for e in reg.list()], reg.get("sst2@1").labels   # doctest: +SKIP
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        self._index = self.root / "index.sqlite"
        self._local = threading.local()
        try:
            self._adapters.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
            self._init_schema()
        except (OSError, sqlite3.DatabaseError) as exc:
            raise RegistryError(f"cannot open the adapter registry at {self.root}: {exc}") from exc
        self._clean_orphans()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

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
    ) -> Entry:
        """Copy ``folder`` into the registry as the next version of ``name``.

        >>> reg.register("sst2", "runs/sst2/adapter", method="lora", labels=["neg", "pos"],
        ...              base_fingerprint=fp.id, metrics={"accuracy": 0.91})  # doctest: +SKIP
        """
        meta = check_metadata(locals())  # picks the metadata arguments out of locals()
        return self._register(check_name(name), Path(folder).expanduser(), meta)

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

    def remove(self, ref: str | Entry, *, all_versions: bool = False) -> builtins.list[Entry]:
        """Remove ``name@N``, or ``name``'s latest version, or every version of ``name``
        with ``all_versions=True``. Returns what was removed."""
        name, version = parse_ref(ref_str(ref))
        if all_versions and version is not None:
            raise ConfigError(
                f"remove({ref_str(ref)!r}, all_versions=True): give the bare name "
                f"{name!r} to remove every version, or drop all_versions"
            )
        with self._write() as conn:
            gone = self.list(name) if all_versions else [self.get(ref)]
            if not gone:
                raise self._not_found(name, None)
            conn.executemany(
                "DELETE FROM entries WHERE name = ? AND version = ?",
                [(e.name, e.version) for e in gone],
            )
        # After the commit: a crash here leaves unindexed folders, removed on the next open.
        for e in gone:
            shutil.rmtree(e.path, ignore_errors=True)
        return gone

    # -- reading -------------------------------------------------------------------------

    def get(self, ref: str | Entry) -> Entry:
        """The entry for ``"name"`` (latest version), ``"name@3"`` or ``"name@latest"``."""
        name, version = parse_ref(ref_str(ref))
        sql = f"SELECT {', '.join(COLUMNS)} FROM entries WHERE name = ?"
        if version is None:
            row = self._conn().execute(sql + " ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = self._conn().execute(sql + " AND version = ?", (name, version)).fetchone()
        if row is None:
            raise self._not_found(name, version)
        return self._entry(row)

    def list(self, name: str | None = None, *, tag: str | None = None) -> builtins.list[Entry]:
        """Every version, sorted by name then version; filtered by ``name`` and/or ``tag``
        (a filter that matches nothing gives ``[]``; use :meth:`get` for a checked lookup)."""
        sql, args = f"SELECT {', '.join(COLUMNS)} FROM entries", []
        if name is not None:
            sql, args = sql + " WHERE name = ?", [check_name(name)]
        rows = self._conn().execute(sql + " ORDER BY name, version", args).fetchall()
        entries = [self._entry(r) for r in rows]
        return entries if tag is None else [e for e in entries if tag in e.tags]

    def names(self) -> builtins.list[str]:
        """The names that have at least one version, sorted."""
        rows = self._conn().execute("SELECT DISTINCT name FROM entries ORDER BY name")
        return [r[0] for r in rows]

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

    # -- exchange with plain peft --------------------------------------------------------

    def export(self, ref: str | Entry, dest: str | Path) -> Path:
        """Write the entry to ``dest`` (new or empty folder) as a folder plain peft loads:
        its files (adapter_config.json, adapter_model.safetensors, head.safetensors...)
        plus ``peftkit.json`` with the entry's metadata.

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
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(
                f"cannot export {entry.ref} to {dest}: it exists and is not an "
                f"empty folder; give a new or empty folder"
            )
        self._verify_entry(entry)
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = new_dir(dest.parent, f".{dest.name}.export-")
        try:
            copied = copy_files(((r, entry.path / r) for r in entry.files), stage)
            if copied != entry.files:  # changed since the check a moment ago
                self._verify_entry(entry)
            meta = {"format": "peftkit-adapter/1", **entry.to_dict()}
            del meta["path"]
            with open(stage / _META_FILE, "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_tree(stage)
            if dest.exists():
                dest.rmdir()
            os.rename(stage, dest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
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
        A plain peft folder needs ``name``, ``labels`` and ``base_fingerprint``.
        """
        folder = Path(folder).expanduser()
        missing = [f for f in _PEFT_FILES if not (folder / f).is_file()]
        if missing:
            raise ConfigError(
                f"{folder} is not a peft adapter folder: no {' or '.join(missing)}"
                f" (save it with save_pretrained(..., safe_serialization=True))"
            )
        saved = _read_json(folder / _META_FILE) if (folder / _META_FILE).is_file() else {}
        given = {k: v for k, v in locals().items() if k in META_FIELDS or k == "name"}
        args = {k: saved.get(k) if v is None else v for k, v in given.items()}
        if args["method"] is None:
            args["method"] = _peft_type(folder / "adapter_config.json")
        lacking = [k for k in ("name", "labels", "base_fingerprint") if args[k] is None]
        if lacking:
            raise ConfigError(
                f"cannot import {folder}: it has no {_META_FILE} giving "
                f"{', '.join(lacking)}; pass them, e.g. import_folder(folder, "
                f"'sst2', labels=['neg', 'pos'], base_fingerprint=fp.id)"
            )
        new_name = check_name(args.pop("name"))
        args["task"], args["tags"] = args["task"] or "", args["tags"] or ()
        recorded = saved.get("files")
        expected = None
        if isinstance(recorded, dict):  # an export: check it arrived intact
            expected = {k: v for k, v in recorded.items() if k != _META_FILE}
        meta = check_metadata(args)
        return self._register(new_name, folder, meta, exclude={_META_FILE}, expected=expected)

    # -- internals -----------------------------------------------------------------------

    def _register(
        self,
        name: str,
        folder: Path,
        meta: dict[str, Any],
        *,
        exclude: Container[str] = (),
        expected: Mapping[str, str] | None = None,
    ) -> Entry:
        sources = source_files(folder, exclude)
        stage, lock = new_stage(self._tmp)
        try:
            files = fill_stage(stage, sources)
            if expected is not None:
                problems = compare_hashes(expected, files)
                if problems:
                    raise IntegrityError(
                        f"cannot import {folder}: its files do not match its "
                        f"{_META_FILE}: " + "; ".join(problems)
                    )
            return self._publish(name, stage, files, meta)
        finally:
            if lock is not None:
                os.close(lock)
            shutil.rmtree(stage, ignore_errors=True)  # gone already once published

    def _publish(
        self, name: str, stage: Path, files: dict[str, str], meta: dict[str, Any]
    ) -> Entry:
        moved: Path | None = None
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        try:
            with self._write() as conn:
                version = _allocate_version(conn, name)
                final = self._adapters / name / str(version)
                if final.exists():  # left by a crash between rename and commit
                    shutil.rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                moved = final
                move_into_place(stage, final)
                row = {**meta, "name": name, "version": version, "files": files, "created": created}
                conn.execute(
                    f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(COLUMNS))})",
                    encode_row(row),
                )
        except BaseException:
            if moved is not None:
                shutil.rmtree(moved, ignore_errors=True)
            raise
        return self._entry(encode_row(row))

    def _verify_entry(self, entry: Entry) -> Entry:
        problems = compare_hashes(
            entry.files, dict(walk(entry.path)) if entry.path.is_dir() else {}
        )
        if problems:
            raise IntegrityError(
                f"adapter {entry.ref} at {entry.path} does not match the index: "
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

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own)."""
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            local.conn, local.pid = _connect(self._index), os.getpid()
        return local.conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``BEGIN IMMEDIATE`` serialises writers across processes."""
        conn = self._conn()
        if conn.in_transaction:  # nested use from a method called inside another
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _init_schema(self) -> None:
        conn = self._conn()
        if conn.execute("PRAGMA user_version").fetchone()[0] == _SCHEMA_VERSION:
            return
        with self._write():
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > _SCHEMA_VERSION:
                raise RegistryError(
                    f"the registry at {self.root} has schema version {found}, "
                    f"newer than this peftkit's {_SCHEMA_VERSION}; upgrade"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _clean_orphans(self) -> None:
        """Remove what crashed registrations left: dead staging folders and version
        folders without a row (checked again under the write lock, so a registration
        that is between its rename and its commit is waited for, not removed)."""
        for stage in self._tmp.glob("stage-*"):
            remove_if_orphan_stage(stage)

        def unindexed() -> set[Path]:
            indexed = {
                (n.lower(), str(v))
                for n, v in self._conn().execute("SELECT name, version FROM entries")
            }
            found = set()
            for named in (p for p in self._adapters.iterdir() if p.is_dir()):
                versions = [v for v in named.iterdir() if v.name.isdigit()]
                found |= {v for v in versions if (named.name.lower(), v.name) not in indexed}
                if not any(named.iterdir()):
                    found.add(named)
            return found

        if not unindexed():
            return
        with self._write():
            for path in unindexed():
                if path.parent == self._adapters:
                    with contextlib.suppress(OSError):
                        path.rmdir()  # an empty name folder
                else:
                    shutil.rmtree(path, ignore_errors=True)


def _allocate_version(conn: sqlite3.Connection, name: str) -> int:
    """The next version of ``name``; call inside the write transaction."""
    row = conn.execute("SELECT name, last_version FROM names WHERE name = ?", (name,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO names (name, last_version) VALUES (?, 1)", (name,))
        return 1
    if (
        row[0] != name
        and conn.execute("SELECT 1 FROM entries WHERE name = ?", (row[0],)).fetchone()
    ):
        raise ConfigError(
            f"adapter name {name!r} differs only in case from the registered "
            f"{row[0]!r} (names are folders, and many file systems ignore case); "
            f"use {row[0]!r} or another name"
        )
    conn.execute(
        "UPDATE names SET name = ?, last_version = ? WHERE name = ?", (name, row[1] + 1, row[0])
    )
    return row[1] + 1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _peft_type(config_path: Path) -> str:
    peft_type = _read_json(config_path).get("peft_type")
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
            problem = str(exc)
        if time.monotonic() > deadline:
            conn.close()
            raise sqlite3.OperationalError(f"{index}: {problem}")
        time.sleep(0.02)
