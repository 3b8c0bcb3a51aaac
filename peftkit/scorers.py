"""Zero- and few-shot scorers: label log-probabilities from a (model, tokenizer) pair.

- :func:`score_causal` — a causal LM's log P(label words | prompt). Each prompt runs
  through the model once; every label continuation is scored from its cached prefix.
- :func:`score_embedding` — cosine of mean-pooled encoder embeddings, text vs label.
- :func:`score_nli` — an NLI model's entailment of "This example is {label}.".
- :func:`score_masked_lm` — a masked LM's log-probability of the label words at the mask.

Each returns :class:`LabelScores`: log-probs per (example, label) as a numpy array, plus
predictions and how many inputs were cut to fit the context::

    from peftkit.prompts import load_prompt
    from peftkit.scorers import score_causal

    prompt = load_prompt("sentiment", "lm-eval-sst2")
    scores = score_causal(model, tokenizer, prompt, ["a charming journey ."], batch_size=16)
    scores.logprobs          # array (1, 2): log P(" negative" | prompt), log P(" positive" | ...)
    scores.predicted_labels  # ['positive']

Label words are tokenized on their own (without special tokens), so their tokens are the
same after every prompt; write a leading space where the model expects one (" positive").
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peftkit.adapters import body_of, pool
from peftkit.calibration import domain_pmi
from peftkit.demos import Demo, fit_prompts
from peftkit.errors import ConfigError, DataError, ModelError
from peftkit.prompts import Prompt, Template, Verbalizer

__all__ = [
    "LabelScores",
    "context_length",
    "continuation_logprobs",
    "domain_logprobs",
    "embed_texts",
    "naive_continuation_logprobs",
    "score_causal",
    "score_embedding",
    "score_masked_lm",
    "score_nli",
]

log = logging.getLogger(__name__)
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


# --- causal LM label likelihood ---------------------------------------------------------


def score_causal(
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
    max_rows: int = 256,
) -> LabelScores:
    """Classify ``texts`` by the log-likelihood of each label's words after the prompt.

    ``normalize``: ``"sum"`` (log P of the words), ``"mean"`` (per token) or ``"pmi"``
    (log P(words | prompt) - log P(words | template.domain_prompt())). A label with several
    phrases combines them by ``aggregate`` (``logsumexp`` = P of any of them). ``labels``
    (the dataset's label names) fixes the columns; the verbalizer must cover them.
    Prompts longer than the context lose input text (counted in ``truncated``).
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("aggregate", aggregate, AGGREGATIONS)
    if prompt.template.uses_mask:
        raise ConfigError(f"template {prompt.name!r} has a {{mask}} field: use score_masked_lm")
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = _phrase_ids(tokenizer, verbalizer)
    encode = _causal_encoder(tokenizer)
    budget = context_length(model, tokenizer, max_length) - max(map(len, cont_ids))
    fitted = fit_prompts(
        tokenizer, prompt, texts, text_pairs, budget=budget, demos=demos, encode=encode
    )
    _warn_cut(fitted.truncated, len(texts), budget)
    sums = _shared_prefix_logprobs(model, list(fitted.ids), cont_ids, batch_size, max_rows)
    per_phrase = sums / np.array([len(c) for c in cont_ids]) if normalize == "mean" else sums
    scores = _aggregate(per_phrase, owner, len(verbalizer.labels), aggregate)
    if normalize == "pmi":
        domain = domain_logprobs(model, tokenizer, prompt, labels, aggregate=aggregate)
        scores = domain_pmi(scores, domain)
    return LabelScores(verbalizer.labels, scores, fitted.truncated)


def domain_logprobs(
    model,
    tokenizer,
    prompt: Prompt,
    labels: Sequence[str] | None = None,
    *,
    aggregate: str = "logsumexp",
    max_rows: int = 256,
) -> np.ndarray:
    """log P(label words | the template's domain prompt), one value per label.

    The domain prompt is the template up to the input's place with the input left out
    (``Template.domain_prompt``); ``scores - domain_logprobs(...)`` is the domain-conditional
    PMI that ``score_causal(..., normalize="pmi")`` returns.
    """
    _check_choice("aggregate", aggregate, AGGREGATIONS)
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = _phrase_ids(tokenizer, verbalizer)
    domain = _causal_encoder(tokenizer)([prompt.template.domain_prompt()])
    sums = _shared_prefix_logprobs(model, domain, cont_ids, 1, max_rows)
    return _aggregate(sums, owner, len(verbalizer.labels), aggregate)[0]


def continuation_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_rows: int = 256,
) -> np.ndarray:
    """``(len(prompts), len(continuations))`` array of log P(continuation | prompt).

    One forward pass per prompt (batched, left-padded), then one batched pass over all
    multi-token continuations on the cached prefix; logits only where they are needed.
    """
    cont_ids = _continuation_ids(tokenizer, continuations)
    ids = _causal_encoder(tokenizer)(list(prompts))
    _check_fits(model, tokenizer, ids, cont_ids)
    return _shared_prefix_logprobs(model, ids, cont_ids, batch_size, max_rows)


