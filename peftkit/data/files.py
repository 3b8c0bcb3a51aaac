"""Reading data files: a folder's split files, ``labels.json``, and ``.jsonl`` / ``.csv`` /
``.tsv`` rows into a :class:`RawTable` (texts, labels as written, line numbers).

Files are UTF-8 (a BOM is dropped); each refusal (other bytes, a missing field, a blank text,
a row of the wrong shape) is a :class:`~peftkit.errors.DataError` naming the file and line.

    >>> read_table(Path("train.jsonl"), Fields("text", "label", None))   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.data.dataset import preview
from peftkit.data.labels import check_label_names
from peftkit.errors import DataError, did_you_mean

__all__ = [
    "FILE_NAMES",
    "SUFFIXES",
    "Fields",
    "RawTable",
    "decode",
    "read_labels_json",
    "read_table",
    "refuse_blank_texts",
    "require_fields",
    "split_files",
]


FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}


SUFFIXES = (".jsonl", ".csv", ".tsv")


@dataclass(frozen=True)
class Fields:
    """Which fields (JSONL keys, CSV columns) hold the text, the label, the optional pair.

    ``pair_optional``: read ``pair`` from the rows that have it, and ``None`` for the others,
    instead of refusing a row without it (how :func:`peftkit.data.load.load_data` finds out whether
    the rows carry pairs).
    """

    text: str
    label: str
    pair: str | None
    pair_optional: bool = False


@dataclass
class RawTable:
    """Rows as read from one source, labels as written (names or ids)."""

    where: str  # file path (or hub split) for messages
    texts: list[str]
    pairs: list[str | None] | None  # None for a row without the pair (Fields.pair_optional)
    raw: list[Any]
    lines: list[int]


def split_files(folder: Path, need_train: bool = True) -> dict[str, Path]:
    """``{split: file}`` for the train/validation/test files in ``folder``: the train file is
    required, or with ``need_train=False`` any one of them."""
    found: dict[str, Path] = {}
    for split, stems in FILE_NAMES.items():
        hits = [
            folder / f"{s}{x}" for s in stems for x in SUFFIXES if (folder / f"{s}{x}").is_file()
        ]
        if len(hits) > 1:
            raise DataError(
                f"{folder} has more than one {split} file ({', '.join(p.name for p in hits)}); "
                "keep one"
            )
        if hits:
            found[split] = hits[0]
    have = sorted(p.name for p in folder.iterdir())
    holds = f"it holds: {preview(have) if have else 'nothing'}"
    if need_train and "train" not in found:
        raise DataError(
            f"{folder} has no training file: expected train.jsonl, train.csv or train.tsv "
            f"(with validation.* and test.*); {holds} (zero-shot evaluation and prediction "
            "take a folder without one; in Python, load_data(..., need_train=False))"
        )
    if not found:
        raise DataError(
            f"{folder} has no data file: expected train, validation (or valid, dev) or test, "
            f"each .jsonl, .csv or .tsv; {holds}"
        )
    return found


def read_labels_json(path: Path) -> tuple[str, ...]:
    """The label names in ``labels.json``: a JSON list whose order gives the ids."""
    raw = path.read_bytes()
    try:
        names = json.loads(decode(path, raw))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return check_label_names(names, where=str(path)) or ()
    raise DataError(f'{path} must hold a JSON list of label names, e.g. ["negative", "positive"]')


def read_table(path: Path, fields: Fields) -> RawTable:
    """The rows of one ``.jsonl``/``.csv``/``.tsv`` file."""
    if not path.is_file():
        raise DataError(f"data file does not exist: {path}")
    if path.suffix == ".jsonl":
        table = _read_jsonl(path, fields)
    elif path.suffix in (".csv", ".tsv"):
        table = _read_csv(path, fields, "\t" if path.suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .csv or .tsv")
    refuse_blank_texts(table, fields)
    return table


def refuse_blank_texts(table: RawTable, fields: Fields, unit: str = "line") -> None:
    """Refuse a table with an empty or whitespace-only text (or pair), naming where.

    Refused rather than dropped: the rows a run uses stay the rows of the file, and a blank
    text is most often a sign of a wrong field or a broken export, not of data to skip.
    """
    columns: list[tuple[str, list[Any]]] = [(fields.text, table.texts)]
    if fields.pair and table.pairs is not None:
        columns.append((fields.pair, table.pairs))
    for name, values in columns:
        lines = zip(values, table.lines, strict=True)
        blank = [n for v, n in lines if isinstance(v, str) and not v.strip()]
        if blank:
            hint = " or text_pair_field='' to leave the pairs out" if name == fields.pair else ""
            raise DataError(
                f"{table.where}, {unit} {blank[0]}: field {name!r} is empty "
                f"({len(blank)} of {len(values)} rows: {unit}s {preview([str(n) for n in blank], 5)}); "
                f"remove those rows or fill them in (is the field the right one?{hint})"
            )


def decode(path: Path, raw: bytes, offset: int = 0, lineno: int = 1) -> str:
    """``raw`` as UTF-8 text (a leading BOM dropped); a DataError naming the line and byte
    offset of the first byte that is not UTF-8. ``offset``/``lineno``: where ``raw`` starts."""
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        line = lineno + raw.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}, line {line} (byte {offset + e.start}): not UTF-8 text "
            f"(byte {raw[e.start]:#04x}: {e.reason}); re-save the file as UTF-8"
        ) from None


def _new_table(path: Path, fields: Fields) -> RawTable:
    return RawTable(str(path), [], [] if fields.pair else None, [], [])


def _read_jsonl(path: Path, fields: Fields) -> RawTable:
    table = _new_table(path, fields)
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = decode(path, raw, offset, lineno)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}, line {lineno}: expected one JSON object per line, "
                    f"got {type(row).__name__}"
                )
            _add_row(table, row, fields, lineno)
    return table


def _read_csv(path: Path, fields: Fields, delimiter: str) -> RawTable:
    table = _new_table(path, fields)
    with io.StringIO(decode(path, path.read_bytes()), newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not any(header):
                raise DataError(f"{path} is empty; expected a header row such as 'text,label'")
            require_fields(str(path), 1, header, fields)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields where the header "
                        f"has {len(header)} ({delimiter!r}-separated; quote fields that hold it)"
                    )
                _add_row(table, dict(zip(header, row, strict=True)), fields, reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    return table


def _add_row(table: RawTable, row: dict, fields: Fields, lineno: int) -> None:
    try:
        text, label = row[fields.text], row[fields.label]
        pair = None
        if fields.pair:
            pair = row.get(fields.pair) if fields.pair_optional else row[fields.pair]
    except KeyError:
        require_fields(table.where, lineno, row, fields)
        raise
    values = [(fields.text, text)] + ([(fields.pair, pair)] if fields.pair else [])
    for name, value in values:
        if type(value) is not str and not (value is None and fields.pair_optional):
            optional = (
                " (or text_pair_field='' to leave the pairs out)" if name == fields.pair else ""
            )
            raise DataError(
                f"{table.where}, line {lineno}: field {name!r} is {type(value).__name__} "
                f"{value!r}; expected a string{optional}"
            )
    table.texts.append(text)
    if table.pairs is not None:
        table.pairs.append(pair)
    table.raw.append(label.strip() if type(label) is str else label)
    table.lines.append(lineno)


def require_fields(where: str, lineno: int, present: Iterable[str], fields: Fields) -> None:
    """Refuse a row (or header) without a field ``fields`` names: the fields it has, the
    closest one, and the option that names it."""
    present = [str(p) for p in present]
    pair = None if fields.pair_optional else fields.pair
    for name, arg in (
        (fields.text, "text_field"),
        (fields.label, "label_field"),
        (pair, "text_pair_field"),
    ):
        if name is not None and name not in present:
            raise DataError(
                f"{where}, line {lineno}: no field {name!r}; fields present: "
                f"{', '.join(map(repr, present)) or 'none'}{_closest_field(name, present)}; "
                f"name yours with data.{arg} in a recipe ({arg}= in load_data)"
            )


def _closest_field(name: str, present: list[str]) -> str:
    """``did_you_mean``, trying a case-insensitive match first (``Text`` for ``text``)."""
    same = [p for p in present if p.casefold() == name.casefold()]
    return f" (did you mean {same[0]!r}?)" if same else did_you_mean(name, present)
