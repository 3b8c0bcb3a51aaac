"""Data fingerprints: what a registered adapter records of the rows it was trained on.

A split's fingerprint is the sha256 of its rows in order (text, second text, label name),
so the same rows give the same fingerprint on every machine, whatever the label ids::

    >>> from peftkit.data.dataset import Split
    >>> split_fingerprint(Split(("good", "bad"), (1, 0)), ("neg", "pos"))[:12]
    'f28f2c04e115'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from peftkit.data.dataset import Split, TextDataset

__all__ = ["data_fingerprints", "split_fingerprint"]


def split_fingerprint(split: Split, labels: Sequence[str]) -> str:
    """sha256 (24 hex digits) of ``split``'s rows: text, second text and label name each."""
    h = hashlib.sha256()
    pairs = split.text_pairs or (None,) * len(split)
    for text, pair, label in zip(split.texts, pairs, split.labels, strict=True):
        h.update(json.dumps([text, pair, labels[label]], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def data_fingerprints(data: TextDataset, train_split: Split | None = None) -> dict[str, str]:
    """``{split: fingerprint}`` for every split of ``data``; ``train_split`` (the rows
    training used: few-shot, say) stands for ``train`` when given."""
    splits = dict(data.splits)
    if train_split is not None:
        splits["train"] = train_split
    return {name: split_fingerprint(split, data.labels) for name, split in splits.items()}
