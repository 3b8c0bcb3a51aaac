"""Replaying the registry's journal into the index (see :mod:`peftkit.registry.journal`
for the events): what a rebuild restores, and what the index holds that the journal lacks.

Per (name, alias) the last event wins (a passed decision that moved its alias counts), and
an alias whose version is not in the registry, or is another adapter now (registered at
another time: a lost version number taken again), is dropped and reported; promotions the
index lacks are inserted in journal order; per entry the last metrics event wins; each
name's version counter goes above every version the journal names. Everything runs inside
the rebuild's write transaction, after the version folders were re-indexed. A dry replay
(``Replayed(dry=True)``, what the doctor runs) writes nothing: each change it would make is
a ``journal-differs`` problem instead, and :func:`lacking` words what :func:`missing` finds.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.registry import aliases as alias_rows
from peftkit.registry import promotions as promotion_rows
from peftkit.registry.entries import Problem
from peftkit.registry.files import META_FILE
from peftkit.registry.index import raise_counter
from peftkit.registry.metadata import read_json
from peftkit.registry.promotions import Promotion

log = logging.getLogger(__name__)


REBUILD = "'peftkit adapters rebuild'"


def restore(conn: sqlite3.Connection, events: list[dict[str, Any]], done: Replayed) -> State:
    """Restore ``events`` (the journal's, in order) into the index; what they come to.
    With ``done.dry`` nothing is written: what would change is reported instead."""
    state = State.fold(events)
    entries = _entries(conn)
    for name, top in sorted(state.top.items()):
        if not done.dry:
            raise_counter(conn, name, top)
    _restore_aliases(conn, state, entries, done)
    _restore_promotions(conn, state, done)
    _restore_metrics(conn, state, entries, done)
    return state


@dataclass
class Replayed:
    """What a replay restored (one line each), and what it found wrong or skipped."""

    restored: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    dry: bool = False  # only look: each change is a problem, nothing is written

    def change(self, where: str, restored: str, differs: str) -> bool:
        """Note a change the replay makes (``restored``), or when dry the disagreement
        (``differs``) as a problem at ``where``; whether to make it."""
        if self.dry:
            hint = f"{REBUILD} restores it from the journal"
            self.problems.append(Problem("journal-differs", where, f"{differs}; {hint}"))
        else:
            self.restored.append(restored)
        return not self.dry


@dataclass
class State:
    """What the journal's events come to: per (name, alias) and per entry the last event,
    every promotion in order, and each name's highest version named."""

    aliases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    metrics: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    promotions: list[Promotion] = field(default_factory=list)
    top: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fold(cls, events: list[dict[str, Any]]) -> State:
        state = cls()
        for e in events:
            if e["event"] == "promotion":
                p = e["promotion"]
                e = {**e, "name": p.name}
                state.promotions.append(p)
                if e["moved"]:
                    moved = {"event": "alias", "alias": p.alias, "at": p.at}
                    state.aliases[(p.name, p.alias)] = {**e, **moved}
            elif e["event"] in ("alias", "unalias"):
                state.aliases[(e["name"], e["alias"])] = e
            elif e["event"] == "metrics":
                state.metrics[(e["name"], e["version"])] = e
            if "version" in e:
                state.top[e["name"]] = max(state.top.get(e["name"], 0), e["version"])
        return state


def _entries(conn: sqlite3.Connection) -> dict[tuple[str, int], tuple[str, dict[str, Any]]]:
    """(name, version) -> (created, metrics) of every indexed entry."""
    rows = conn.execute("SELECT name, version, created, metrics FROM entries")
    return {(n, int(v)): (str(c), json.loads(m)) for n, v, c, m in rows}


def _same_adapter(event: Mapping[str, Any], created: str) -> bool:
    return event.get("created", "") in ("", created)


def _restore_aliases(
    conn: sqlite3.Connection, state: State, entries: Mapping[Any, Any], done: Replayed
) -> None:
    have = {(n, a): v for n, a, v, _ in alias_rows.listed(conn)}
    for (name, alias), e in state.aliases.items():
        now = have.get((name, alias))
        where = f"{name}@{alias}"
        if e["event"] == "unalias":
            if now is not None and done.change(
                where,
                f"alias {where} dropped, as the journal records",
                f"the index has it at {name}@{now}, the journal records it dropped",
            ):
                alias_rows.drop(conn, name, alias)
            continue
        version, target = e["version"], entries.get((name, e["version"]))
        if target is None and done.dry:  # a rebuild re-indexes the folders first
            done.problems.append(
                Problem(
                    "journal-differs",
                    where,
                    f"the journal has it at {name}@{version}, which the index does not list; "
                    f"{REBUILD} restores it if it can re-index that version's folder",
                )
            )
        elif target is None or not _same_adapter(e, target[0]):
            why = (
                "is not in the registry (its folder is gone or could not be re-indexed)"
                if target is None
                else f"is another adapter now (registered {target[0]}, not {e['created']})"
            )
            done.problems.append(
                Problem(
                    "alias-dropped",
                    where,
                    f"the journal has it at {name}@{version}, which {why}; not restored: "
                    f"point it again with 'peftkit adapters alias {name}@N {alias}'",
                )
            )
        elif now != version and done.change(
            where,
            f"alias {where} -> {name}@{version}",
            f"the journal has it at {name}@{version}, the index "
            + ("lacks it" if now is None else f"at {name}@{now}"),
        ):
            alias_rows.point(conn, name, alias, version, moved=e["at"])


def _key(promotion: Promotion) -> str:
    return json.dumps(promotion.to_dict(), sort_keys=True)


def _restore_promotions(conn: sqlite3.Connection, state: State, done: Replayed) -> None:
    indexed = Counter(_key(p) for p in promotion_rows.every(conn))
    for p in state.promotions:
        if indexed[_key(p)] > 0:
            indexed[_key(p)] -= 1
            continue
        what = f"{p.candidate} {p.decision} ({p.who}, {p.at})"
        if done.change(
            f"{p.name}@{p.alias}",
            f"promotion {p.name}@{p.alias}: {what}",
            f"the journal records the promotion decision {what}, the index lacks it",
        ):
            promotion_rows.record(conn, p)


def _restore_metrics(
    conn: sqlite3.Connection, state: State, entries: Mapping[Any, Any], done: Replayed
) -> None:
    for (name, version), e in state.metrics.items():
        target = entries.get((name, version))
        if target is None:
            continue  # removed since, or its folder is gone (reported by the re-indexing)
        if not _same_adapter(e, target[0]):
            done.warnings.append(
                Problem(
                    "metrics-skipped",
                    f"{name}@{version}",
                    f"the journal's metrics are those of the adapter registered "
                    f"{e['created']}, not of this one (registered {target[0]}): not restored",
                )
            )
        elif target[1] != e["metrics"] and done.change(
            f"{name}@{version}",
            f"metrics of {name}@{version}",
            "its metrics in the index differ from the last the journal records",
        ):
            conn.execute(
                "UPDATE entries SET metrics = ? WHERE name = ? AND version = ?",
                (json.dumps(e["metrics"]), name, version),
            )


def missing(conn: sqlite3.Connection, adapters: Path, state: State) -> list[dict[str, Any]]:
    """Events for what the index holds and ``state`` (the journal) lacks: aliases it never
    names, promotions it does not hold, metrics that differ from the last the journal
    records for the entry, else from its folder's ``peftkit.json``."""
    entries = _entries(conn)
    events: list[dict[str, Any]] = []
    for name, alias, version, moved in alias_rows.listed(conn):
        if (name, alias) not in state.aliases:
            created = entries.get((name, version), ("", {}))[0]
            events.append(
                {
                    "event": "alias",
                    "name": name,
                    "alias": alias,
                    "version": version,
                    "created": created,
                    "at": moved,
                }
            )
    journaled = Counter(_key(p) for p in state.promotions)
    for p in promotion_rows.every(conn):
        name, _, number = p.candidate.rpartition("@")
        if journaled[_key(p)] > 0:
            journaled[_key(p)] -= 1
        elif name == p.name and number.isdigit() and int(number) >= 1:
            created = entries.get((name, int(number)), ("", {}))[0]
            events.append(
                {
                    "event": "promotion",
                    "promotion": p.to_dict(),
                    "version": int(number),
                    "created": created,
                    "moved": False,
                }
            )
        else:
            log.warning("a promotion of %s names candidate %r: not journaled", p.name, p.candidate)
    for (name, version), (created, metrics) in sorted(entries.items()):
        last = state.metrics.get((name, version))
        if last is not None and _same_adapter(last, created):
            continue  # the index holds what the journal last records (just restored)
        if metrics != _folder_metrics(adapters / name / str(version)):  # {} if unreadable
            events.append(
                {
                    "event": "metrics",
                    "name": name,
                    "version": version,
                    "created": created,
                    "metrics": metrics,
                }
            )
    return events


def _folder_metrics(folder: Path) -> Any:
    """The metrics the folder's ``peftkit.json`` records ({} when it has none: a folder
    without it is indexed from nowhere but the index, which writes it with its metrics)."""
    try:
        return read_json(folder / META_FILE).get("metrics", {})
    except (ConfigError, OSError):
        return {}


def lacking(events: list[dict[str, Any]]) -> list[Problem]:
    """One ``journal-lacks`` problem for each event of :func:`missing` (what the index
    holds and the journal lacks, which a rebuild appends)."""
    hint = f"{REBUILD} writes it into the journal (else a lost index loses it)"
    problems = []
    for e in events:
        if e["event"] == "alias":
            where = f"{e['name']}@{e['alias']}"
            what = f"the index has it at {e['name']}@{e['version']}, the journal never names it"
        elif e["event"] == "promotion":
            p = Promotion.from_dict(e["promotion"])
            where = f"{p.name}@{p.alias}"
            what = f"the index's promotion decision {p.candidate} {p.decision} ({p.who}, "
            what += f"{p.at}) is not in the journal"
        else:
            where = f"{e['name']}@{e['version']}"
            what = "its metrics in the index are in neither the journal nor its peftkit.json"
        problems.append(Problem("journal-lacks", where, f"{what}; {hint}"))
    return problems
