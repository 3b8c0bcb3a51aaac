"""Few-shot classification on an encoder: label prototypes with a zero-shot prior.

With k examples per class a freshly initialized head has little to go on; an encoder
already places texts near descriptions of what they are about. The prototype head starts
from both: each label's weight row is the normalized mean of its k example embeddings
plus ``prior`` times the embedding of the label's description (a prompt set's
``descriptions``, or verbalizer words), and the head is a cosine head
(``Head(normalize=True)``) with temperature ``temperature``::

    from peftkit.data.load import few_shot
    from peftkit.training.prototypes import prototype_head
    from peftkit.prompting.templates import load_prompt_set

    support = few_shot(data.split("train"), k=8, seed=0, label_names=data.labels)
    head = prototype_head(base, support, data.labels, load_prompt_set("sentiment"))

The default ``prior=2`` was chosen on the SST-2 and AG News validation splits with the
shipped descriptions (k = 8 and 16, seeds 0-4; mean accuracy over the four settings:
77.5% at 2, 76.9% at 1; ``bench/bench_fewshot.py --split validation --prior P``).
``prior=0`` is a plain nearest-centroid classifier; with no examples (or a huge prior) it
is the zero-shot embedding scorer. The head is a ``probe`` adapter as it stands (save it
with ``artifacts.save_adapter``, register and serve it like any other), and a start for
training: ``train(base, spec, data, config, run_dir, head_init=head)`` fine-tunes the
body (LoRA, full, ...) from it, through the same few-shot sampler.

``Prototypes(support, labels, descriptions)`` is that head not yet built: ``train`` builds
it on the base, and with ``training.objective: contrastive`` (``peftkit.training.contrastive``:
SetFit's pair training of the body) rebuilds it on the trained body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from peftkit.adapters.model import Head, TaskModel, body_of
from peftkit.data.corpora import preview
from peftkit.data.load import Split
from peftkit.errors import ConfigError, DataError
from peftkit.prompting.templates import PromptSet, Verbalizer

Descriptions = PromptSet | Verbalizer | Mapping[str, str | Sequence[str]] | None

__all__ = [
    "Prototypes",
    "check_mean_pooling",
    "describe_labels",
    "label_embeddings",
    "prototype_head",
    "prototype_probe",
]


def describe_labels(
    descriptions: Descriptions, labels: Sequence[str], *, where: str | None = None
) -> dict[str, list[str]]:
    """Each label's description texts, checked against ``labels`` (no model needed: call it
    before loading one). A DataError names where the descriptions came from (``where``, e.g.
    ``"adapter.head_init.prompt: 'sentiment'"``; else the prompt set), the labels they lack,
    and the fallback: the label names themselves (``descriptions=None``).

        >>> describe_labels({"neg": "bad", "pos": ["good", "fun"]}, ["neg", "pos"])
        {'neg': ['bad'], 'pos': ['good', 'fun']}
    """
    if descriptions is None:
        return {lab: [lab] for lab in labels}
    if isinstance(descriptions, PromptSet):
        where = where or f"prompt set {descriptions.family!r} ({descriptions.source or 'built-in'})"
        descriptions = descriptions.describe()
    where = where or "the descriptions given"
    covered = descriptions.labels if isinstance(descriptions, Verbalizer) else list(descriptions)
    missing = [lab for lab in labels if lab not in covered]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DataError(
            f"the label descriptions from {where} have no entry for label(s) {shown} "
            f"({len(missing)} of the data's {len(labels)} labels; they describe: "
            f"{preview(list(covered))}); describe the labels by their "
            "names instead (descriptions=None; in a recipe adapter.head_init.prompt=null), or "
            "give descriptions of these labels"
        )
    if isinstance(descriptions, Verbalizer):
        verbalizer = descriptions.for_labels(labels, where=where)
        return {lab: [p.strip() for p in verbalizer.phrases(lab)] for lab in labels}
    out = {}
    for lab in labels:
        value = descriptions[lab]
        out[lab] = [value] if isinstance(value, str) else list(value)
        if not out[lab] or not all(isinstance(v, str) and v.strip() for v in out[lab]):
            raise DataError(f"{where}: descriptions of label {lab!r} must be non-empty strings")
    return out


def label_embeddings(
    base: Any,
    labels: Sequence[str],
    descriptions: Descriptions = None,
    *,
    where: str | None = None,
) -> np.ndarray:
    """``(n_labels, hidden)``: each label's descriptions embedded, averaged, normalized.

    ``descriptions``: a prompt set (its ``describe()``: the file's descriptions, else its
    first template's words), a verbalizer (its words), a mapping label -> text(s), or None
    (the label names themselves). ``where`` names their origin in errors (see
    :func:`describe_labels`).
    """
    from peftkit.prompting.scorers import embed_texts

    texts = describe_labels(descriptions, labels, where=where)
    rows = [embed_texts(base.model, base.tokenizer, texts[lab]).mean(0) for lab in labels]
    out = np.stack(rows)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def prototype_head(
    base: Any,
    support: Split,
    labels: Sequence[str],
    descriptions: Descriptions = None,
    *,
    prior: float = 2.0,
    temperature: float = 0.05,
    template: str | None = None,
    batch_size: int = 32,
    where: str | None = None,
) -> Head:
    """A cosine head whose rows are class prototypes of ``support`` (+ the label prior).

    ``support`` labels are ids into ``labels``; every label needs at least one example
    unless ``prior`` > 0 (then a label with none is its description alone). The examples
    are embedded as the classifier will see them: formatted by ``template`` (the one
    ``train`` is given), else with ``text_pairs`` as the tokenizer's second sequence.
    ``where`` names the descriptions' origin in errors (see :func:`describe_labels`).
    """
    from peftkit.data.batching import apply_template
    from peftkit.prompting.scorers import embed_texts

    _check_weights(prior, temperature)
    if prior > 0:  # before any embedding: a label without a description fails fast
        describe_labels(descriptions, labels, where=where)
    ys = np.asarray(support.labels)
    if len(ys) and (ys.min() < 0 or ys.max() >= len(labels)):
        raise DataError(f"support labels must be ids into the {len(labels)} labels")
    texts, pairs = list(support.texts), support.text_pairs
    if template is not None:
        texts, pairs = apply_template(template, texts, pairs), None
    feats = embed_texts(base.model, base.tokenizer, texts, text_pairs=pairs, batch_size=batch_size)
    hidden = _hidden(base)
    protos = np.zeros((len(labels), hidden))
    if prior > 0:
        protos += prior * label_embeddings(base, labels, descriptions, where=where)
    for c in range(len(labels)):
        rows = feats[ys == c]
        if len(rows):
            centroid = rows.mean(0)
            protos[c] += centroid / np.linalg.norm(centroid)
        elif prior == 0:
            raise DataError(f"label {labels[c]!r} has no support example (and prior=0)")
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    head = Head(hidden, len(labels), dropout=0.0, normalize=True)
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(protos / temperature, dtype=torch.float32))
        head.linear.bias.zero_()
    device = next(body_of(base.model).parameters()).device
    return head.to(device).eval()


@dataclass(frozen=True)
class Prototypes:
    """A prototype head to be built (and rebuilt) on a body: ``prototype_head``'s arguments
    but the base. ``train(..., head_init=Prototypes(...))`` builds it on the base to start
    from; with ``training.objective: contrastive``, which trains the body and not the
    head, it is rebuilt on the trained body at every evaluation and at the end. The
    descriptions are checked against the labels when it is made (no model needed)."""

    support: Split
    labels: tuple[str, ...]
    descriptions: Descriptions = None
    prior: float = 2.0
    temperature: float = 0.05
    template: str | None = None  # train() sets its own template here
    where: str | None = None  # where the descriptions came from, for errors

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        _check_weights(self.prior, self.temperature)
        if self.prior > 0:
            describe_labels(self.descriptions, self.labels, where=self.where)

    def head(self, model: Any, tokenizer: Any) -> Head:
        """The head on ``model``'s body as it is now (a base model or a ``TaskModel``)."""
        body = model.body if isinstance(model, TaskModel) else model
        on = SimpleNamespace(model=body, tokenizer=tokenizer)
        return prototype_head(
            on,
            self.support,
            self.labels,
            self.descriptions,
            prior=self.prior,
            temperature=self.temperature,
            template=self.template,
            where=self.where,
        )


def _check_weights(prior: float, temperature: float) -> None:
    if prior < 0:
        raise ConfigError(f"prior must be >= 0; got {prior}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}")


def check_mean_pooling(base: Any, spec: Any) -> None:
    """Refuse a prototype head on a model that pools otherwise (``embed_texts`` builds the
    prototypes from mean-pooled embeddings; a causal LM pools its last token)."""
    from peftkit.adapters.model import default_pooling

    pooling = spec.pooling
    if pooling == "auto":
        pooling = default_pooling(body_of(base.model).config)
    if pooling != "mean":
        raise ConfigError(
            f"adapter.head_init: prototypes are mean-pooled embeddings, but this model pools "
            f"{pooling!r}; use an encoder base or set adapter.pooling=mean"
        )


def prototype_probe(base: Any, head: Head) -> TaskModel:
    """The frozen base with ``head``: a ``probe`` TaskModel ready for ``save_adapter``."""
    body = body_of(base.model)
    for p in body.parameters():
        p.requires_grad_(False)
    return TaskModel(body, head, "mean")  # the pooling embed_texts built the prototypes with


def _hidden(base: Any) -> int:
    from peftkit.adapters.model import hidden_size

    return hidden_size(body_of(base.model).config)