def naive_continuation_logprobs(
    model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 1
) -> np.ndarray:
    """The reference: one forward pass per (prompt, continuation), full logits.

    This is what an lm-eval-style loop computes; :func:`continuation_logprobs` must match it.
    """
    cont_ids = _continuation_ids(tokenizer, continuations)
    ids = _causal_encoder(tokenizer)(list(prompts))
    _check_fits(model, tokenizer, ids, cont_ids)
    pairs = [(i, j) for i in range(len(ids)) for j in range(len(cont_ids))]
    pairs.sort(key=lambda p: -len(ids[p[0]]) - len(cont_ids[p[1]]))  # less padding
    out = np.zeros((len(ids), len(cont_ids)))
    device = _device(model)
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            x, mask = _pad([ids[i] + cont_ids[j] for i, j in chunk], device, left=False)
            pos = torch.arange(x.shape[1], device=device).expand(len(chunk), -1)
            logits = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
            logp = logits.float().log_softmax(-1)
            for r, (i, j) in enumerate(chunk):
                n, c = len(ids[i]), cont_ids[j]
                steps = torch.arange(n - 1, n - 1 + len(c), device=device)
                out[i, j] = logp[r, steps, torch.tensor(c, device=device)].sum().item()
    return out


def _shared_prefix_logprobs(
    model, prompt_ids: list[list[int]], cont_ids: list[list[int]], batch_size: int, max_rows: int
) -> np.ndarray:
    """Summed log-probs ``(n_prompts, n_continuations)``; see :func:`continuation_logprobs`."""
    device = _device(model)
    first = torch.tensor([c[0] for c in cont_ids], device=device)
    multi = [j for j, c in enumerate(cont_ids) if len(c) > 1]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # less padding
    out = np.zeros((len(prompt_ids), len(cont_ids)))
    cache_key = _cache_kwarg(model)
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _pad([prompt_ids[i] for i in rows], device, left=True)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=bool(multi),
                logits_to_keep=1,
            )
            scores = res.logits[:, -1].float().log_softmax(-1)[:, first]
            if multi:
                cache = getattr(res, "cache", None) or res.past_key_values
                tails = [cont_ids[j] for j in multi]
                scores[:, multi] += _continue(model, cache, cache_key, mask, tails, max_rows)
            out[rows] = scores.cpu().numpy()
    return out


def _continue(model, cache, cache_key, mask, tails, max_rows) -> torch.Tensor:
    """log P(tokens 2.. of each tail | prefix, token 1), for every (prompt, tail) pair.

    Tails of one length go through together, so no continuation token is padding.
    """
    out = torch.zeros(mask.shape[0], len(tails), device=mask.device)
    by_length: dict[int, list[int]] = {}
    for j, tail in enumerate(tails):
        by_length.setdefault(len(tail), []).append(j)
    for cols in by_length.values():
        same = torch.tensor([tails[j] for j in cols], device=mask.device)
        out[:, cols] = _continue_same_length(model, cache, cache_key, mask, same, max_rows)
    return out


