"""Continual training's data: labels put in a parent adapter's order, and replay (rows of
earlier data mixed into a new training split).

    data = with_label_order(data, ("negative", "positive", "neutral"))   # the parent's first
    train = mix_replay(data.split("train"), data.labels, [("sst2", old, old_labels)],
                       share=0.2, seed=0)   # 20% of the rows in `train` are old ones

Replayed rows are chosen by sha256 keys of (seed, row) (see ``sampling.row_key``), so the
same seed replays the same rows on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from peftkit.data.dataset import Split, TextDataset, preview
from peftkit.data.sampling import row_key
from peftkit.errors import ConfigError

__all__ = ["map_labels", "mix_replay", "replay_rows", "with_label_order"]

log = logging.getLogger(__name__)


def map_labels(split: Split, labels: Sequence[str], onto: Sequence[str], where: str) -> Split:
    """``split`` (ids into ``labels``) with its ids into ``onto``, matched by name;
    ConfigError naming ``where`` and the labels ``onto`` lacks."""
    index = {name: i for i, name in enumerate(onto)}
    used = sorted({labels[y] for y in split.labels} - set(index))
    if used:
        raise ConfigError(
            f"{where}: labels {used} are not among the training data's ({preview(list(onto))}); "
            "replayed rows must have labels the new data has"
        )
    return replace(split, labels=tuple(index[labels[y]] for y in split.labels))


def with_label_order(data: TextDataset, order: Sequence[str]) -> TextDataset:
    """``data`` with its labels in ``order`` (the same names, another order) and every
    split's ids renumbered to match: a continued adapter keeps its parent's head rows."""
    order = tuple(order)
    if sorted(order) != sorted(data.labels):
        raise ConfigError(
            f"with_label_order: {list(order)} is not an ordering of {data.name!r}'s labels "
            f"{list(data.labels)}"
        )
    if order == data.labels:
        return data
    splits = {k: map_labels(s, data.labels, order, data.name) for k, s in data.splits.items()}
    return TextDataset(data.name, order, splits)


def replay_rows(n_new: int, share: float) -> int:
    """How many replayed rows make ``share`` of the final ``n_new + replayed`` rows."""
    if not 0 < share < 1:
        raise ConfigError(f"training.replay.share must be in (0, 1), got {share}")
    return round(share * n_new / (1 - share))


def mix_replay(
    train: Split,
    labels: Sequence[str],
    pools: Sequence[tuple[str, Split, Sequence[str]]],
    *,
    share: float,
    seed: int,
) -> Split:
    """``train`` followed by replayed rows drawn from ``pools`` (``(name, split, its
    labels)``, each mapped by label name onto ``labels``), so that ``share`` of the result's
    rows are replayed (:func:`replay_rows`). Each pool gives an equal part (the first ones
    one more when it does not divide); a pool smaller than its part gives every row, then
    again, in its seeded order."""
    if not pools:
        raise ConfigError("training.replay: there is no earlier data to replay")
    mapped = [
        (name, map_labels(s, lab, labels, f"replay source {name!r}")) for name, s, lab in pools
    ]
    for name, split in mapped:
        if not len(split):
            raise ConfigError(f"training.replay: source {name!r} has no training rows")
        if (split.text_pairs is None) != (train.text_pairs is None):
            raise ConfigError(
                f"training.replay: source {name!r} "
                f"{'has' if split.text_pairs is not None else 'lacks'} text pairs and the "
                "training data does not; replay rows of the same form"
            )
    n = replay_rows(len(train), share)
    parts = [n // len(mapped) + (i < n % len(mapped)) for i in range(len(mapped))]
    texts, ids = list(train.texts), list(train.labels)
    pairs = None if train.text_pairs is None else list(train.text_pairs)
    for (name, split), k in zip(mapped, parts, strict=True):
        purpose = f"replay:{name}"
        order = sorted(range(len(split)), key=lambda i: row_key(seed, purpose, i))  # noqa: B023
        if k > len(order):
            log.info(
                "replay source %r: %d rows for %d replayed; repeating them", name, len(order), k
            )
        chosen = [order[i % len(order)] for i in range(k)]
        texts += [split.texts[i] for i in chosen]
        ids += [split.labels[i] for i in chosen]
        if pairs is not None and split.text_pairs is not None:
            pairs += [split.text_pairs[i] for i in chosen]
    origin = f"{train.origin or 'the training rows'} + {n} replayed"
    return Split(tuple(texts), tuple(ids), None if pairs is None else tuple(pairs), origin=origin)
