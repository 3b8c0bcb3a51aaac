"""Tokenize once, batch by length: the input side of training and prediction.

Rows of similar length go together (less padding, faster steps on CPU), yet the order is
random: each epoch shuffles with ``Random(seed + epoch)``, sorts within windows of
``window`` batches, then shuffles the batches. The same seed gives the same batches on
every machine, which is what makes resume-after-kill exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Encoded:
    """Token ids per row (no padding) and the label ids."""

    ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    truncated: int  # how many rows were cut to max_length

    def __len__(self) -> int:
        return len(self.ids)


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    text_pairs: Sequence[str] | None = None,
    *,
    keep_end: bool = False,
) -> Encoded:
    """Tokenize ``texts`` (and pairs) once, truncated to ``max_length`` tokens.

    ``keep_end`` cuts long rows from the left instead, keeping a prompt's final words
    (where a verbalizer reads the answer) intact.
    """
    args: list[Any] = [list(texts)] if text_pairs is None else [list(texts), list(text_pairs)]
    rows = list(tokenizer(*args, truncation=False, verbose=False)["input_ids"])
    long = [i for i, r in enumerate(rows) if len(r) > max_length]
    if long and keep_end:
        for i in long:
            rows[i] = rows[i][-max_length:]
    elif long:  # re-tokenize only the long rows, letting the tokenizer keep special tokens
        sub = [[a[i] for i in long] for a in args]
        cut = tokenizer(*sub, truncation=True, max_length=max_length)["input_ids"]
        for i, r in zip(long, cut, strict=True):
            rows[i] = r
    ids = tuple(tuple(r) for r in rows)
    truncated = len(long)
    return Encoded(ids=ids, labels=tuple(int(y) for y in labels), truncated=truncated)


# position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids),
# so pad_token_id + 1 rows of the position table are never a token's
PADDING_OFFSET_TYPES = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "longformer",
    "data2vec-text",
    "roberta-prelayernorm",
    "xmod",
    "mpnet",
    "ibert",
)


def position_limit(config: Any) -> int | None:
    """The most tokens one row can have on a model of ``config``: its position table
    (``max_position_embeddings``, GPT-2's ``n_positions``, MPT's ``max_seq_len``) less what
    RoBERTa-style models reserve; None when the config names no limit (ALiBi, relative).

    >>> from transformers import BertConfig, RobertaConfig
    >>> position_limit(BertConfig()), position_limit(RobertaConfig(max_position_embeddings=514))
    (512, 512)
    """
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and limit > 0:
            break
    else:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        pad = getattr(config, "pad_token_id", None)
        limit -= (1 if pad is None else int(pad)) + 1
    return limit


def apply_template(
    template: str | None, texts: Sequence[str], text_pairs: Sequence[str] | None = None
) -> list[str]:
    """Format each text into ``template`` (fields ``{text}`` and ``{text_pair}``)."""
    if template is None:
        return list(texts)
    pairs = text_pairs if text_pairs is not None else [""] * len(texts)
    return [
        template.replace("{text}", t).replace("{text_pair}", p)
        for t, p in zip(texts, pairs, strict=True)
    ]


def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    window: int = 50,
    shuffle: bool = True,
) -> list[list[int]]:
    """Index batches of similar length; deterministic in (seed, epoch)."""
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed * 100_003 + epoch)
    rng.shuffle(order)
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def padding_batches(
    lengths: Sequence[int], batch_size: int, *, max_padding: float = 0.2
) -> list[list[int]]:
    """Inference batches: rows sorted by length, cut at ``batch_size`` rows or where one
    more row would make over ``max_padding`` of the batch's tokens padding. Rows of very
    different lengths then never pad each other out.

    >>> padding_batches([5, 60, 6, 58, 7], 4)
    [[0, 2, 4], [3, 1]]
    >>> padding_batches([5, 60, 6, 58, 7, 5, 6, 5], 8)
    [[0, 5, 7, 2, 6, 4], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        if batch and (
            len(batch) >= batch_size or 1 - (tokens + n) / ((len(batch) + 1) * n) > max_padding
        ):
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        batches.append(batch)
    return batches


def collate(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad ``rows`` into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)
