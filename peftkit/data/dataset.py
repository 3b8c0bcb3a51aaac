"""The loaded data: a :class:`Split` (texts, label ids, optional second texts) and a
:class:`TextDataset` (label names and its splits), both frozen and checked on construction.

    >>> train = Split(("good", "bad", "fine"), (1, 0, 1))
    >>> data = TextDataset("toy", ("neg", "pos"), {"train": train})
    >>> data.label_id("pos"), len(data.split("train"))
    (1, 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from peftkit.errors import DataError, did_you_mean

__all__ = ["SPLITS", "Split", "TextDataset", "not_utf8", "preview"]


SPLITS = ("train", "validation", "test")


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


def preview(items: Sequence[str], n: int = 10) -> str:
    """``a, b, c`` -- or the first ``n`` and how many there are in all (for messages)."""
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def not_utf8(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8, or None when it can. Only a lone surrogate
    has no UTF-8 form (bytes that were not UTF-8 in argv or stdin, or a ``\\ud800`` escape in
    JSON); no tokenizer takes one, and no answer could echo it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid UTF-8 text (a lone surrogate at character {exc.start})"
    return None
