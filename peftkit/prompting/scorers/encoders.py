"""Encoder scorers: embedding similarity, NLI entailment, masked-LM filling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from peftkit.adapters.model import body_of, eval_mode, pool
from peftkit.errors import ConfigError, DataError, ModelError
from peftkit.prompting.demonstrations import Demo, fit_prompts
from peftkit.prompting.scorers.common import (
    AGGREGATIONS,
    LabelScores,
    aggregate_phrases,
    check_choice,
    context_length,
    count_long,
    device_of,
    has_lm_head,
    label_phrases,
    log_softmax,
    pad_rows,
    phrase_ids,
    warn_cut,
)
from peftkit.prompting.templates import Prompt, Template, Verbalizer


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    text_pairs: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings ``(n, hidden)`` from an encoder's last layer.

    ``text_pairs`` are encoded as the tokenizer's second sequence, as training and the
    served adapters encode pairs."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(text_pairs)} text_pairs")
    body = body_of(model)
    limit = context_length(model, tokenizer, max_length)
    chunks = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            end = start + batch_size
            args = [list(texts[start:end])]
            if text_pairs is not None:
                args.append(list(text_pairs[start:end]))
            enc = tokenizer(
                *args,
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            enc = {k: v.to(device_of(model)) for k, v in enc.items()}
            hidden = body(**enc).last_hidden_state.float()
            pooled = pool(hidden, enc["attention_mask"], "mean")
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def score_embedding(
    model,
    tokenizer,
    texts: Sequence[str],
    verbalizer: Verbalizer,
    *,
    labels: Sequence[str] | None = None,
    temperature: float = 0.05,
    batch_size: int = 32,
    max_length: int | None = None,
) -> LabelScores:
    """log softmax(cosine(text, label) / temperature) over the labels.

    A label's embedding is the normalized mean of its phrases' embeddings (stripped).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}")
    verbalizer = verbalizer.for_labels(labels)
    owner, phrases = label_phrases(verbalizer)
    phrase_vecs = embed_texts(model, tokenizer, [p.strip() for p in phrases], batch_size=batch_size)
    label_vecs = np.stack([phrase_vecs[owner == i].mean(0) for i in range(len(verbalizer.labels))])
    label_vecs /= np.maximum(np.linalg.norm(label_vecs, axis=1, keepdims=True), 1e-12)
    text_vecs = embed_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    logits = text_vecs @ label_vecs.T / temperature
    cut = count_long(tokenizer, texts, context_length(model, tokenizer, max_length))
    return LabelScores(verbalizer.labels, log_softmax(logits), cut)


def score_nli(
    model,
    tokenizer,
    texts: Sequence[str],
    verbalizer: Verbalizer,
    *,
    labels: Sequence[str] | None = None,
    hypothesis: str = "This example is {label}.",
    aggregate: str = "logsumexp",
    batch_size: int = 16,
    max_length: int | None = None,
) -> LabelScores:
    """Zero-shot by entailment: each text is the premise, ``hypothesis`` names a label.

    The model's ``config.id2label`` must have an entailment class; scores are the log
    softmax over labels of the entailment logits (the usual single-label NLI recipe).
    """
    check_choice("aggregate", aggregate, AGGREGATIONS)
    if "{label}" not in hypothesis:
        raise ConfigError(f"hypothesis must contain {{label}}; got {hypothesis!r}")
    id2label = getattr(model.config, "id2label", {}) or {}
    entail = [int(i) for i, name in id2label.items() if str(name).lower().startswith("entail")]
    if not entail:
        raise ModelError(
            "score_nli needs an NLI model whose config.id2label has an 'entailment' class; "
            f"this one has {dict(id2label)}"
        )
    verbalizer = verbalizer.for_labels(labels)
    owner, phrases = label_phrases(verbalizer)
    hyps = [hypothesis.replace("{label}", p.strip()) for p in phrases]
    pairs = [(t, h) for t in texts for h in hyps]
    limit = context_length(model, tokenizer, max_length)
    logits = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tokenizer(
                [premise for premise, _ in chunk],
                [hyp for _, hyp in chunk],
                padding=True,
                truncation="only_first",
                max_length=limit,
                return_tensors="pt",
            )
            out = model(**{k: v.to(device_of(model)) for k, v in enc.items()}).logits
            logits.append(out[:, entail[0]].float().cpu().numpy())
    per_phrase = (
        np.concatenate(logits).reshape(len(texts), len(hyps)) if pairs else np.zeros((0, len(hyps)))
    )
    scores = aggregate_phrases(per_phrase, owner, len(verbalizer.labels), aggregate)
    lengths = tokenizer(list(texts), [hyps[0]] * len(texts))["input_ids"] if texts else []
    return LabelScores(verbalizer.labels, log_softmax(scores), sum(len(x) > limit for x in lengths))


