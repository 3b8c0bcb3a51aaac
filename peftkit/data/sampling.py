"""Seeded choices of rows: carving splits, ``max_rows`` samples, few-shot draws.

Every choice sorts rows by a sha256 key of (seed, purpose, row), never by ``hash()`` or global
random state, so the same seed picks the same rows on every machine and Python version.

    >>> stratified_rows([0, 0, 0, 0, 1, 1, 2], 3, seed=0)   # one row of each label
    [1, 4, 6]
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

from peftkit.data.dataset import SPLITS, Split, TextDataset, preview
from peftkit.errors import ConfigError, DataError, did_you_mean

__all__ = ["SAMPLES", "carve_splits", "check_sampling", "few_shot", "keep_rows", "stratified_rows"]

log = logging.getLogger(__name__)


SAMPLES = ("stratified", "first")  # how max_rows chooses its rows


def row_key(seed: int, purpose: str, index: int) -> bytes:
    """A sort key that is the same on every machine: sha256 of (seed, purpose, row)."""
    return hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()


def carve_splits(split: Split, ratios: Sequence[float], seed: int) -> dict[str, Split]:
    """Stratified seeded split into train/validation/test (rows shuffled within each)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(split.labels):
        by_class[y].append(i)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for y in sorted(by_class):
        rows = sorted(by_class[y], key=lambda i: row_key(seed, "split", i))
        n = len(rows)
        n_test = int(n * ratios[2] + 0.5)
        n_val = min(int(n * ratios[1] + 0.5), max(n - n_test - 1, 0))
        n_test = min(n_test, n - 1)
        parts["test"] += rows[:n_test]
        parts["validation"] += rows[n_test : n_test + n_val]
        parts["train"] += rows[n_test + n_val :]
    return {
        s: replace(
            split.subset(sorted(rows, key=lambda i: row_key(seed, "order", i))),
            origin=f"the {s} split carved from {split.origin or 'the rows'}",
        )
        for s, rows in parts.items()
    }


def check_sampling(max_rows: int | None, sample: str) -> None:
    """Refuse a ``max_rows`` that is not a positive int (or None) and an unknown ``sample``."""
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


def keep_rows(data: TextDataset, n: int, how: str, seed: int) -> TextDataset:
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
        for i in sorted(rows, key=lambda i: row_key(seed, "sample", i))[: quota[y]]
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
    ranked = sorted(counts, key=lambda y: (-remainder[y], row_key(seed, "quota", y)))
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
        i for y in classes for i in sorted(by_class[y], key=lambda i: row_key(seed, "shot", i))[:k]
    ]
    return split.subset(sorted(chosen, key=lambda i: row_key(seed, "shot-order", i)))
