"""The adapter registry: an SQLite index plus one folder of files per adapter version.

Layout under ``root``::

    index.sqlite               one row per adapter version (stdlib sqlite3, WAL)
    journal.jsonl              aliases, promotion decisions, metrics set later, removals:
                               what only the index holds, appended before each commit, so
                               that rebuild_index() restores them too (see ``journal``)
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

This module is the :class:`Registry` itself (its exchange with peft, load_path, export and
import_folder, is defined in ``exchange``; verify, check, doctor and rebuild_index in
``integrity``); the SQLite layer is ``index``, the per-entry checks and repairs ``check``, a
folder's own metadata ``metadata``, its files ``files`` and ``staging``, and what an entry
holds ``entries``.

Example::

    reg = Registry(cache_dir() / "registry")
    e = reg.register("sst2", "runs/sst2/adapter")  # metadata from the folder's task.json
    e.ref                                                # 'sst2@1'
    reg.load_path("sst2", expected_fingerprint=fp.id).path   # verified folder for peft
    reg.export("sst2@1", "out/sst2")    # PeftModel.from_pretrained(base, "out/sst2")
    Registry("/mnt/snapshot/registry", read_only=True).list()   # a read-only copy
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from peftkit.errors import ConfigError, RegistryError
from peftkit.registry import aliases as alias_rows
from peftkit.registry import check, exchange, integrity
from peftkit.registry import promotions as promotion_rows
from peftkit.registry.entries import (
    META_FIELDS,
    Entry,
    Problem,
    Report,
    check_alias,
    check_json_mapping,
    check_name,
    check_run_id,
    entry_from_row,
    not_found,
    parse_ref,
    ref_str,
    split_ref,
)
from peftkit.registry.index import Index
from peftkit.registry.journal import Journal
from peftkit.registry.metadata import register_metadata
from peftkit.registry.promotions import Promotion
from peftkit.registry.staging import register_folder, remove_entries

__all__ = ["Entry", "Problem", "Promotion", "Registry", "Report"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _index_errors(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn SQLite's errors inside ``method`` into a RegistryError that says what to do
    (a damaged index is checked with quick_check and named as such)."""

    @functools.wraps(method)
    def guarded(self: Registry, *args: Any, **kwargs: Any) -> _T:
        self._db.refuse_if_damaged()
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise self._db.error(exc) from None

    return guarded