def score_masked_lm(
    model,
    tokenizer,
    prompt: Prompt,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
    demos: Sequence[Demo] | Sequence[Sequence[Demo]] | None = None,
    normalize: str = "sum",
    aggregate: str = "logsumexp",
    batch_size: int = 16,
    max_length: int | None = None,
) -> LabelScores:
    """Fill the template's mask (``{mask}`` or the tokenizer's mask token) with label words.

    A label word of n tokens is scored at n consecutive masks (the sum of each token's
    log-prob; ``normalize="mean"`` divides by n).
    """
    check_choice("normalize", normalize, ("sum", "mean"))
    if not has_lm_head(model):
        raise ModelError(
            f"score_masked_lm needs a model with a masked-LM head (AutoModelForMaskedLM); "
            f"this {type(model).__name__} has none (a head-less encoder: use score_embedding)"
        )
    mask_token = getattr(tokenizer, "mask_token", None)
    if not mask_token:
        raise ModelError("score_masked_lm needs a tokenizer with a mask token; this one has none")
    template = prompt.template
    if not template.uses_mask:
        if mask_token not in template.text:
            raise ConfigError(
                f"template {prompt.name!r} has no mask: add {{mask}} (or {mask_token}) where "
                "the label word goes"
            )
        text = template.text.replace(mask_token, "{mask}")
        template = Template(text, template.name, template.domain)
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = phrase_ids(tokenizer, verbalizer)
    clean = [t.replace(mask_token, " ") for t in texts]
    pairs = None if text_pairs is None else [t.replace(mask_token, " ") for t in text_pairs]
    limit = context_length(model, tokenizer, max_length)
    per_phrase = np.zeros((len(texts), len(cont_ids)))
    cut = 0
    for n in sorted({len(c) for c in cont_ids}):
        fitted = fit_prompts(
            tokenizer,
            Prompt(template, verbalizer),
            clean,
            pairs,
            budget=limit,
            demos=demos,
            mask=mask_token * n,
        )
        cut = max(cut, fitted.truncated)
        cols = [j for j, c in enumerate(cont_ids) if len(c) == n]
        targets = torch.tensor([cont_ids[j] for j in cols])  # (n_cols, n)
        per_phrase[:, cols] = _mask_logprobs(model, tokenizer, fitted.ids, targets, batch_size)
    warn_cut(cut, len(texts), limit)
    if normalize == "mean":
        per_phrase = per_phrase / np.array([len(c) for c in cont_ids])
    return LabelScores(
        verbalizer.labels,
        aggregate_phrases(per_phrase, owner, len(verbalizer.labels), aggregate),
        cut,
    )


def _mask_logprobs(model, tokenizer, ids, targets: torch.Tensor, batch_size: int) -> np.ndarray:
    """Sum over the last n masks of log P(target token) for each (example, target row)."""
    n = targets.shape[1]
    out = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            x, mask = pad_rows(
                rows, device_of(model), left=False, pad_id=tokenizer.pad_token_id or 0
            )
            is_mask = x == tokenizer.mask_token_id
            if (is_mask.sum(1) < n).any():
                raise DataError("a prompt lost its mask tokens while being tokenized")
            pos = torch.stack([torch.nonzero(row)[-n:, 0] for row in is_mask])  # (b, n)
            logits = model(input_ids=x, attention_mask=mask).logits
            at = logits[torch.arange(len(rows))[:, None], pos].float().log_softmax(-1).cpu()
            out.append(at[:, torch.arange(n)[None, :], targets].sum(-1).numpy())  # (b, n_cols)
    return np.concatenate(out)
