"""Rows of results as a plain-text table for a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] | None = None
) -> str:
    """A plain-text table of ``rows`` (``columns``: (key, title) pairs; default every key of
    the first row), numbers right-aligned."""
    columns = columns or [(k, k) for k in (rows[0] if rows else {})]
    header = [title for _, title in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    numeric = [all(_is_num(row.get(key)) for row in rows) for key, _ in columns]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _is_num(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):  # an interval: [low, high]
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