class Registry:
    """Adapters by name and version; safe from several threads and processes at once.

    A registry whose folder or index cannot be written (a mounted snapshot, another user's
    folder), or one opened with ``read_only=True``, reads as usual and refuses writes.
    A missing or empty folder becomes a new registry; a folder with no index.sqlite that
    holds other files is refused (RegistryError), and nothing is created in it.

    >>> reg = Registry(tmp / "registry")                       # doctest: +SKIP
    >>> reg.register("sst2", folder).ref  # metadata from folder/task.json  # doctest: +SKIP
    'sst2@1'
    >>> [e.ref for e in reg.list()], reg.get("sst2@1").labels   # doctest: +SKIP
    """

    def __init__(self, root: str | Path, *, read_only: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        integrity.refuse_other_folder(self.root)  # before anything is created in it
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        self._db = Index(self.root, read_only=read_only)
        self._journal = Journal(self.root, self._db)
        try:
            if not self._db.read_only:
                self._adapters.mkdir(parents=True, exist_ok=True)
                self._tmp.mkdir(exist_ok=True)
            self._db.open()
        except OSError as exc:
            raise RegistryError(f"cannot open the adapter registry at {self.root}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            error = self._db.error(exc)
            if self._db.damage is None:
                raise error from None
            return  # reads and writes say so; rebuild_index() and doctor() still work
        if not self._db.read_only:
            check.clean_orphans(self._db, self._adapters, self._tmp)
            self._journal.start(self._adapters)

    @property
    def read_only(self) -> bool:
        """Whether writes are refused (asked for, or the files cannot be written)."""
        return self._db.read_only

    def __repr__(self) -> str:
        flag = ", read_only=True" if self.read_only else ""
        return f"Registry({str(self.root)!r}{flag})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's index connection (a later call opens a new one)."""
        self._db.close()

    # -- writing -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        folder: str | Path,
        *,
        method: str | None = None,
        labels: Iterable[str] | None = None,
        base_fingerprint: str | None = None,
        task: str = "",
        base: Mapping[str, Any] | None = None,
        quantization: str | None = None,
        template: str | None = None,
        verbalizer: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        run_id: str | None = None,
        lineage: Mapping[str, Any] | None = None,
        calibration: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Copy ``folder``'s adapter files into the registry as the next version of
        ``name``; ``run_id`` records the run that produced it (see :meth:`find_run`),
        ``lineage`` where it came from (``{"parent": "sst2@3", "data": {...}}``) and
        ``calibration`` its fitted temperature and threshold (default: the ``calibration``
        the folder's ``task.json`` records, if any); both are JSON objects.

        The metadata comes from the arguments given; what they leave out (None) from the
        folder's ``task.json``, as ``model.save_pretrained(folder)`` writes it (method,
        labels, base_fingerprint, base, quantization, template, verbalizer). ConfigError
        names the folder when neither gives method, labels or base_fingerprint; the
        labels, method and base_fingerprint given must agree with ``task.json``. Only the
        files an adapter folder consists of are copied (others are left out and logged);
        a symbolic link in the folder is refused.

        >>> model.save_pretrained("runs/sst2/adapter")                   # doctest: +SKIP
        >>> entry = reg.register("sst2", "runs/sst2/adapter")            # doctest: +SKIP
        >>> entry.ref, entry.labels, entry.base_fingerprint == fp.id     # doctest: +SKIP
        ('sst2@1', ('neg', 'pos'), True)
        """
        name, run_id = check_name(name), check_run_id(run_id)
        folder = Path(folder).expanduser()
        meta = register_metadata(folder, {k: v for k, v in locals().items() if k in META_FIELDS})
        return register_folder(self._db, self.root, name, folder, meta, run_id=run_id)

    @_index_errors
    def set_metrics(
        self, ref: str | Entry, metrics: Mapping[str, Any], *, replace: bool = False
    ) -> Entry:
        """Merge ``metrics`` into the entry's metrics (or replace them all)."""
        checked = check_json_mapping("metrics", metrics)
        with self._db.write() as conn:
            entry = self.get(ref)
            new = checked if replace else {**entry.metrics, **checked}
            conn.execute(
                "UPDATE entries SET metrics = ? WHERE name = ? AND version = ?",
                (json.dumps(new), entry.name, entry.version),
            )
            self._journal.metrics(entry, new)
        return dataclasses.replace(entry, metrics=new)

    @_index_errors
    def remove(self, ref: str | Entry, *, all_versions: bool = False) -> builtins.list[Entry]:
        """Remove ``name@N``, or ``name``'s latest version, or every version of ``name``
        with ``all_versions=True``. Returns what was removed."""
        name, version = parse_ref(self.resolve(ref_str(ref)))
        if all_versions and version is not None:
            raise ConfigError(
                f"{ref_str(ref)!r} names one version; to remove every version give the bare "
                f"name ('peftkit adapters rm {name} --all', or Registry.remove({name!r}, "
                "all_versions=True)), or remove only this version (no --all / all_versions)"
            )

        def chosen() -> builtins.list[Entry]:  # inside the write transaction
            gone = self.list(name) if all_versions else [self.get(ref)]
            if not gone:
                raise self._not_found(name, None)
            for entry in gone:
                alias_rows.refuse_removing(self._db.conn(), entry.name, entry.version)
            for entry in gone:
                self._journal.removed(entry)
            return gone

        return remove_entries(self._db, self._adapters, chosen)

    # -- reading -------------------------------------------------------------------------

    @_index_errors
    def get(self, ref: str | Entry) -> Entry:
        """The entry for ``"name"`` (latest version), ``"name@3"``, ``"name@latest"`` or
        ``"name@production"`` (the version the alias points at)."""
        name, version = parse_ref(self.resolve(ref_str(ref)))
        sql = f"SELECT {self._db.columns()} FROM entries WHERE name = ?"
        conn = self._db.conn()
        if version is None:
            row = conn.execute(sql + " ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = conn.execute(sql + " AND version = ?", (name, version)).fetchone()
        if row is None:
            raise self._not_found(name, version)
        return entry_from_row(row, self._adapters)

    @_index_errors
    def resolve(self, ref: str) -> str:
        """``ref`` with an alias replaced by the version it points at now (``"sst2@3"``);
        any other reference as it is."""
        name, selector = split_ref(ref)
        if not isinstance(selector, str):
            return ref
        version = alias_rows.target(self._db.conn(), name, selector)
        if version is None:
            raise self._unknown_alias(name, selector)
        return f"{name}@{version}"

    @_index_errors
    def alias(self, ref: str | Entry, alias: str) -> tuple[str | None, str]:
        """Point ``name@alias`` at ``ref``'s version (``"sst2@3"``, or a name: its latest),
        moving it in one transaction; returns ``(what it pointed at before or None, the
        version now)``, each as ``name@N``. Readers (a server) see it from their next call."""
        check_alias(alias)
        with self._db.write() as conn:
            entry = self.get(ref)
            before = alias_rows.point(conn, entry.name, alias, entry.version)
            self._journal.alias(entry, alias)
        return (None if before is None else f"{entry.name}@{before}"), entry.ref

    @_index_errors
    def unalias(self, name: str, alias: str) -> str:
        """Remove ``name@alias``; returns the version (``name@N``) it pointed at."""
        check_name(name)
        check_alias(alias)
        with self._db.write() as conn:
            before = alias_rows.drop(conn, name, alias)
            if before is None:
                raise self._unknown_alias(name, alias)
            self._journal.unalias(name, alias)
        return f"{name}@{before}"

    @_index_errors
    def aliases(self, name: str | None = None) -> dict[str, str]:
        """``{"sst2@production": "sst2@3", ...}``, every alias (or ``name``'s)."""
        rows = alias_rows.listed(self._db.conn(), None if name is None else check_name(name))
        return {f"{n}@{a}": f"{n}@{v}" for n, a, v, _ in rows}

    @_index_errors
    def promotions(self, name: str, limit: int | None = None) -> builtins.list[Promotion]:
        """``name``'s recorded promotion decisions, newest first (at most ``limit``)."""
        return promotion_rows.listed(self._db.conn(), check_name(name), limit)

    @_index_errors
    def decide_promotion(self, promotion: Promotion, *, expected: str | None) -> Promotion:
        """Record ``promotion`` and, when it passed, move its alias to its candidate, in one
        write transaction, only if the alias still points at ``expected`` (``name@N``, or
        None: no alias), what it pointed at when the scoring began. If another promotion
        moved it meanwhile, nothing moves and the decision is recorded as refused, saying
        so. Returns the decision recorded."""
        check_name(promotion.name)
        check_alias(promotion.alias)
        with self._db.write() as conn:
            candidate = self.get(promotion.candidate)  # still registered
            decided = promotion_rows.decide(conn, promotion, candidate.version, expected)
            self._journal.promotion(decided, candidate)
        return decided

    @_index_errors
    def list(self, name: str | None = None, *, tag: str | None = None) -> builtins.list[Entry]:
        """Every version, sorted by name then version; filtered by ``name`` and/or ``tag``
        (a filter that matches nothing gives ``[]``; use :meth:`get` for a checked lookup)."""
        sql, args = f"SELECT {self._db.columns()} FROM entries", []
        if name is not None:
            sql, args = sql + " WHERE name = ?", [check_name(name)]
        rows = self._db.conn().execute(sql + " ORDER BY name, version", args).fetchall()
        entries = [entry_from_row(r, self._adapters) for r in rows]
        return entries if tag is None else [e for e in entries if tag in e.tags]

    @_index_errors
    def names(self) -> builtins.list[str]:
        """The names that have at least one version, sorted."""
        rows = self._db.conn().execute("SELECT DISTINCT name FROM entries ORDER BY name")
        return [r[0] for r in rows]

    @_index_errors
    def find_run(self, run_id: str, name: str | None = None) -> Entry | None:
        """The entry the run ``run_id`` registered (its latest, or ``name``'s), or None.

        A resumed run calls it before registering, so that a run killed between the
        registry's commit and its own record finds its entry instead of adding ``name@2``.
        """
        check_run_id(run_id)
        if not self._db.has_run_id:
            return None  # a read-only v1 index: no entry records a run
        sql, args = f"SELECT {self._db.columns()} FROM entries WHERE run_id = ?", [run_id]
        if name is not None:
            sql, args = sql + " AND name = ?", [run_id, check_name(name)]
        sql += " ORDER BY created DESC, version DESC LIMIT 1"
        row = self._db.conn().execute(sql, args).fetchone()
        return None if row is None else entry_from_row(row, self._adapters)

    @_index_errors
    def generation(self) -> int:
        """A number that changes with every committed write (by any process): compare it
        to tell cheaply whether names may resolve to other versions now."""
        return self._db.generation()

    # -- checks and repair (defined in peftkit.registry.integrity) ---------------------

    verify = integrity.verify
    check = integrity.check
    doctor = integrity.doctor
    rebuild_index = integrity.rebuild_index

    # -- exchange with plain peft (defined in peftkit.registry.exchange) -----------------

    load_path = exchange.load_path
    export = exchange.export
    import_folder = exchange.import_folder

    # -- internals -----------------------------------------------------------------------

    def _unknown_alias(self, name: str, alias: str) -> RegistryError:
        """The error for ``name@alias`` that points nowhere: no such adapter (with close
        names), or the aliases it has."""
        known = [a for _, a, _, _ in alias_rows.listed(self._db.conn(), name)]
        if not known and not self.list(name):
            return self._not_found(name, None)
        return alias_rows.unknown(name, alias, known)

    def _not_found(self, name: str, version: int | None) -> RegistryError:
        sql = "SELECT version FROM entries WHERE name = ? ORDER BY version"
        versions = [r[0] for r in self._db.conn().execute(sql, (name,))]
        return not_found(self.root, name, version, versions, self.names())