def _continue_same_length(model, cache, cache_key, mask, tails: torch.Tensor, max_rows: int):
    """``tails`` is ``(n_tails, n)``: feed tokens 1..n-1 on the cached prompt, score 2..n."""
    device = mask.device
    n_prompts, (n_tails, width) = mask.shape[0], (tails.shape[0], tails.shape[1] - 1)
    lengths = mask.sum(-1)
    row_p = torch.arange(n_prompts, device=device).repeat_interleave(n_tails)
    row_t = torch.arange(n_tails, device=device).repeat(n_prompts)
    result = torch.zeros(len(row_p), device=device)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    for s in range(0, len(row_p), max_rows):
        rp, rt = row_p[s : s + max_rows], row_t[s : s + max_rows]
        sub = type(cache)(ddp_cache_data=[(k[rp], v[rp]) for k, v in layers])
        res = model(
            input_ids=tails[rt, :-1],
            attention_mask=torch.cat([mask[rp], mask.new_ones(len(rp), width)], dim=-1),
            position_ids=lengths[rp, None] + torch.arange(width, device=device),
            use_cache=True,
            **{cache_key: sub},
        )
        logp = res.logits.float().log_softmax(-1).gather(-1, tails[rt, 1:, None]).squeeze(-1)
        result[s : s + len(rp)] = logp.sum(-1)
    return result.view(n_prompts, n_tails)


def _causal_encoder(tokenizer):
    """Prompt -> ids: the tokenizer's leading special tokens (e.g. BOS), then the text.

    An empty prompt with no leading special token gets BOS (or EOS) as its context.
    """
    probe = "hello"
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    starts = [s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain]
    prefix = full[: starts[0]] if starts else []
    start_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )

    def encode(batch: list[str]) -> list[list[int]]:
        out = []
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids = prefix + ids
            if not ids:
                if start_id is None:
                    raise DataError(
                        "an empty prompt needs a BOS or EOS token; the tokenizer has none"
                    )
                ids = [start_id]
            out.append(ids)
        return out

    return encode


def _continuation_ids(tokenizer, phrases: Sequence[str], owners: Sequence[str] | None = None):
    ids = tokenizer(list(phrases), add_special_tokens=False)["input_ids"]
    for k, (phrase, tokens) in enumerate(zip(phrases, ids, strict=True)):
        if not tokens:
            who = f" of label {owners[k]!r}" if owners else ""
            raise ConfigError(
                f"label words {phrase!r}{who} tokenize to nothing with this tokenizer; "
                "choose words it can spell"
            )
    return [list(t) for t in ids]


def _phrase_ids(tokenizer, verbalizer: Verbalizer) -> tuple[np.ndarray, list[list[int]]]:
    """Flattened phrases: the label index of each, and its token ids."""
    owner, phrases = _phrases(verbalizer)
    names = [verbalizer.labels[i] for i in owner]
    return owner, _continuation_ids(tokenizer, phrases, names)


def _aggregate(per_phrase: np.ndarray, owner: np.ndarray, n_labels: int, how: str) -> np.ndarray:
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


def _check_fits(model, tokenizer, ids, cont_ids) -> None:
    limit = context_length(model, tokenizer)
    longest = max(map(len, ids)) + max(map(len, cont_ids))
    if longest > limit:
        raise DataError(
            f"a prompt plus continuation takes {longest} tokens, over the context of {limit}; "
            "score_causal cuts input text to fit"
        )


