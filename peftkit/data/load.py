"""Text-classification data: one loader for every source, seeded splits, a few-shot sampler.

:func:`load_data` reads

- a packaged real corpus by name (``bbc-news``, ``tweets-sentiment``, ``sms-spam``; see
  :mod:`peftkit.data.corpora`);
- a folder holding ``train``, ``validation`` (or ``valid``/``dev``) and ``test`` files,
  each ``.jsonl``, ``.csv`` or ``.tsv``, plus an optional ``labels.json`` (a JSON list of
  label names whose order gives the label ids);
- a single ``.jsonl``/``.csv``/``.tsv`` file, split into train/validation/test;
- a Hugging Face hub dataset, ``"hub:<id>"`` (needs ``datasets`` and a network).

Labels in files may be names (strings) or ids (integers into the label list). Splits are
carved where a source has none, stratified by label and seeded; the order is decided by
sha256 keys, not by ``hash()`` or global random state, so the same seed gives the same
rows on every machine and Python version. Nothing is written anywhere.

Rules for data that would otherwise give a silently wrong result (each a
:class:`~peftkit.errors.DataError` naming the file and line, unless said otherwise):

- **ids and names.** With a label list (``labels.json``, the ``labels`` argument, a corpus's
  or hub dataset's own names) an integer label is an index into it (or, where the names are
  numbers, that number), so ids and names may mix. Without one, the labels of a source
  (all its files) must be all ids (integers, or numbers written as text) or all names:
  ``0, 1, "neg", "pos"`` would otherwise be four classes, and is refused.
- **declared labels no split has.** A label list naming labels no row has is a warning
  naming them (the head still gets one output per declared label: the list is the user's
  label set); more than half of them absent is refused. Data whose rows all have one label
  is refused (no classifier to train); both refusals apply only to data to train on
  (``need_train=True``).
- **empty texts.** A text (or text pair) that is empty or only whitespace is refused, with
  its line and the count, not dropped: the rows used stay the rows of the file, and a blank
  text most often means a wrong field or a broken export.
- **pairs.** With ``text_pair_field`` unset, the rows are pairs when every row of the first
  file (train, else the first one with rows) has ``text_pair``; then every file must have it.
  Some rows with it and some without is a warning, and no pairs are used.
- **encoding.** Files are UTF-8 (a BOM is dropped); other bytes are refused with the line
  and byte offset of the first one.

    >>> data = load_data("sms-spam", seed=0)
    >>> data.labels, len(data.split("train"))
    (('ham', 'spam'), 3628)
    >>> len(few_shot(data.split("train"), k=8, seed=1))   # 8 per class
    16
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from peftkit.data.corpora import (
    CORPORA,
    SUFFIXES,
    Fields,
    RawTable,
    check_label_names,
    corpus_spec,
    packaged_corpora,
    preview,
    read_corpus,
    read_hub,
    read_labels_json,
    read_table,
    split_files,
)
from peftkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "SAMPLES",
    "SPLITS",
    "Split",
    "TextDataset",
    "few_shot",
    "load_data",
    "packaged_corpora",
    "stratified_rows",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SAMPLES = ("stratified", "first")  # how max_rows chooses its rows


@dataclass(frozen=True)
class Split:
    """One split: texts, label ids (into :attr:`TextDataset.labels`), optional second texts.

    ``origin`` says where the rows came from, for messages (not compared)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    text_pairs: tuple[str, ...] | None = None
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.text_pairs is not None:
            object.__setattr__(self, "text_pairs", tuple(self.text_pairs))
        sizes = {len(self.texts), len(self.labels)}
        if self.text_pairs is not None:
            sizes.add(len(self.text_pairs))
        if len(sizes) != 1:
            raise DataError(
                f"Split needs as many labels (and text pairs) as texts; got {len(self.texts)} "
                f"texts, {len(self.labels)} labels"
                + ("" if self.text_pairs is None else f", {len(self.text_pairs)} text pairs")
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        pairs = "" if self.text_pairs is None else ", with text_pairs"
        return f"Split({len(self)} rows, {len(set(self.labels))} labels{pairs})"

    def subset(self, indices: Iterable[int]) -> Split:
        """The rows at ``indices``, in that order: ``split.subset(range(100))``."""
        idx = list(indices)
        pairs = None if self.text_pairs is None else tuple(self.text_pairs[i] for i in idx)
        texts, labels = tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx)
        return Split(texts, labels, pairs, origin=self.origin)


