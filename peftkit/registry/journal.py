"""The registry's journal: ``journal.jsonl`` in the registry folder, one JSON object a line
for each change that lives only in the index (an alias set or dropped, a promotion
decision, metrics set after registration, a removal), so that
:meth:`Registry.rebuild_index` restores them when the index is lost or damaged; the version
folders' ``peftkit.json`` restore the entries themselves.

Writing: an event is appended (``O_APPEND``, one ``write``, ``fsync``) inside the write
transaction that makes its change, after the change's SQL and before the commit. SQLite's
write lock (``BEGIN IMMEDIATE``) orders the appends of every process, and the index never
commits a change the journal lacks. Should the transaction not commit after all, a
``void`` event naming it follows (best effort: a crash between the append and the commit
leaves the event standing, and a rebuild then restores a change that was decided but never
committed). A crash in the middle of an append leaves a last line without its newline: the
next append ends that line and marks it with a ``torn`` event, and the replay skips it with
a warning either way. The journal is a regular file: a symbolic link (or anything else)
there is refused, never followed. Only ``json`` reads it; nothing is unpickled.

Events; every line also holds ``v`` (the format, 1), ``id`` and ``at`` (when, UTC)::

    {"event": "alias", "name", "alias", "version", "created"}     name@alias -> name@version
    {"event": "unalias", "name", "alias"}
    {"event": "promotion", "promotion": {Promotion.to_dict()}, "version", "created", "moved"}
        ("moved": the decision moved its alias to ``version``, the candidate's; false for a
        past decision copied from the index, whose alias has an event of its own)
    {"event": "metrics", "name", "version", "created", "metrics"}   all of them, after
    {"event": "removed", "name", "version", "created"}   so its number is never reused
    {"event": "void", "of": ID}     the transaction of event ID did not commit
    {"event": "torn"}               the line before is a write cut short

``created`` is the entry's registration time: an event applies only to the adapter it was
written for, never to a later one that took a lost version number (``""``: not checked).

A rebuild replays the events into the index (:mod:`peftkit.registry.replay`: per
(name, alias) the last event wins, promotions the index lacks are inserted in order...).
After a replay, and when a writable registry first opens without a journal, what the index
holds and the journal lacks (written by a peftkit from before the journal) is appended.
The doctor (:meth:`Journal.check`) only reads: the lines a replay would skip, and what a
dry replay finds the index and the journal disagree on.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from peftkit.errors import RegistryError
from peftkit.registry.entries import MAX_VERSION, Entry, Problem, check_alias, check_name
from peftkit.registry.files import fsync_dir, open_regular
from peftkit.registry.index import Index
from peftkit.registry.promotions import Promotion
from peftkit.registry.replay import Replayed, State, lacking, missing, restore

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
FORMAT = 1


def _version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise ValueError(f"{value!r} is not a version number")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a JSON object")
    return value


def _promotion(value: Any) -> Promotion:
    promotion = Promotion.from_dict(value)
    check_name(promotion.name)
    check_alias(promotion.alias)
    return promotion


# what each kind of event holds besides v, id, at and event, and how each field is checked
_FIELDS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "alias": {"name": check_name, "alias": check_alias, "version": _version, "created": _text},
    "unalias": {"name": check_name, "alias": check_alias},
    "promotion": {"promotion": _promotion, "version": _version, "created": _text, "moved": _flag},
    "metrics": {"name": check_name, "version": _version, "created": _text, "metrics": _mapping},
    "removed": {"name": check_name, "version": _version, "created": _text},
    "void": {"of": _text},
    "torn": {},
}


class Journal:
    """The journal of the registry at ``root``, written inside ``index``'s transactions.

    >>> with index.write() as conn:                             # doctest: +SKIP
    ...     alias_rows.point(conn, "sst2", "production", 3)
    ...     journal.alias(entry, "production")   # before the commit
    """

    def __init__(self, root: Path, index: Index) -> None:
        self.path = root / JOURNAL_FILE
        self._index = index

    # -- events: call inside Index.write(), after the change's SQL ----------------------------

    def alias(self, entry: Entry, alias: str) -> None:
        fields = {"name": entry.name, "alias": alias, "version": entry.version}
        self._record("alias", **fields, created=entry.created)

    def unalias(self, name: str, alias: str) -> None:
        self._record("unalias", name=name, alias=alias)

    def promotion(self, promotion: Promotion, candidate: Entry) -> None:
        fields = {"version": candidate.version, "created": candidate.created}
        self._record("promotion", promotion=promotion.to_dict(), **fields, moved=promotion.passed)

    def metrics(self, entry: Entry, metrics: Mapping[str, Any]) -> None:
        fields = {"name": entry.name, "version": entry.version, "created": entry.created}
        self._record("metrics", **fields, metrics=dict(metrics))

    def removed(self, entry: Entry) -> None:
        self._record("removed", name=entry.name, version=entry.version, created=entry.created)

    def _record(self, kind: str, **fields: Any) -> None:
        line = _stamp({"event": kind, **fields})
        # a journal that cannot take the line at all (a link, not a file) is refused before a
        # void is armed: voiding would only fail the same way and say it twice
        self.refuse_link()
        self._index.on_rollback(partial(self._void, line["id"]))
        self._append([line])

    def _void(self, event_id: str) -> None:
        try:
            self._append([_stamp({"event": "void", "of": event_id})])
        except RegistryError as exc:
            log.warning("%s (event %s did not commit)", exc, event_id)

    # -- the first opening, and a rebuild -------------------------------------------------------

    def start(self, adapters: Path) -> None:
        """At a writable registry's opening, when it has no journal yet: write one holding
        what the index has that lives nowhere else (once; an empty file if nothing)."""
        if os.path.lexists(self.path) or self._index.damage is not None:
            return
        try:
            with self._index.write() as conn:
                if not os.path.lexists(self.path):  # another process may have been first
                    self._append([_stamp(e) for e in missing(conn, adapters, State())])
        except RegistryError as exc:
            log.warning("%s", exc)
        except sqlite3.DatabaseError as exc:
            self._index.error(exc)  # remembered: reads and writes will say so

    def replay(self, conn: sqlite3.Connection, adapters: Path) -> Replayed:
        """Restore into the index (inside the rebuild's write transaction, after the folders
        were re-indexed) what the journal records, then append what the index holds and
        the journal lacks."""
        events, done = self.read()
        lacking = missing(conn, adapters, restore(conn, events, done))
        if lacking:
            self._append([_stamp(e) for e in lacking])
        return done

    def check(self, conn: sqlite3.Connection | None, adapters: Path) -> Replayed:
        """What the doctor reports, read-only (nothing written, no link followed): a
        journal that cannot be read, lines a replay skips, and, given the index's ``conn``,
        what a replay would restore and what the index holds that the journal lacks. No
        journal yet (a registry from before it) is nothing to report."""
        if not os.path.lexists(self.path):
            return Replayed()
        try:
            events, done = self.read()
        except RegistryError as exc:
            return Replayed(problems=[Problem("journal-file", str(self.path), str(exc))])
        if conn is not None:
            done.dry = True
            done.problems += lacking(missing(conn, adapters, restore(conn, events, done)))
        return done

    def read(self) -> tuple[list[dict[str, Any]], Replayed]:
        """The events that stand (voided ones left out), in order, and the lines skipped."""
        self.refuse_link()
        if not os.path.lexists(self.path):
            return [], Replayed()
        try:
            with open_regular(self.path) as fh:
                data = fh.read()
        except OSError as exc:
            raise RegistryError(
                f"cannot read the registry journal {self.path}: {exc.strerror or exc}"
            ) from None
        return _parse_lines(str(self.path), data)

    def refuse_link(self) -> None:
        """RegistryError when the journal is a symbolic link, not a regular file, or a file
        with another hard link (an append would change that other name's file too)."""
        try:
            info = os.lstat(self.path)
            mode = info.st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RegistryError(f"cannot reach the registry journal {self.path}: {exc}") from None
        if stat.S_ISLNK(mode):
            raise RegistryError(
                f"the registry journal {self.path} is a symbolic link (to "
                f"{os.readlink(self.path)}); peftkit never follows a link out of the registry: "
                "put the file itself there (or move the link away) and try again"
            )
        if not stat.S_ISREG(mode):
            raise RegistryError(
                f"the registry journal {self.path} is not a regular file; move it away and "
                "try again"
            )
        if info.st_nlink > 1:
            raise RegistryError(_hard_linked(self.path, info.st_nlink))

    def _append(self, lines: list[dict[str, Any]]) -> None:
        """Append ``lines`` in one write, fsynced (an empty list: make sure the file exists);
        a last line cut short by a crash is ended and marked ``torn`` first."""
        self.refuse_link()
        payload = b"".join(_encode(line) for line in lines)
        created = not os.path.lexists(self.path)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise OSError(f"{self.path} is not a regular file")
                if info.st_nlink > 1:  # linked since refuse_link() looked
                    raise RegistryError(_hard_linked(self.path, info.st_nlink))
                if info.st_size:
                    os.lseek(fd, info.st_size - 1, os.SEEK_SET)
                    if os.read(fd, 1) != b"\n":
                        payload = b"\n" + _encode(_stamp({"event": "torn"})) + payload
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise RegistryError(
                f"cannot append to the registry journal {self.path} ({exc.strerror or exc}); "
                "nothing was changed: make it writable, or move it away and run 'peftkit "
                "adapters rebuild' to write a new one"
            ) from None


def _hard_linked(path: Path, links: int) -> str:
    return (
        f"the registry journal {path} has {links} hard links: an append would change the "
        "file under its other names too, and peftkit never writes through a link; give it a "
        f"file of its own (cp {path.name} {path.name}.own && mv {path.name}.own {path.name}) "
        "and try again"
    )


# -- reading ----------------------------------------------------------------------------------


def _stamp(event: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return {"v": FORMAT, "id": uuid.uuid4().hex, "at": now, **event}


def _encode(line: Mapping[str, Any]) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode("ascii") + b"\n"


def _parse(raw: bytes) -> dict[str, Any]:
    """The event of one line, checked; ValueError saying what is wrong with it."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("v") != FORMAT:
        raise ValueError(f"format {obj.get('v')!r}, this peftkit reads {FORMAT}")
    kind = obj.get("event")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ValueError(f"unknown event {kind!r}")
    event: dict[str, Any] = {"event": kind}
    for name, check in {"id": _text, "at": _text, **fields}.items():
        if name not in obj:
            raise ValueError(f"a {kind} event without {name!r}")
        try:
            event[name] = check(obj[name])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if kind == "promotion" and event["promotion"].candidate != (
        f"{event['promotion'].name}@{event['version']}"
    ):
        raise ValueError("its candidate is not its name@version")
    return event


def _parse_lines(where: str, data: bytes) -> tuple[list[dict[str, Any]], Replayed]:
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, as every append leaves it
    parsed: list[tuple[int, dict[str, Any] | str]] = []
    torn: set[int] = set()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            event = _parse(raw)
        except ValueError as exc:
            parsed.append((number, str(exc)))
            continue
        if event["event"] == "torn":
            torn.add(number - 1)
        else:
            parsed.append((number, event))
    done, events = Replayed(), []
    cut = "a write cut short by a crash (its change never committed): skipped"
    for number, got in parsed:
        if number in torn:
            done.warnings.append(Problem("journal-torn", f"{where}:{number}", cut))
        elif isinstance(got, str):
            done.problems.append(
                Problem(
                    "journal-line",
                    f"{where}:{number}",
                    f"not a journal event ({got}): every replay skips it (and replays the rest)",
                )
            )
        else:
            events.append(got)
    if tail.strip():
        where_tail = f"{where}:{len(lines) + 1}"
        done.warnings.append(Problem("journal-torn", where_tail, f"the last line is {cut}"))
    void = {e["of"] for e in events if e["event"] == "void"}
    return [e for e in events if e["event"] != "void" and e["id"] not in void], done
