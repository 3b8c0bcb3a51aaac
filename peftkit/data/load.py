"""Text-classification data: one loader for every source, seeded splits, a few-shot sampler.

:func:`load_data` reads

- a packaged real corpus by name (``bbc-news``, ``tweets-sentiment``, ``sms-spam``; see
  :mod:`peftkit.data.corpora`);
- a folder holding ``train``, ``validation`` (or ``valid``/``dev``) and ``test`` files,
  each ``.jsonl``, ``.csv`` or ``.tsv``, plus an optional ``labels.json`` (a JSON list of
  label names whose order gives the label ids);
- a single ``.jsonl``/``.csv``/``.tsv`` file, split into train/validation/test;
- a Hugging Face hub dataset, ``"hub:<id>"`` (needs ``datasets`` and a network).

The readers live in :mod:`~peftkit.data.files`, :mod:`~peftkit.data.corpora` and
:mod:`~peftkit.data.hub`, the label rules in :mod:`~peftkit.data.labels`, the seeded choices
of rows in :mod:`~peftkit.data.sampling`; this module puts a source's tables together.

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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from peftkit.data.corpora import CORPORA, corpus_spec, packaged_corpora, read_corpus
from peftkit.data.dataset import SPLITS, Split, TextDataset
from peftkit.data.files import (
    SUFFIXES,
    Fields,
    RawTable,
    read_labels_json,
    read_table,
    split_files,
)
from peftkit.data.hub import read_hub
from peftkit.data.labels import (
    check_label_coverage,
    check_label_names,
    infer_labels,
    label_ids,
    refuse_mixed_label_kinds,
)
from peftkit.data.sampling import (
    SAMPLES,
    carve_splits,
    check_sampling,
    few_shot,
    keep_rows,
    stratified_rows,
)
from peftkit.errors import ConfigError, DataError, did_you_mean

# SAMPLES, Split, few_shot and stratified_rows live apart; their old path keeps working.
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
    check_sampling(max_rows, sample)
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
    return keep_rows(data, max_rows, sample, seed)


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


def _assemble(name, tables, names, origin, opts: _Options, carve=False) -> TextDataset:
    """Label ids for every table, then the splits a source lacks: carved from train, or
    (``need_train=False``, no train) left empty."""
    if not _first(tables).texts:
        raise DataError(f"{_first(tables).where} has no rows")
    tables = _resolve_pairs(tables, opts.fields)
    inferred = names is None
    if inferred:
        refuse_mixed_label_kinds(tables)
        names, origin = infer_labels(tables)
    splits = {s: _split_of(name, s, t, names, origin, inferred) for s, t in tables.items()}
    check_label_coverage(splits, names, origin, inferred, opts.need_train)
    if carve:
        splits = carve_splits(splits["train"], opts.ratios, opts.seed)
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
    ids = label_ids(table, names, origin, inferred)
    where = f"the {split} split of {name!r} ({table.where})"
    pairs = None if table.pairs is None else tuple(str(p) for p in table.pairs)
    return Split(tuple(table.texts), ids, pairs, origin=where)


def _carve_validation(name: str, train: Split, opts: _Options) -> dict[str, Split]:
    frac = opts.ratios[1] / (opts.ratios[0] + opts.ratios[1])
    carved = carve_splits(train, (1 - frac, frac, 0.0), opts.seed)
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
