"""Aliases: a label per adapter name (``sst2@production``) that points at one version, a
row of the index's ``aliases`` table moved in one write transaction (so every reader sees
the old version or the new one, and the generation counter tells servers it moved)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from peftkit.errors import RegistryError

TABLE = (
    "CREATE TABLE IF NOT EXISTS aliases (name TEXT NOT NULL, alias TEXT NOT NULL,"
    " version INTEGER NOT NULL, moved TEXT NOT NULL, PRIMARY KEY (name, alias))"
)


def point(
    conn: sqlite3.Connection, name: str, alias: str, version: int, moved: str | None = None
) -> int | None:
    """Point ``name@alias`` at ``version`` (inside a write transaction), moved now or at
    ``moved`` (a rebuild restores the time); the version it pointed at before, or None."""
    before = target(conn, name, alias)
    moved = moved or datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn.execute(
        "INSERT INTO aliases (name, alias, version, moved) VALUES (?, ?, ?, ?) ON CONFLICT"
        "(name, alias) DO UPDATE SET version = excluded.version, moved = excluded.moved",
        (name, alias, version, moved),
    )
    return before


def drop(conn: sqlite3.Connection, name: str, alias: str) -> int | None:
    """Remove ``name@alias`` (inside a write transaction); the version it pointed at."""
    before = target(conn, name, alias)
    conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
    return before


def target(conn: sqlite3.Connection, name: str, alias: str) -> int | None:
    """The version ``name@alias`` points at, or None."""
    if not has_table(conn):
        return None
    row = conn.execute(
        "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
    ).fetchone()
    return None if row is None else int(row[0])


def listed(conn: sqlite3.Connection, name: str | None = None) -> list[tuple[str, str, int, str]]:
    """``(name, alias, version, moved)`` rows, sorted by name then alias."""
    if not has_table(conn):
        return []
    sql, args = "SELECT name, alias, version, moved FROM aliases", []
    if name is not None:
        sql, args = sql + " WHERE name = ?", [name]
    rows = conn.execute(sql + " ORDER BY name, alias", args)
    return [(str(n), str(a), int(v), str(m)) for n, a, v, m in rows]


def pointing_at(conn: sqlite3.Connection, name: str, version: int) -> list[str]:
    """The aliases of ``name`` that point at ``version``."""
    return [a for n, a, v, _ in listed(conn, name) if v == version]


def refuse_removing(conn: sqlite3.Connection, name: str, version: int) -> None:
    """A version an alias points at is not removed: a server would lose what it answers
    with. The error says how to move or drop the alias."""
    held = pointing_at(conn, name, version)
    if held:
        alias = held[0]
        raise RegistryError(
            f"{name}@{version} is what alias {alias!r} points at ({name}@{alias}); move it "
            f"first (peftkit adapters alias {name}@N {alias}) or drop it (peftkit adapters "
            f"unalias {name} {alias}); nothing was removed"
        )


def unknown(name: str, alias: str, known: list[str]) -> RegistryError:
    """The error for an alias ``name`` does not have, naming those it has."""
    have = f"its aliases are {', '.join(known)}" if known else f"{name!r} has no aliases"
    return RegistryError(f"no alias {alias!r} for adapter {name!r}; {have}")


def has_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'aliases'").fetchone()
    return row is not None
