"""What every scorer shares: :class:`LabelScores`, the context length, small checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peftkit.errors import ConfigError, ModelError
from peftkit.prompting.templates import Verbalizer

log = logging.getLogger("peftkit.prompting.scorers")
NORMALIZATIONS = ("sum", "mean", "pmi")
AGGREGATIONS = ("logsumexp", "max", "mean")


@dataclass(frozen=True)
class LabelScores:
    """Scores of every (example, label): ``logprobs`` is ``(n_examples, n_labels)``."""

    labels: tuple[str, ...]
    logprobs: np.ndarray
    truncated: int = 0  # inputs whose text was cut to fit the context

    @property
    def probs(self) -> np.ndarray:
        """Softmax over the labels of each row."""
        z = self.logprobs - self.logprobs.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    @property
    def predictions(self) -> np.ndarray:
        """Index of the best label per example."""
        return self.logprobs.argmax(axis=1)

    @property
    def predicted_labels(self) -> list[str]:
        return [self.labels[i] for i in self.predictions]


def context_length(model, tokenizer=None, max_length: int | None = None) -> int:
    """Tokens the model takes: ``max_length``, else its config's, capped by the tokenizer's."""
    if max_length is not None:
        return int(max_length)
    config = getattr(model, "config", None)
    sizes = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx")]
    found = [int(s) for s in sizes if isinstance(s, int) and s > 0]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        found.append(limit)
    if not found:
        raise ModelError("cannot tell the model's context length; pass max_length=")
    return min(found)


def label_phrases(verbalizer: Verbalizer) -> tuple[np.ndarray, list[str]]:
    pairs = [(i, p) for i, label in enumerate(verbalizer.labels) for p in verbalizer.phrases(label)]
    return np.array([i for i, _ in pairs]), [p for _, p in pairs]


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def count_long(tokenizer, texts: Sequence[str], limit: int) -> int:
    return sum(len(ids) > limit for ids in tokenizer(list(texts))["input_ids"]) if texts else 0


def warn_cut(cut: int, total: int, budget: int) -> None:
    if cut:
        log.warning("%d of %d inputs were cut to fit the context (%d tokens)", cut, total, budget)


def check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{what} must be one of {', '.join(valid)}; got {value!r}")


def has_lm_head(model) -> bool:
    """Whether ``model`` maps hidden states to the vocabulary (a masked or causal LM)."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def continuation_ids(tokenizer, phrases: Sequence[str], owners: Sequence[str] | None = None):
    ids = tokenizer(list(phrases), add_special_tokens=False)["input_ids"]
    for k, (phrase, tokens) in enumerate(zip(phrases, ids, strict=True)):
        if not tokens:
            who = f" of label {owners[k]!r}" if owners else ""
            raise ConfigError(
                f"label words {phrase!r}{who} tokenize to nothing with this tokenizer; "
                "choose words it can spell"
            )
    return [list(t) for t in ids]


def phrase_ids(tokenizer, verbalizer: Verbalizer) -> tuple[np.ndarray, list[list[int]]]:
    """Flattened phrases: the label index of each, and its token ids."""
    owner, phrases = label_phrases(verbalizer)
    names = [verbalizer.labels[i] for i in owner]
    return owner, continuation_ids(tokenizer, phrases, names)


def aggregate_phrases(
    per_phrase: np.ndarray, owner: np.ndarray, n_labels: int, how: str
) -> np.ndarray:
    cols = []
    for label in range(n_labels):
        block = per_phrase[:, owner == label]
        if how == "max":
            cols.append(block.max(axis=1))
        elif how == "mean":
            cols.append(block.mean(axis=1))
        else:
            top = block.max(axis=1, keepdims=True)
            cols.append(top[:, 0] + np.log(np.exp(block - top).sum(axis=1)))
    return np.stack(cols, axis=1)


def pad_rows(seqs: list[list[int]], device, left: bool, pad_id: int = 0):
    """``(ids, attention_mask)``, padded on the left or the right."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[r, span] = torch.tensor(seq)
        mask[r, span] = 1
    return ids.to(device), mask.to(device)
