"""Promotion decisions: one row of the index's ``promotions`` table per decision to move
(or not to move) an alias to a candidate version, with the gate, the figures it was
decided on, who asked and when. A passed decision is written in the same transaction that
moves the alias, so the table never says an alias moved when it did not."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from peftkit.registry import aliases

TABLE = (
    "CREATE TABLE IF NOT EXISTS promotions (id INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL, alias TEXT NOT NULL, candidate TEXT NOT NULL, previous TEXT,"
    " decision TEXT NOT NULL, gate TEXT NOT NULL, figures TEXT NOT NULL, reason TEXT NOT NULL,"
    " who TEXT NOT NULL, at TEXT NOT NULL)"
)
_FIELDS = "name alias candidate previous decision gate figures reason who at".split()
DECISIONS = ("passed", "refused")


@dataclass(frozen=True)
class Promotion:
    """One recorded decision: ``candidate`` and ``previous`` are ``name@N`` refs
    (``previous`` None when the alias pointed nowhere), ``decision`` ``"passed"`` or
    ``"refused"``, ``figures`` the numbers it was decided on, ``reason`` why."""

    name: str
    alias: str
    candidate: str
    previous: str | None
    decision: str
    gate: str
    figures: dict[str, Any]
    reason: str
    who: str
    at: str  # ISO 8601, UTC

    @property
    def passed(self) -> bool:
        return self.decision == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> Promotion:
        """The decision a :meth:`to_dict` object records; ValueError saying which field
        is missing or of the wrong type (a journal line is read with it)."""
        if not isinstance(data, dict):
            raise ValueError("a promotion must be a JSON object")
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            raise ValueError(f"the promotion lacks {', '.join(missing)}")
        for f in _FIELDS:
            value, optional = data[f], f == "previous"
            wanted = dict if f == "figures" else str
            if not isinstance(value, wanted) and not (optional and value is None):
                raise ValueError(f"the promotion's {f} is {value!r}, not a {wanted.__name__}")
        if data["decision"] not in DECISIONS:
            raise ValueError(f"the promotion's decision is {data['decision']!r}")
        return cls(**{f: data[f] for f in _FIELDS})


def who() -> str:
    """Who is promoting: ``PEFTKIT_USER``, else the OS user (``"unknown"`` if neither)."""
    named = os.environ.get("PEFTKIT_USER", "").strip()
    if named:
        return named
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "unknown"


def new(
    name: str,
    alias: str,
    candidate: str,
    previous: str | None,
    *,
    passed: bool,
    gate: str,
    figures: Mapping[str, Any],
    reason: str,
) -> Promotion:
    """A decision made now by :func:`who`; ``figures`` must be JSON values."""
    return Promotion(
        name=name,
        alias=alias,
        candidate=candidate,
        previous=previous,
        decision=DECISIONS[0] if passed else DECISIONS[1],
        gate=gate,
        figures=json.loads(json.dumps(dict(figures))),
        reason=reason,
        who=who(),
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def record(conn: sqlite3.Connection, promotion: Promotion) -> None:
    """Insert ``promotion`` (inside a write transaction)."""
    values = promotion.to_dict()
    values["figures"] = json.dumps(values["figures"])
    conn.execute(
        f"INSERT INTO promotions ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
        [values[f] for f in _FIELDS],
    )


def decide(
    conn: sqlite3.Connection, promotion: Promotion, version: int, expected: str | None
) -> Promotion:
    """Inside a write transaction: record ``promotion`` and, when it passed, point its
    alias at ``version`` (the candidate's), but only if the alias still points at
    ``expected`` (``name@N`` or None); otherwise it is recorded as refused, saying who
    moved it. Returns what was recorded."""
    name, alias = promotion.name, promotion.alias
    if promotion.passed:
        now = aliases.target(conn, name, alias)
        now_ref = None if now is None else f"{name}@{now}"
        if now_ref != expected:
            promotion = dataclasses.replace(
                promotion,
                decision="refused",
                reason=(
                    f"{name}@{alias} was moved from {expected or '(none)'} to "
                    f"{now_ref or '(none)'} by another promotion or alias while this one "
                    f"was scoring; nothing moved (score again against {now_ref or 'no alias'})"
                ),
            )
        else:
            aliases.point(conn, name, alias, version)
    record(conn, promotion)
    return promotion


def every(conn: sqlite3.Connection) -> list[Promotion]:
    """Every recorded decision, oldest first."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'promotions'").fetchone() is None:
        return []
    rows = conn.execute(f"SELECT {', '.join(_FIELDS)} FROM promotions ORDER BY id")
    return [_from_row(row) for row in rows]


def _from_row(row: Any) -> Promotion:
    values = dict(zip(_FIELDS, row, strict=True))
    values["figures"] = json.loads(values["figures"])
    return Promotion(**values)


def listed(conn: sqlite3.Connection, name: str, limit: int | None = None) -> list[Promotion]:
    """``name``'s decisions, newest first (at most ``limit``); [] before schema v4."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'promotions'").fetchone() is None:
        return []
    sql = f"SELECT {', '.join(_FIELDS)} FROM promotions WHERE name = ? ORDER BY id DESC"
    rows = conn.execute(sql + ("" if limit is None else f" LIMIT {int(limit)}"), (name,))
    return [_from_row(row) for row in rows]