@dataclass(frozen=True)
class TextDataset:
    """A named dataset: label names (index == label id) and its splits.

    Every split that has rows has text pairs, or none does (:attr:`pairs`)."""

    name: str
    labels: tuple[str, ...]
    splits: Mapping[str, Split]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))
        for split_name, split in self.splits.items():
            bad = [y for y in set(split.labels) if not 0 <= y < len(self.labels)]
            if bad:
                raise DataError(
                    f"dataset {self.name!r}, split {split_name!r}: label ids {sorted(bad)} "
                    f"are outside 0..{len(self.labels) - 1} ({len(self.labels)} labels)"
                )
        paired = {k: s.text_pairs is not None for k, s in self.splits.items() if len(s)}
        if len(set(paired.values())) > 1:
            raise DataError(
                f"dataset {self.name!r}: splits {[k for k, v in paired.items() if v]} have text "
                f"pairs and {[k for k, v in paired.items() if not v]} do not; give every split "
                "its pairs or none"
            )

    @property
    def pairs(self) -> bool:
        """Whether the rows are text pairs (``text_pairs`` set on the splits)."""
        return any(s.text_pairs is not None for s in self.splits.values())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"TextDataset({self.name!r}, {len(self.labels)} labels, {sizes})"

    def split(self, name: str) -> Split:
        """The split called ``name``; a DataError listing the available ones otherwise."""
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no {name!r} split; it has: "
                f"{', '.join(self.splits) or 'none'}" + did_you_mean(name, self.splits)
            )
        return self.splits[name]

    def label_id(self, name: str) -> int:
        """The id of label ``name``: ``data.label_id("spam") -> 1``."""
        try:
            return self.labels.index(name)
        except ValueError:
            raise DataError(
                f"dataset {self.name!r} has no label {name!r}; labels: {preview(self.labels)}"
                + did_you_mean(name, self.labels)
            ) from None


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Options:
    """What every reader and the assembly of splits share."""

    fields: Fields
    given: tuple[str, ...] | None  # the labels argument
    ratios: tuple[float, float, float]
    seed: int
    need_train: bool


def _loadable(path: Path) -> bool:
    """A data file, or a folder holding one (what a mistyped data path may have meant)."""
    data = (*SUFFIXES, ".json")
    try:
        if path.is_dir():
            return any(p.suffix in data for p in path.iterdir())
        return path.suffix in data
    except OSError:  # unreadable: not worth suggesting
        return False


