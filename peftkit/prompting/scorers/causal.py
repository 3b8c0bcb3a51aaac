"""Causal LM label likelihood: each prompt runs once, every label continues its cache.

The public functions here take text; ``strategies.py`` holds the three ways the forwards
are laid out and the rule that picks one, ``packing.py`` the packed rows and their plan,
``label_tree.py`` the multi-token labels fed as a tree, ``capabilities.py`` what a model's
forward takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peftkit.errors import ConfigError, DataError, ModelError
from peftkit.prompting.calibration import domain_pmi
from peftkit.prompting.demonstrations import Demo, fit_prompts
from peftkit.prompting.scorers import strategies
from peftkit.prompting.scorers.common import (
    AGGREGATIONS,
    NORMALIZATIONS,
    LabelScores,
    aggregate_phrases,
    check_choice,
    context_length,
    continuation_ids,
    has_lm_head,
    phrase_ids,
    warn_cut,
)
from peftkit.prompting.templates import Prompt

STRATEGY_NAMES = ("auto", *strategies.STRATEGIES)


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
    strategy: str = "auto",
) -> LabelScores:
    """Classify ``texts`` by the log-likelihood of each label's words after the prompt.

    ``normalize``: ``"sum"`` (log P of the words), ``"mean"`` (per token) or ``"pmi"``
    (log P(words | prompt) - log P(words | template.domain_prompt())). A label with several
    phrases combines them by ``aggregate`` (``logsumexp`` = P of any of them). ``labels``
    (the dataset's label names) fixes the columns; the verbalizer must cover them.
    Prompts longer than the context lose input text (counted in ``truncated``). Tokens that
    every prompt starts with (``demos`` shared by all texts) run once, not once per text.
    ``model`` may be a peft model: LoRA-style adapters and prefix tuning share the prompt's
    forward like the plain model; prompt tuning is scored one forward per (prompt, label).
    ``strategy``: how the forwards are laid out (``"packed"``, ``"padded"``, ``"per-label"``;
    see ``scorers.strategies``); ``"auto"`` takes the first the model allows. Every strategy
    gives the same scores; one named outright that this model cannot run is a ModelError.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("strategy", strategy, STRATEGY_NAMES)
    check_choice("aggregate", aggregate, AGGREGATIONS)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if not has_lm_head(model):
        raise ModelError(
            f"score_causal needs a causal LM (AutoModelForCausalLM); this "
            f"{type(model).__name__} has no LM head (an encoder: use score_embedding)"
        )
    if prompt.template.uses_mask:
        raise ConfigError(f"template {prompt.name!r} has a {{mask}} field: use score_masked_lm")
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = phrase_ids(tokenizer, verbalizer)
    encode = causal_encoder(tokenizer)
    budget = context_length(model, tokenizer, max_length) - max(map(len, cont_ids))
    fitted = fit_prompts(
        tokenizer, prompt, texts, text_pairs, budget=budget, demos=demos, encode=encode
    )
    warn_cut(fitted.truncated, len(texts), budget)
    # Prompts cut to fit may have lost demonstration text the others share: two calls, so
    # the uncut ones still run their common start once.
    sums = np.zeros((len(texts), len(cont_ids)))
    cut = set(fitted.cut_rows)
    for rows in ([i for i in range(len(texts)) if i not in cut], sorted(cut)):
        if rows:
            ids = [fitted.ids[i] for i in rows]
            sums[rows] = strategies.run(strategy, model, ids, cont_ids, batch_size, max_rows)
    per_phrase = sums / np.array([len(c) for c in cont_ids]) if normalize == "mean" else sums
    scores = aggregate_phrases(per_phrase, owner, len(verbalizer.labels), aggregate)
    if normalize == "pmi":
        domain = domain_logprobs(
            model, tokenizer, prompt, labels, aggregate=aggregate, strategy=strategy
        )
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
    strategy: str = "auto",
) -> np.ndarray:
    """log P(label words | the template's domain prompt), one value per label.

    The domain prompt is the template up to the input's place with the input left out
    (``Template.domain_prompt``); ``scores - domain_logprobs(...)`` is the domain-conditional
    PMI that ``score_causal(..., normalize="pmi")`` returns.
    """
    check_choice("aggregate", aggregate, AGGREGATIONS)
    check_choice("strategy", strategy, STRATEGY_NAMES)
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = phrase_ids(tokenizer, verbalizer)
    domain = causal_encoder(tokenizer)([prompt.template.domain_prompt()])
    sums = strategies.run(strategy, model, domain, cont_ids, 1, max_rows)
    return aggregate_phrases(sums, owner, len(verbalizer.labels), aggregate)[0]


def continuation_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_rows: int = 256,
    strategy: str = "auto",
) -> np.ndarray:
    """``(len(prompts), len(continuations))`` array of log P(continuation | prompt).

    One forward pass per prompt that also carries the multi-token continuations' words as a
    prefix tree after the prompt (continuations that start with the same words share them).
    Prompts are packed end to end into rows of at most ``batch_size`` per forward, with no
    padding but at a row's end; a 4-D attention mask keeps each prompt to itself and each
    branch to its prompt and its own words. Where the attention takes no custom mask (flash
    attention, prefix tuning, a sliding window shorter than a prompt): left-padded batches,
    the longest continuation inline and the others in one batched pass on the cached prompt.
    Logits only where they are needed. ``strategy`` names one of these ways outright
    (``"packed"``, ``"padded"``, ``"per-label"``); :func:`causal_strategy` says which
    ``"auto"`` takes.
    """
    check_choice("strategy", strategy, STRATEGY_NAMES)
    ids, cont_ids = _encode(model, tokenizer, prompts, continuations)
    return strategies.run(strategy, model, ids, cont_ids, batch_size, max_rows)


def naive_continuation_logprobs(
    model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 1
) -> np.ndarray:
    """The reference: one forward pass per (prompt, continuation), full logits.

    This is what an lm-eval-style loop computes; :func:`continuation_logprobs` must match it.
    """
    ids, cont_ids = _encode(model, tokenizer, prompts, continuations)
    return strategies.per_label(model, ids, cont_ids, batch_size)


def causal_strategy(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str]) -> str:
    """The strategy ``"auto"`` takes for these prompts and continuations on ``model``."""
    ids, cont_ids = _encode(model, tokenizer, prompts, continuations)
    return strategies.choose(model, ids, cont_ids)


def causal_encoder(tokenizer):
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


def _encode(model, tokenizer, prompts, continuations) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and continuation ids, checked to fit the context together."""
    cont_ids = continuation_ids(tokenizer, continuations)
    ids = causal_encoder(tokenizer)(list(prompts))
    limit = context_length(model, tokenizer)
    longest = max(map(len, ids)) + max(map(len, cont_ids))
    if longest > limit:
        raise DataError(
            f"a prompt plus continuation takes {longest} tokens, over the context of {limit}; "
            "score_causal cuts input text to fit"
        )
    return ids, cont_ids