def _pad(seqs: list[list[int]], device, left: bool, pad_id: int = 0):
    """``(ids, attention_mask)``, padded on the left or the right."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[r, span] = torch.tensor(seq)
        mask[r, span] = 1
    return ids.to(device), mask.to(device)


def _cache_kwarg(model) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(inner).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --- encoders: embeddings, NLI, masked LM ------------------------------------------------


def embed_texts(
    model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int | None = None
) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings ``(n, hidden)`` from an encoder's last layer."""
    body = body_of(model)
    limit = context_length(model, tokenizer, max_length)
    chunks = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            enc = {k: v.to(_device(model)) for k, v in enc.items()}
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
    owner, phrases = _phrases(verbalizer)
    phrase_vecs = embed_texts(model, tokenizer, [p.strip() for p in phrases], batch_size=batch_size)
    label_vecs = np.stack([phrase_vecs[owner == i].mean(0) for i in range(len(verbalizer.labels))])
    label_vecs /= np.maximum(np.linalg.norm(label_vecs, axis=1, keepdims=True), 1e-12)
    text_vecs = embed_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    logits = text_vecs @ label_vecs.T / temperature
    cut = _count_long(tokenizer, texts, context_length(model, tokenizer, max_length))
    return LabelScores(verbalizer.labels, _log_softmax(logits), cut)


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
    _check_choice("aggregate", aggregate, AGGREGATIONS)
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
    owner, phrases = _phrases(verbalizer)
    hyps = [hypothesis.replace("{label}", p.strip()) for p in phrases]
    pairs = [(t, h) for t in texts for h in hyps]
    limit = context_length(model, tokenizer, max_length)
    logits = []
    with _eval_mode(model), torch.inference_mode():
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
            out = model(**{k: v.to(_device(model)) for k, v in enc.items()}).logits
            logits.append(out[:, entail[0]].float().cpu().numpy())
    per_phrase = (
        np.concatenate(logits).reshape(len(texts), len(hyps)) if pairs else np.zeros((0, len(hyps)))
    )
    scores = _aggregate(per_phrase, owner, len(verbalizer.labels), aggregate)
    lengths = tokenizer(list(texts), [hyps[0]] * len(texts))["input_ids"] if texts else []
    return LabelScores(
        verbalizer.labels, _log_softmax(scores), sum(len(x) > limit for x in lengths)
    )


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
    _check_choice("normalize", normalize, ("sum", "mean"))
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
    owner, cont_ids = _phrase_ids(tokenizer, verbalizer)
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
    _warn_cut(cut, len(texts), limit)
    if normalize == "mean":
        per_phrase = per_phrase / np.array([len(c) for c in cont_ids])
    return LabelScores(
        verbalizer.labels, _aggregate(per_phrase, owner, len(verbalizer.labels), aggregate), cut
    )


def _mask_logprobs(model, tokenizer, ids, targets: torch.Tensor, batch_size: int) -> np.ndarray:
    """Sum over the last n masks of log P(target token) for each (example, target row)."""
    n = targets.shape[1]
    out = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            x, mask = _pad(rows, _device(model), left=False, pad_id=tokenizer.pad_token_id or 0)
            is_mask = x == tokenizer.mask_token_id
            if (is_mask.sum(1) < n).any():
                raise DataError("a prompt lost its mask tokens while being tokenized")
            pos = torch.stack([torch.nonzero(row)[-n:, 0] for row in is_mask])  # (b, n)
            logits = model(input_ids=x, attention_mask=mask).logits
            at = logits[torch.arange(len(rows))[:, None], pos].float().log_softmax(-1).cpu()
            out.append(at[:, torch.arange(n)[None, :], targets].sum(-1).numpy())  # (b, n_cols)
    return np.concatenate(out)


# --- small helpers -------------------------------------------------------------------------


def _phrases(verbalizer: Verbalizer) -> tuple[np.ndarray, list[str]]:
    pairs = [(i, p) for i, label in enumerate(verbalizer.labels) for p in verbalizer.phrases(label)]
    return np.array([i for i, _ in pairs]), [p for _, p in pairs]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _count_long(tokenizer, texts: Sequence[str], limit: int) -> int:
    return sum(len(ids) > limit for ids in tokenizer(list(texts))["input_ids"]) if texts else 0


def _warn_cut(cut: int, total: int, budget: int) -> None:
    if cut:
        log.warning("%d of %d inputs were cut to fit the context (%d tokens)", cut, total, budget)


def _check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{what} must be one of {', '.join(valid)}; got {value!r}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off while scoring; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