def load_data(
    source: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    labels: Sequence[str] | None = None,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_rows: int | None = None,
    sample: str = "stratified",
    need_train: bool = True,
) -> TextDataset:
    """Load ``source`` as a :class:`TextDataset`.

    ``labels`` fixes the label order (ids); otherwise ``labels.json`` next to the files, the
    corpus's own order, or the sorted names found in the training rows. ``split_ratios``
    (train, validation, test) and ``seed`` carve the splits a source lacks: all three for a
    single file or packaged corpus, validation alone (from train) for a folder without one.
    ``text_pair_field``: None reads ``text_pair`` when every row of the first file has it,
    ``""`` never reads pairs, a name requires that field in every row. ``max_rows`` keeps N
    rows of each split: a seeded sample stratified by label (``sample="stratified"``) or the
    first N (``sample="first"``). ``need_train=False`` (scoring only: zero-shot, prediction)
    takes a folder without a train file and puts a single file whole into the test split
    (validation stays empty); every split is then present, those the source lacks empty. A
    packaged corpus is carved either way.

        >>> load_data("rows.jsonl", text_field="sentence")             # doctest: +SKIP
        >>> load_data("my_task/", labels=["negative", "positive"])     # doctest: +SKIP
        >>> load_data("test_only/", need_train=False).split("train")   # doctest: +SKIP
        Split(0 rows, 0 labels)
    """
    _check_sampling(max_rows, sample)
    if not isinstance(need_train, bool):
        raise ConfigError(f"need_train must be True or False; got {need_train!r}")
    if text_pair_field is None:  # found out from the rows
        fields = Fields(text_field, label_field, "text_pair", pair_optional=True)
    else:
        fields = Fields(text_field, label_field, text_pair_field or None)
    opts = _Options(
        fields, check_label_names(labels), _check_ratios(split_ratios), seed, need_train
    )
    if isinstance(source, str) and source.startswith("hub:"):
        data = _load_hub(source[4:], opts, explicit=True)
    elif isinstance(source, str) and source in CORPORA:
        data = _load_corpus(source, opts)
    else:
        data = _load_path(source, opts)
    if max_rows is None:
        return data
    return _sample(data, max_rows, sample, seed)


def _load_corpus(name: str, opts: _Options) -> TextDataset:
    named_pair = opts.fields.pair is not None and not opts.fields.pair_optional  # "" is none
    if opts.fields.text != "text" or opts.fields.label != "label" or named_pair:
        raise DataError(
            f"packaged corpus {name!r} has fixed fields; text_field, label_field and "
            "text_pair_field apply to files only"
        )
    table, order = read_corpus(name)
    origin = "the labels argument" if opts.given else f"packaged corpus {name!r}"
    return _assemble(name, {"train": table}, opts.given or order, origin, opts, carve=True)


def _load_path(source: str | Path, opts: _Options) -> TextDataset:
    path = Path(source).expanduser()
    if path.is_dir():
        files = split_files(path, opts.need_train)
        tables = {s: read_table(f, opts.fields) for s, f in files.items()}
        names, origin = opts.given, "the labels argument"
        if names is None and (path / "labels.json").is_file():
            names, origin = read_labels_json(path / "labels.json"), str(path / "labels.json")
        return _assemble(path.name, tables, names, origin, opts, carve=False)
    if path.is_file():
        table = read_table(path, opts.fields)
        if not opts.need_train:  # scored whole: nothing is held back for training
            log.info("%s: need_train=False: all %d rows are the test split", path, len(table.texts))
            return _assemble(path.stem, {"test": table}, opts.given, "the labels argument", opts)
        return _assemble(
            path.stem, {"train": table}, opts.given, "the labels argument", opts, carve=True
        )
    _refuse_missing(source, path)
    return _load_hub(str(source), opts, explicit=False)


def _refuse_missing(source: str | Path, path: Path) -> None:
    """A DataError for a local-looking ``source`` that does not exist (hub ids pass)."""
    text = str(source)
    looks_local = (
        path.suffix in (*SUFFIXES, ".json", ".txt")
        or text.startswith(("/", ".", "~"))
        or ("/" in text and Path(text.split("/")[0]).is_dir())  # "data/sst2" with ./data
    )
    if looks_local or not isinstance(source, str):
        near = ""
        if path.parent.is_dir():
            near = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if _loadable(p)])
        raise DataError(f"data file or folder does not exist: {path.resolve()}{near}")
    if did_you_mean(text, CORPORA) and "/" not in text:
        corpus_spec(text)  # raises: unknown packaged corpus, with the valid names


