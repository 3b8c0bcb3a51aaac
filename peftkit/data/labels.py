"""Label rules: how the labels a file holds (names, or ids) become label ids.

With a label list (``labels.json``, the ``labels`` argument, a corpus's or hub dataset's own
names) an integer label is an index into it (or, where the names are numbers, that number),
so ids and names may mix. Without one, a source's labels must be all ids or all names, and the
list is the sorted labels of the training rows. Declared labels that no split has are a
warning, refused when more than half are absent or every row has one label (data to train
on only). Each refusal is a :class:`~peftkit.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from peftkit.data.dataset import preview
from peftkit.errors import DataError, did_you_mean

if TYPE_CHECKING:  # files.py imports check_label_names from here
    from peftkit.data.files import RawTable

__all__ = [
    "check_label_coverage",
    "check_label_names",
    "infer_labels",
    "label_ids",
    "refuse_mixed_label_kinds",
]

log = logging.getLogger(__name__)


def check_label_names(names: Sequence[str] | None, where: str = "labels") -> tuple[str, ...] | None:
    """``names`` as a tuple, checked: a non-empty list of unique strings (or None)."""
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: label names must be a list of strings; got {names!r}")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if not names or dupes:
        raise DataError(f"{where}: label names must be non-empty and unique; repeated: {dupes}")
    return tuple(names)


def infer_labels(tables: Mapping[str, RawTable]) -> tuple[tuple[str, ...], str]:
    """The sorted labels of the train table (else of every table), and where they came from."""
    chosen = [tables["train"]] if "train" in tables else list(tables.values())
    values = set()
    for table in chosen:
        for raw, lineno in zip(table.raw, table.lines, strict=True):
            if not isinstance(raw, (str, int)) or isinstance(raw, bool):
                raise DataError(_bad_label_type(table.where, lineno, raw))
            values.add(raw)
    if all(isinstance(v, int) for v in values):
        names = tuple(str(v) for v in sorted(values))
    else:
        names = tuple(sorted({str(v) for v in values}))
    where = ", ".join(t.where for t in chosen)
    return names, (f"training ({where})" if "train" in tables else f"the rows of {where}")


def _label_kind(raw: Any) -> str | None:
    if type(raw) is int or (type(raw) is str and raw.lstrip("-").isdecimal()):
        return "an id"
    return "a name" if type(raw) is str else None


def refuse_mixed_label_kinds(tables: Mapping[str, RawTable]) -> None:
    """Refuse labels that mix ids (integers, or numbers as text) and names across a source's
    files when no label list is given: ``0, 1, "neg", "pos"`` would become four classes."""
    seen: dict[str, tuple[str, int, Any]] = {}
    for table in tables.values():
        for raw, lineno in zip(table.raw, table.lines, strict=True):
            kind = _label_kind(raw)
            if kind is not None and kind not in seen:
                seen[kind] = (table.where, lineno, raw)
        if len(seen) == 2:
            (w1, l1, r1), (w2, l2, r2) = seen["an id"], seen["a name"]
            raise DataError(
                f"labels mix ids and names: {w1}, line {l1} has {r1!r} (an id) and {w2}, line "
                f"{l2} has {r2!r} (a name); without a label list each would be a class of its "
                "own. Write every label as a name, or give the names (labels.json next to the "
                "files, or the labels argument): an integer label is then an index into them"
            )


def check_label_coverage(splits, names, origin, inferred: bool, need_train: bool) -> None:
    """Declared labels that no split has: a warning, refused when more than half are absent
    (or the data holds one label) and the data is to train on. See the module docstring."""
    present = {y for s in splits.values() for y in s.labels}
    absent = [n for i, n in enumerate(names) if i not in present]
    if need_train and len(present) == 1:
        where = "; ".join(s.origin for s in splits.values())
        raise DataError(
            f"every row has the same label, {names[next(iter(present))]!r} ({where}); a "
            "classifier needs rows of two labels or more (is label_field the right field?)"
        )
    if inferred or not absent:
        return
    message = (
        f"{origin} names {len(absent)} of its {len(names)} labels that no split has: "
        f"{preview(absent)}"
    )
    if need_train and 2 * len(absent) > len(names):
        raise DataError(
            f"{message}; with more than half absent this is not the data's label set: fix the "
            "label list or the label field"
        )
    log.warning("%s; the head still gets %d outputs, one per declared label", message, len(names))


def label_ids(table: RawTable, names, origin: str, inferred: bool) -> tuple[int, ...]:
    index: dict[Any, int] = {n: i for i, n in enumerate(names)}
    for i, n in enumerate(names):
        if n.lstrip("-").isdecimal():  # names that are numbers: the file's ints mean them
            index.setdefault(int(n), i)
    if not any(n.lstrip("-").isdecimal() for n in names):  # otherwise ints are ids
        index.update({i: i for i in range(len(names))})
        index.update({str(i): i for i in range(len(names))})
    ids: list[int] = []
    for raw, lineno in zip(table.raw, table.lines, strict=True):
        found = index.get(raw) if type(raw) in (str, int) else None
        if found is None:
            _unknown_label(table, raw, lineno, names, origin, inferred)
        ids.append(found)
    return tuple(ids)


def _unknown_label(table, raw, lineno, names, origin, inferred: bool) -> NoReturn:
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise DataError(_bad_label_type(table.where, lineno, raw))
    kind = "does not occur in" if inferred else "is not among the labels of"
    raise DataError(
        f"{table.where}, line {lineno}: label {raw!r} {kind} {origin}; known labels: "
        f"{preview(names)}{did_you_mean(str(raw), names)}"
    )


def _bad_label_type(where: str, lineno: int, raw: Any) -> str:
    return (
        f"{where}, line {lineno}: label {raw!r} is {type(raw).__name__}; expected a label "
        "name (string) or a label id (integer)"
    )
