"""Contrastive few-shot training of the body (SetFit's recipe, inside peftkit's loop).

With k examples per class, training a classifier head end to end fits those k rows and
little else. SetFit (Tunstall et al., 2022) trains the *body* instead, on pairs of the
examples: the cosine of two texts' mean-pooled embeddings is pulled to 1 when they share a
label and to 0 when they do not (``CosineSimilarityLoss``), which moves texts of one class
together without a head to overfit. peftkit then describes each class by its prototype in
the trained body (``fewshot.prototype_head``: the mean of its examples plus the label
description prior) instead of SetFit's logistic regression.

``training.objective: contrastive`` selects it; the adapter is any body method (``full`` as
SetFit does, ``lora``, ...), and the head must be ``adapter.head_init: prototypes``; it is
not trained, but refitted on the current body at every evaluation and at the end::

    from peftkit.training.prototypes import Prototypes
    result = train(base, load_preset("full"), data,
                   TrainConfig(objective="contrastive", epochs=1, learning_rate=2e-5),
                   run_dir, head_init=Prototypes(support, data.labels, prompts))

Pairs follow SetFit 1.2's default ``sampling_strategy="oversampling"``: every unordered
pair of examples, a text with itself included, split into same-label and different-label
pairs; the smaller group is repeated until both are as large as the larger; the two are
interleaved. One epoch goes once over them. Where SetFit shuffles the pair list with a
fixed seed (42), peftkit uses ``training.seed``, so five seeds are five different runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from peftkit.errors import DataError

__all__ = ["contrastive_pairs", "cosine_pair_loss"]


def contrastive_pairs(labels: Sequence[int], seed: int = 0) -> list[tuple[int, int, float]]:
    """``(i, j, target)`` pairs over rows with ``labels``: 1.0 for a shared label, else 0.0.

    SetFit's oversampling: all pairs ``i <= j``, shuffled (``seed``), positives and
    negatives each brought to the larger group's size by cycling, then interleaved.
    """
    ys = list(labels)
    if len(set(ys)) < 2:
        raise DataError(
            f"contrastive training needs examples of at least 2 labels; got {len(ys)} rows "
            f"of {len(set(ys))} label(s)"
        )
    i, j = np.triu_indices(len(ys), 0)
    order = np.random.RandomState(seed).permutation(len(i))
    pos = [(int(i[o]), int(j[o]), 1.0) for o in order if ys[i[o]] == ys[j[o]]]
    neg = [(int(i[o]), int(j[o]), 0.0) for o in order if ys[i[o]] != ys[j[o]]]
    size = max(len(pos), len(neg))
    pairs: list[tuple[int, int, float]] = []
    for n in range(size):
        pairs.append(pos[n % len(pos)])
        pairs.append(neg[n % len(neg)])
    return pairs


def cosine_pair_loss(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor):
    """SetFit's ``CosineSimilarityLoss``: mean squared error between the cosine of each
    pair's pooled embeddings and its target (1 same label, 0 not)."""
    cos = torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1)
    return torch.nn.functional.mse_loss(cos, targets.float())