def _load_hub(hub_id: str, opts: _Options, *, explicit: bool) -> TextDataset:
    not_local = (
        f"hub dataset {hub_id!r}"
        if explicit
        else f"{hub_id!r} is not a packaged corpus ({', '.join(packaged_corpora())}) nor an "
        f"existing file or folder ({Path(hub_id).resolve()})"
    )
    tables, names = read_hub(hub_id, opts.fields, not_local, opts.need_train)
    origin = "the labels argument" if opts.given else f"hub:{hub_id} features"
    carve = set(tables) == {"train"}
    return _assemble(hub_id, tables, opts.given or names, origin, opts, carve=carve)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """``ratios`` as (train, validation, test): three numbers >= 0 summing to 1, train > 0."""
    valid = "three numbers >= 0 summing to 1 with train > 0, e.g. (0.8, 0.1, 0.1)"
    try:
        values = tuple(ratios)
    except TypeError:
        values = None
    if values is None or isinstance(ratios, str) or len(values) != 3:
        count = "" if values is None or isinstance(ratios, str) else f" ({len(values)} given)"
        raise ConfigError(
            f"split_ratios (data.split_ratios in a recipe) needs three numbers, (train, "
            f"validation, test){count}: {valid}; got {ratios!r}"
        )
    numbers = all(type(r) in (int, float) and math.isfinite(r) for r in values)
    if not numbers or min(values) < 0 or values[0] <= 0 or abs(sum(values) - 1.0) > 1e-6:
        total = f" (they sum to {sum(values):g})" if numbers else ""
        raise ConfigError(
            f"split_ratios (data.split_ratios in a recipe) must be (train, validation, test): "
            f"{valid}; got {values!r}{total}"
        )
    return float(values[0]), float(values[1]), float(values[2])


def _check_sampling(max_rows: int | None, sample: str) -> None:
    if max_rows is not None and (type(max_rows) is not int or max_rows < 1):
        raise ConfigError(
            "max_rows (data.max_rows in a recipe) must be a positive integer (rows kept per "
            f"split) or None for every row; got {max_rows!r}"
        )
    if sample not in SAMPLES:
        raise ConfigError(
            f"sample (data.sample in a recipe) must be one of {', '.join(SAMPLES)}; "
            f"got {sample!r}" + did_you_mean(str(sample), SAMPLES)
        )


# ---------------------------------------------------------------------------- labels, splits


def _assemble(name, tables, names, origin, opts: _Options, carve=False) -> TextDataset:
    """Label ids for every table, then the splits a source lacks: carved from train, or
    (``need_train=False``, no train) left empty."""
    if not _first(tables).texts:
        raise DataError(f"{_first(tables).where} has no rows")
    tables = _resolve_pairs(tables, opts.fields)
    inferred = names is None
    if inferred:
        _refuse_mixed_label_kinds(tables)
        names, origin = _infer_labels(tables)
    splits = {s: _split_of(name, s, t, names, origin, inferred) for s, t in tables.items()}
    _check_label_coverage(splits, names, origin, inferred, opts.need_train)
    if carve:
        splits = _carve(splits["train"], opts.ratios, opts.seed)
    elif "validation" not in splits and "train" in splits:
        splits.update(_carve_validation(name, splits["train"], opts))
    if not opts.need_train:  # every split present, the missing ones empty
        pairs = () if any(s.text_pairs is not None for s in splits.values()) else None
        for s in SPLITS:
            origin = f"the {s} split of {name!r} (the source has none)"
            splits.setdefault(s, Split((), (), pairs, origin=origin))
    for s in [s for s in SPLITS if s in splits and not len(splits[s]) and opts.need_train]:
        log.info("%s: the %s split is empty; leaving it out", name, s)
        del splits[s]
    return TextDataset(name, names, {s: splits[s] for s in SPLITS if s in splits})


def _first(tables: Mapping[str, RawTable]) -> RawTable:
    """The table that decides (pairs, inferred labels): train, else the first with rows."""
    if "train" in tables:
        return tables["train"]
    return next((t for t in tables.values() if t.texts), next(iter(tables.values())))


def _split_of(name, split: str, table: RawTable, names, origin, inferred: bool) -> Split:
    ids = _label_ids(table, names, origin, inferred)
    where = f"the {split} split of {name!r} ({table.where})"
    pairs = None if table.pairs is None else tuple(str(p) for p in table.pairs)
    return Split(tuple(table.texts), ids, pairs, origin=where)


