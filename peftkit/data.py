"""Text-classification data: one loader for every source, seeded splits, a few-shot sampler.

:func:`load_data` reads

- a packaged real corpus by name (``bbc-news``, ``tweets-sentiment``, ``sms-spam``; see
  :mod:`peftkit.corpora`);
- a folder holding ``train``, ``validation`` (or ``valid``/``dev``) and ``test`` files,
  each ``.jsonl``, ``.csv`` or ``.tsv``, plus an optional ``labels.json`` (a JSON list of
  label names whose order gives the label ids);
- a single ``.jsonl``/``.csv``/``.tsv`` file, split into train/validation/test;
- a Hugging Face hub dataset, ``"hub:<id>"`` (needs ``datasets`` and a network).

Labels in files may be names (strings) or ids (integers into the label list). Splits are
carved where a source has none, stratified by label and seeded; the order is decided by
sha256 keys, not by ``hash()`` or global random state, so the same seed gives the same
rows on every machine and Python version. Nothing is written anywhere.

    >>> data = load_data("sms-spam", seed=0)
    >>> data.labels, len(data.split("train"))
    (('ham', 'spam'), 3628)
    >>> len(few_shot(data.split("train"), k=8, seed=1))   # 8 per class
    16
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from peftkit.corpora import (
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

__all__ = ["Split", "TextDataset", "load_data", "few_shot", "packaged_corpora", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """One split: texts, label ids (into :attr:`TextDataset.labels`), optional second texts."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    text_pairs: tuple[str, ...] | None = None

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
        return Split(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx), pairs)


@dataclass(frozen=True)
class TextDataset:
    """A named dataset: label names (index == label id) and its splits."""

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
) -> TextDataset:
    """Load ``source`` as a :class:`TextDataset`.

    ``labels`` fixes the label order (ids); otherwise ``labels.json`` next to the files, the
    corpus's own order, or the sorted names found in the training rows. ``split_ratios``
    (train, validation, test) and ``seed`` carve the splits a source lacks: all three for a
    single file or packaged corpus, validation alone (from train) for a folder without one.
    ``max_rows`` keeps the first N rows of each split (deterministic; for benchmarks).

        >>> load_data("rows.jsonl", text_field="sentence")             # doctest: +SKIP
        >>> load_data("my_task/", labels=["negative", "positive"])     # doctest: +SKIP
    """
    ratios = _check_ratios(split_ratios)
    if max_rows is not None and (type(max_rows) is not int or max_rows < 1):
        raise ConfigError(f"max_rows must be a positive integer or None; got {max_rows!r}")
    fields = Fields(text_field, label_field, text_pair_field)
    given = check_label_names(labels)
    if isinstance(source, str) and source.startswith("hub:"):
        data = _load_hub(source[4:], fields, given, ratios, seed, explicit=True)
    elif isinstance(source, str) and source in CORPORA:
        data = _load_corpus(source, fields, given, ratios, seed)
    else:
        data = _load_path(source, fields, given, ratios, seed)
    if max_rows is None:
        return data
    cut = {k: s.subset(range(min(max_rows, len(s)))) for k, s in data.splits.items()}
    return TextDataset(data.name, data.labels, cut)


def _load_corpus(name, fields, given, ratios, seed) -> TextDataset:
    if fields != Fields("text", "label", None):
        raise DataError(
            f"packaged corpus {name!r} has fixed fields; text_field, label_field and "
            "text_pair_field apply to files only"
        )
    table, order = read_corpus(name)
    origin = "the labels argument" if given else f"packaged corpus {name!r}"
    return _assemble(name, {"train": table}, given or order, origin, ratios, seed, True)


def _load_path(source, fields, given, ratios, seed) -> TextDataset:
    path = Path(source).expanduser()
    if path.is_dir():
        tables = {s: read_table(f, fields) for s, f in split_files(path).items()}
        names, origin = given, "the labels argument"
        if names is None and (path / "labels.json").is_file():
            names, origin = read_labels_json(path / "labels.json"), str(path / "labels.json")
        return _assemble(path.name, tables, names, origin, ratios, seed, False)
    if path.is_file():
        table = read_table(path, fields)
        return _assemble(
            path.stem, {"train": table}, given, "the labels argument", ratios, seed, True
        )
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
    return _load_hub(text, fields, given, ratios, seed, explicit=False)


def _load_hub(hub_id, fields, given, ratios, seed, *, explicit: bool) -> TextDataset:
    not_local = (
        f"hub dataset {hub_id!r}"
        if explicit
        else f"{hub_id!r} is not a packaged corpus ({', '.join(packaged_corpora())}) nor an "
        f"existing file or folder ({Path(hub_id).resolve()})"
    )
    tables, names = read_hub(hub_id, fields, not_local)
    origin = "the labels argument" if given else f"hub:{hub_id} features"
    return _assemble(hub_id, tables, given or names, origin, ratios, seed, len(tables) == 1)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    ok = len(ratios) == 3 and all(isinstance(r, (int, float)) and r >= 0 for r in ratios)
    if not ok or ratios[0] <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(
            "split_ratios must be (train, validation, test): three numbers >= 0 summing to 1, "
            f"train > 0; got {tuple(ratios)!r}"
        )
    return float(ratios[0]), float(ratios[1]), float(ratios[2])


# ---------------------------------------------------------------------------- labels, splits


def _assemble(name, tables, names, origin, ratios, seed, carve_all) -> TextDataset:
    """Label ids for every table, then the splits a source lacks, carved from train."""
    if not tables["train"].texts:
        raise DataError(f"{tables['train'].where} has no rows")
    if names is None:
        names, origin = _infer_labels(tables["train"]), f"training ({tables['train'].where})"
    splits = {
        s: Split(tuple(t.texts), _label_ids(t, names, origin), t.pairs) for s, t in tables.items()
    }
    if carve_all:
        splits = _carve(splits["train"], ratios, seed)
    elif "validation" not in splits:
        frac = ratios[1] / (ratios[0] + ratios[1])
        carved = _carve(splits["train"], (1 - frac, frac, 0.0), seed)
        splits["train"], splits["validation"] = carved["train"], carved["validation"]
        log.info(
            "%s: no validation file; carved %d of %d training rows as validation (seed %d)",
            name,
            len(carved["validation"]),
            len(tables["train"].texts),
            seed,
        )
    empty = [s for s in SPLITS if s in splits and not len(splits[s])]
    for s in empty:
        log.info("%s: the %s split is empty; leaving it out", name, s)
        del splits[s]
    return TextDataset(name, names, {s: splits[s] for s in SPLITS if s in splits})


def _infer_labels(train: RawTable) -> tuple[str, ...]:
    values = set()
    for raw, lineno in zip(train.raw, train.lines, strict=True):
        if not isinstance(raw, (str, int)) or isinstance(raw, bool):
            raise DataError(_bad_label_type(train.where, lineno, raw))
        values.add(raw)
    if all(isinstance(v, int) for v in values):
        return tuple(str(v) for v in sorted(values))
    return tuple(sorted({str(v) for v in values}))


def _label_ids(table: RawTable, names: tuple[str, ...], origin: str) -> tuple[int, ...]:
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
            _unknown_label(table, raw, lineno, names, origin)
        ids.append(found)
    return tuple(ids)


def _unknown_label(table, raw, lineno, names, origin) -> NoReturn:
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise DataError(_bad_label_type(table.where, lineno, raw))
    kind = "does not occur in" if origin.startswith("training") else "is not among the labels of"
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
        s: split.subset(sorted(rows, key=lambda i: _key(seed, "order", i)))
        for s, rows in parts.items()
    }


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