def _carve_validation(name: str, train: Split, opts: _Options) -> dict[str, Split]:
    frac = opts.ratios[1] / (opts.ratios[0] + opts.ratios[1])
    carved = _carve(train, (1 - frac, frac, 0.0), opts.seed)
    log.info(
        "%s: no validation file; carved %d of %d training rows as validation (seed %d)",
        name,
        len(carved["validation"]),
        len(train),
        opts.seed,
    )
    return {"train": carved["train"], "validation": carved["validation"]}


def _resolve_pairs(tables: dict[str, RawTable], fields: Fields) -> dict[str, RawTable]:
    """With ``text_pair_field`` unset: pairs for every split when every row of the first
    table has one, no pairs otherwise."""
    if not fields.pair_optional:
        return tables
    first = _first(tables)
    pairs = first.pairs or []
    have = sum(p is not None for p in pairs)
    if not pairs or have < len(pairs):
        if have:
            line = next(n for p, n in zip(pairs, first.lines, strict=True) if p is None)
            log.warning(
                "%s: %d of %d rows carry %r (line %d has none): not using pairs; set "
                "text_pair_field=%r to require them, or text_pair_field='' to ignore them",
                first.where, have, len(pairs), fields.pair, line, fields.pair,
            )  # fmt: skip
        return {s: replace(t, pairs=None) for s, t in tables.items()}
    log.info(
        "%s: rows carry %r: training on text pairs (text_pair_field='' leaves them out)",
        first.where,
        fields.pair,
    )
    for table in tables.values():
        gap = next((n for p, n in zip(table.pairs or [], table.lines, strict=True) if p is None), 0)
        if gap:
            raise DataError(
                f"{table.where}, line {gap}: no field {fields.pair!r}, though every row of "
                f"{first.where} has one and pairs are used for every split; add it, or set "
                "text_pair_field='' to leave the pairs out"
            )
    return tables


def _infer_labels(tables: Mapping[str, RawTable]) -> tuple[tuple[str, ...], str]:
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


def _refuse_mixed_label_kinds(tables: Mapping[str, RawTable]) -> None:
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


def _check_label_coverage(splits, names, origin, inferred: bool, need_train: bool) -> None:
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


def _label_ids(table: RawTable, names, origin: str, inferred: bool) -> tuple[int, ...]:
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


def _key(seed: int, purpose: str, index: int) -> bytes:
    """A sort key that is the same on every machine: sha256 of (seed, purpose, row)."""
    return hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()


def _carve(split: Split, ratios: Sequence[float], seed: int) -> dict[str, Split]:
    """Stratified seeded split into train/validation/test (rows shuffled within each)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(split.labels):
        by_class[y].append(i)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for y in sorted(by_class):
        rows = sorted(by_class[y], key=lambda i: _key(seed, "split", i))
        n = len(rows)
        n_test = int(n * ratios[2] + 0.5)
        n_val = min(int(n * ratios[1] + 0.5), max(n - n_test - 1, 0))
        n_test = min(n_test, n - 1)
        parts["test"] += rows[:n_test]
        parts["validation"] += rows[n_test : n_test + n_val]
        parts["train"] += rows[n_test + n_val :]
    return {
        s: replace(
            split.subset(sorted(rows, key=lambda i: _key(seed, "order", i))),
            origin=f"the {s} split carved from {split.origin or 'the rows'}",
        )
        for s, rows in parts.items()
    }


# ---------------------------------------------------------------------------- max_rows


def _sample(data: TextDataset, n: int, how: str, seed: int) -> TextDataset:
    """``n`` rows of each split (``how``: "stratified" or "first"), and a log line per split
    saying what was kept."""
    kept = {}
    for name, split in data.splits.items():
        if len(split) <= n:
            kept[name] = split
            continue
        rows = range(n) if how == "first" else stratified_rows(split.labels, n, seed)
        kept[name] = split.subset(rows)
        before, after = set(split.labels), set(kept[name].labels)
        lost = [data.labels[y] for y in sorted(before - after)]
        log.info(
            "%s: max_rows=%d (%s, seed %d): kept %d of %d %s rows, %d of the %d labels present%s",
            data.name, n, how, seed, n, len(split), name, len(after), len(before),
            f" (left out: {preview(lost)})" if lost else "",
        )  # fmt: skip
    return TextDataset(data.name, data.labels, kept)


def stratified_rows(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Indices of ``n`` of ``labels``' rows, in their order, stratified by label and chosen by
    ``seed`` (sha256-keyed): one row of each label first when ``n`` allows, the rest in
    proportion to each label's remaining rows (largest remainders; ties by the seed).

        >>> stratified_rows([0, 0, 0, 0, 1, 1, 2], 3, seed=0)   # one of each label
        [1, 4, 6]
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    if n >= len(labels):
        return list(range(len(labels)))
    quota = _quota({y: len(rows) for y, rows in by_class.items()}, n, seed)
    chosen = [
        i
        for y, rows in by_class.items()
        for i in sorted(rows, key=lambda i: _key(seed, "sample", i))[: quota[y]]
    ]
    return sorted(chosen)


def _quota(counts: Mapping[int, int], n: int, seed: int) -> dict[int, int]:
    """Rows to keep per label, ``n`` in all (``n`` < the rows counted)."""
    floor = 1 if n >= len(counts) else 0  # every label kept where n allows
    left = {y: c - floor for y, c in counts.items()}
    room, total = n - floor * len(counts), sum(left.values())
    quota = {y: room * c // total for y, c in left.items()}
    remainder = {y: room * c % total for y, c in left.items()}
    extra = room - sum(quota.values())  # < the labels with a remainder: each gets at most one
    ranked = sorted(counts, key=lambda y: (-remainder[y], _key(seed, "quota", y)))
    for y in ranked[:extra]:
        quota[y] += 1
    return {y: q + floor for y, q in quota.items()}


def few_shot(
    split: Split, k: int, seed: int = 0, *, label_names: Sequence[str] | None = None
) -> Split:
    """``k`` rows per class from ``split``, chosen by ``seed`` (same seed, same rows).

    Classes are those present in ``split``, or every label of ``label_names`` when given
    (which also names them in errors). The rows chosen for a smaller ``k`` are among those
    chosen for a larger one with the same seed. Rows come back in a seeded shuffled order.

        >>> train = Split(("a", "b", "c", "d", "e"), (0, 0, 1, 1, 1))
        >>> len(few_shot(train, k=2, seed=3))
        4
        >>> # few_shot(data.split("train"), 8, seed=1, label_names=data.labels)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"few_shot: k must be a positive integer (examples per class); got {k!r}")
    if not len(split):
        raise DataError(
            f"few_shot: {split.origin or 'the split given'} is empty, so there are no rows to "
            f"draw k={k} examples per class from; use a source with training rows (a train "
            "file), or ask for no demonstrations"
        )
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(split.labels):
        by_class[y].append(i)
    classes = range(len(label_names)) if label_names is not None else sorted(by_class)
    short = [y for y in classes if len(by_class[y]) < k]
    if short:
        name = (lambda y: repr(label_names[y])) if label_names is not None else str
        counts = [f"{name(y)}: {len(by_class[y])}" for y in classes]
        raise DataError(
            f"few_shot: asked for k={k} examples per class, but class {name(short[0])} has "
            f"only {len(by_class[short[0]])} in this split (per class: {preview(counts, 20)})"
        )
    chosen = [
        i for y in classes for i in sorted(by_class[y], key=lambda i: _key(seed, "shot", i))[:k]
    ]
    return split.subset(sorted(chosen, key=lambda i: _key(seed, "shot-order", i)))
