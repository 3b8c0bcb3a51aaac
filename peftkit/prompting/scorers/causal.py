"""Causal LM label likelihood: each prompt runs once, every label continues its cache."""

from __future__ import annotations

import bisect
import inspect
import os
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from peft import PeftType

from peftkit.adapters.model import eval_mode
from peftkit.errors import ConfigError, DataError, ModelError
from peftkit.prompting.calibration import domain_pmi
from peftkit.prompting.demonstrations import Demo, fit_prompts
from peftkit.prompting.scorers._base import (
    AGGREGATIONS,
    NORMALIZATIONS,
    LabelScores,
    aggregate_phrases,
    check_choice,
    context_length,
    continuation_ids,
    device_of,
    has_lm_head,
    pad_rows,
    phrase_ids,
    warn_cut,
)
from peftkit.prompting.templates import Prompt

MIN_SHARED_TOKENS = 8
"""Leading tokens common to all prompts of a call are run once when there are this many."""

TREE_LOGITS = 2**26
"""At most this many logits (rows x kept positions x vocabulary) per forward of the label
tree (256 MB in float32): a batch that would hold more runs in smaller pieces."""

MASK_CELLS = 2**26
"""At most this many (query, key) cells in a packed forward's attention mask (256 MB in
float32): a forward of long prompts has fewer rows than ``batch_size``, down to one."""


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
    Prompts longer than the context lose input text (counted in ``truncated``). Tokens that
    every prompt starts with (``demos`` shared by all texts) run once, not once per text.
    ``model`` may be a peft model: LoRA-style adapters and prefix tuning share the prompt's
    forward like the plain model; prompt tuning is scored one forward per (prompt, label).
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
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
    encode = _causal_encoder(tokenizer)
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
            sums[rows] = _shared_prefix_logprobs(model, ids, cont_ids, batch_size, max_rows)
    per_phrase = sums / np.array([len(c) for c in cont_ids]) if normalize == "mean" else sums
    scores = aggregate_phrases(per_phrase, owner, len(verbalizer.labels), aggregate)
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
    check_choice("aggregate", aggregate, AGGREGATIONS)
    verbalizer = prompt.verbalizer.for_labels(labels, where=f"prompt {prompt.name!r}")
    owner, cont_ids = phrase_ids(tokenizer, verbalizer)
    domain = _causal_encoder(tokenizer)([prompt.template.domain_prompt()])
    sums = _shared_prefix_logprobs(model, domain, cont_ids, 1, max_rows)
    return aggregate_phrases(sums, owner, len(verbalizer.labels), aggregate)[0]


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

    One forward pass per prompt that also carries the multi-token continuations' words as a
    prefix tree after the prompt (continuations that start with the same words share them).
    Prompts are packed end to end into rows of at most ``batch_size`` per forward, with no
    padding but at a row's end; a 4-D attention mask keeps each prompt to itself and each
    branch to its prompt and its own words. Where the attention takes no custom mask (flash
    attention, prefix tuning, a sliding window shorter than a prompt): left-padded batches,
    the longest continuation inline and the others in one batched pass on the cached prompt.
    Logits only where they are needed.
    """
    cont_ids = continuation_ids(tokenizer, continuations)
    ids = _causal_encoder(tokenizer)(list(prompts))
    _check_fits(model, tokenizer, ids, cont_ids)
    return _shared_prefix_logprobs(model, ids, cont_ids, batch_size, max_rows)


def naive_continuation_logprobs(
    model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 1
) -> np.ndarray:
    """The reference: one forward pass per (prompt, continuation), full logits.

    This is what an lm-eval-style loop computes; :func:`continuation_logprobs` must match it.
    """
    cont_ids = continuation_ids(tokenizer, continuations)
    ids = _causal_encoder(tokenizer)(list(prompts))
    _check_fits(model, tokenizer, ids, cont_ids)
    return _naive_logprobs(model, ids, cont_ids, batch_size)


def _naive_logprobs(
    model, prompt_ids: list[list[int]], cont_ids: list[list[int]], batch_size: int
) -> np.ndarray:
    """Summed log-probs ``(n_prompts, n_continuations)``, one right-padded forward per pair."""
    pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(cont_ids))]
    pairs.sort(key=lambda p: -len(prompt_ids[p[0]]) - len(cont_ids[p[1]]))  # less padding
    out = np.zeros((len(prompt_ids), len(cont_ids)))
    device = device_of(model)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            rows = [prompt_ids[i] + cont_ids[j] for i, j in chunk]
            x, mask = pad_rows(rows, device, left=False)  # right: default positions hold
            logits = model(input_ids=x, attention_mask=mask).logits
            logp = logits.float().log_softmax(-1)
            if logp.shape[1] > x.shape[1]:  # a prompt-tuned model's virtual tokens come first
                logp = logp[:, logp.shape[1] - x.shape[1] :]
            for r, (i, j) in enumerate(chunk):
                n, c = len(prompt_ids[i]), cont_ids[j]
                steps = torch.arange(n - 1, n - 1 + len(c), device=device)
                out[i, j] = logp[r, steps, torch.tensor(c, device=device)].sum().item()
    return out


def _shared_prefix_logprobs(
    model, prompt_ids: list[list[int]], cont_ids: list[list[int]], batch_size: int, max_rows: int
) -> np.ndarray:
    """Summed log-probs ``(n_prompts, n_continuations)``; see :func:`continuation_logprobs`.

    A prompt-tuned peft model (virtual tokens put before the input) goes the naive way:
    peft drops ``position_ids`` for it, so left padding would shift positions, and it would
    put its virtual tokens again before the cached continuation.
    """
    if _prepends_virtual_tokens(model):
        return _naive_logprobs(model, prompt_ids, cont_ids, batch_size)
    # Caches rebuilt from keys and values (a shared start, the other multi-token labels)
    # are full-attention caches: layers that see only a window of the past score otherwise
    # once a prompt outgrows it. Such prompts get one forward, the labels inline, or else go
    # the naive way.
    window = _attention_window(model)
    longest = max(map(len, prompt_ids), default=0) + max(map(len, cont_ids))
    rebuild = window is None or longest <= window
    device = device_of(model)
    multi = [j for j, c in enumerate(cont_ids) if len(c) > 1]
    first = torch.tensor([c[0] for c in cont_ids], device=device)
    # Multi-token labels ride along: their words but the last, fed after every prompt as a
    # tree (labels with the same first words share those tokens), so the prompt's forward
    # scores them too. Where the attention takes a 4-D mask, prompts and their trees are
    # packed into rows with no padding (each sees the shared start, its own tokens and its
    # own branch); the mask replaces a sliding window's own, so only where every prompt and
    # label fit in it, and the tree must fit the logits budget.
    if rebuild and _takes_custom_masks(model):
        tree = _LabelTree(cont_ids, multi, device)
        vocab = model.get_output_embeddings().weight.shape[0]
        most = TREE_LOGITS // ((len(tree.tokens) + 1) * vocab)
        if most:
            with eval_mode(model), torch.inference_mode():
                shared, lead_cache, own = _run_shared(model, prompt_ids)
                return _packed_logprobs(
                    model, own, tree, first, batch_size, most, shared, lead_cache
                )
    # Else only the longest label rides (one branch: the plain causal mask serves), in
    # left-padded batches, and the others continue the cache, cut back to the prompt.
    tree = _LabelTree(cont_ids, sorted(multi, key=lambda j: -len(cont_ids[j]))[:1], device)
    rest = [j for j in multi if j not in tree.riding]
    if rest and not rebuild:
        return _naive_logprobs(model, prompt_ids, cont_ids, batch_size)
    extra = tree.tokens
    tail = torch.tensor(extra, device=device, dtype=torch.long)
    # Positions kept as indices, not ``logits_to_keep=1``: a slice leaves the hidden states
    # non-contiguous, and PyTorch's matmul then runs the vocabulary projection as a bmm over
    # a per-row copy of the weight (3.4x slower on CPU); an index gathers a copy.
    keep = torch.arange(-len(extra) - 1, 0, device=device)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # less padding
    out = np.zeros((len(prompt_ids), len(cont_ids)))
    cache_key = _cache_kwarg(model)
    # A shared start cached before each prompt's left padding: only models that place
    # tokens by position ids (ALiBi models measure distance by index: the padding between
    # would count)
    share = rebuild and _takes_position_ids(model)
    with eval_mode(model), torch.inference_mode():
        shared, lead_cache, prompt_ids = (
            _run_shared(model, prompt_ids) if share else (0, None, prompt_ids)
        )
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, prompt_mask = pad_rows([prompt_ids[i] for i in rows], device, left=True)
            pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
            after = prompt_mask.sum(-1, keepdim=True)  # the first position after each prompt
            pos = torch.cat([pos, after + tree.depth - 1], dim=-1)
            ids = torch.cat([ids, tail.expand(len(rows), -1)], dim=-1)
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(rows), len(extra))], dim=-1)
            prefix = {}
            if shared:  # the shared tokens come first, then each prompt's padding and rest
                pos = pos + shared
                mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=-1)
                prompt_mask = torch.cat([mask[:, :shared], prompt_mask], dim=-1)
                prefix[cache_key] = _broadcast_cache(lead_cache, len(rows))
            res = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=bool(rest) or bool(shared),
                logits_to_keep=keep,
                **prefix,
            )
            logp = res.logits[:, -len(keep) :].float().log_softmax(-1)
            scores = tree.score(logp, first)
            if rest:
                cache = _cache_of(res)
                tails = [cont_ids[j] for j in rest]
                scores[:, rest] += _continue(
                    model, cache, cache_key, prompt_mask, tails, max_rows, len(extra)
                )
            out[rows] = scores.cpu().numpy()
    return out


def _run_shared(model, prompt_ids: list[list[int]]):
    """Run the tokens every prompt starts with (shared demonstrations, an instruction) once:
    ``(shared, cache, prompt_ids)``, the prompts less those ``shared`` tokens, whose keys and
    values are in ``cache`` (one row). ``(0, None, prompt_ids)`` when not worth it."""
    shared = _shared_length(model, prompt_ids)
    if not shared:
        return 0, None, prompt_ids
    first_ids = torch.tensor([prompt_ids[0][:shared]], device=device_of(model))
    cache = _cache_of(model(input_ids=first_ids, use_cache=True, logits_to_keep=1))
    if not hasattr(cache, "layers"):  # a model without a transformers Cache: prompts run whole
        return 0, None, prompt_ids
    return shared, cache, [p[shared:] for p in prompt_ids]


def _packed_logprobs(
    model, own, tree: _LabelTree, first, batch_size: int, most: int, shared: int, lead_cache
) -> np.ndarray:
    """Summed log-probs of every prompt (``own``: its tokens after the ``shared`` start,
    whose keys and values ``lead_cache`` holds) and label, prompts packed into rows.

    Each prompt is a segment: its tokens, then the label tree's. A forward holds up to
    ``batch_size`` rows as wide as its longest segment (fewer where the mask would exceed
    ``MASK_CELLS``) and ``most`` segments (the logits budget); shorter segments fill the
    rows' room, so no token fed is padding but a row's end. A 4-D mask lets each segment
    see the shared start and itself only; positions restart at each segment. The LM head
    runs only at the positions that score a label.
    """
    device, dtype = first.device, _dtype_of(model)
    n = len(tree.tokens)
    cache_key = _cache_kwarg(model)
    out = np.zeros((len(own), len(first)))
    for rows in _pack([len(p) + n for p in own], batch_size, most, shared):
        batch = _PackedRows(rows, own, tree, shared, dtype, device)
        prefix = {cache_key: _broadcast_cache(lead_cache, len(rows))} if shared else {}
        with _head_at(model, batch.kept) as gathered:
            res = model(
                input_ids=batch.ids,
                attention_mask=batch.mask,
                position_ids=batch.positions,
                use_cache=bool(shared),
                logits_to_keep=0,
                **prefix,
            )
        logits = res.logits
        if not gathered:  # the head ran at every position: the kept ones picked out after
            logits = logits.reshape(-1, logits.shape[-1])[batch.kept][None]
        logp = logits[0].float().log_softmax(-1).view(len(batch.order), n + 1, -1)
        out[batch.order] = tree.score(logp, first).cpu().numpy()
    return out


def _pack(lengths: Sequence[int], rows: int, most: int, shared: int = 0) -> list[list[list[int]]]:
    """Plan forwards for segments of these ``lengths``: each forward a list of rows, each
    row the indices of the segments put in it end to end. A forward has at most ``rows``
    rows, as wide as its longest segment, whose mask (``shared`` more keys) fits
    ``MASK_CELLS``, and at most ``most`` segments: the longest segments left open its rows,
    then every shorter one goes in the first row with room (first-fit decreasing)."""
    todo = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan = []
    while todo:
        width = lengths[todo[0]]
        most_rows = max(1, min(rows, MASK_CELLS // (width * (shared + width))))
        longer = [-lengths[i] for i in todo]  # ascending: bisect finds what fits a room
        room: list[int] = []
        placed: list[list[int]] = []
        taken = [False] * len(todo)
        k, count = 0, 0
        while k < len(todo) and count < most:
            r = next((r for r, free in enumerate(room) if free >= -longer[k]), None)
            if r is None and len(room) < most_rows:
                r = len(room)
                room.append(width)
                placed.append([])
            if r is None:  # every row open and none has room: on to the first that fits
                k = bisect.bisect_left(longer, -max(room), lo=k + 1)
                continue
            room[r] += longer[k]
            placed[r].append(todo[k])
            taken[k] = True
            count += 1
            k += 1
        plan.append(placed)
        todo = [i for i, t in zip(todo, taken, strict=True) if not t]
    return plan


class _PackedRows:
    """The inputs of one packed forward (see :func:`_packed_logprobs`): ``ids``,
    ``positions``, the additive ``mask`` ``(rows, 1, width, shared + width)``, and ``kept``,
    the flat indices (row x width + column) of each segment's last prompt token and tree
    nodes, segment by segment in ``order`` (the prompts' indices)."""

    def __init__(self, rows, own, tree: _LabelTree, shared: int, dtype, device):
        n = len(tree.tokens)
        width = max(sum(len(own[i]) + n for i in row) for row in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        segs = np.full((len(rows), width), -1, dtype=np.int64)  # segment id; -1: the row's end
        locs = np.zeros((len(rows), width), dtype=np.int64)  # place within the segment
        sizes = np.zeros((len(rows), width), dtype=np.int64)  # the segment's prompt tokens
        kept: list[int] = []
        self.order: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                span, m = slice(at, at + len(own[i]) + n), len(own[i])
                ids[r, span] = own[i] + tree.tokens
                segs[r, span] = len(self.order)
                locs[r, span] = np.arange(m + n)
                sizes[r, span] = m
                kept.extend(r * width + at + m - 1 + k for k in range(n + 1))
                self.order.append(i)
                at += m + n
        self.ids = torch.from_numpy(ids).to(device)
        self.kept = torch.tensor(kept, device=device)
        seg, loc, size = (torch.from_numpy(a).to(device) for a in (segs, locs, sizes))
        node = (loc >= size) & (seg >= 0)
        nid = (loc - size).clamp(0, max(n - 1, 0))
        depth = tree.depth[nid] if n else torch.zeros_like(loc)
        self.positions = shared + torch.where(node, size + depth - 1, loc)
        # query q sees key k of its own segment: a prompt token causally, a tree node the
        # whole prompt and its own branch; every query sees itself (no row is empty)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None]
        branch = tree.seen[nid[:, :, None], nid[:, None, :]] if n else torch.zeros_like(same)
        before = loc[:, None, :] <= loc[:, :, None]
        seen = same & torch.where(node[:, :, None], ~node[:, None, :] | branch, before)
        seen |= torch.eye(width, dtype=torch.bool, device=device)
        if shared:
            seen = torch.cat([seen.new_ones(len(rows), width, shared), seen], dim=-1)
        bias = torch.zeros(seen.shape, dtype=dtype, device=device)
        self.mask = bias.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


@contextmanager
def _head_at(model, kept: torch.Tensor):
    """While open, the LM head runs only at ``kept`` (flat indices into its input's rows x
    positions): its input ``(rows, width, hidden)`` becomes ``(1, len(kept), hidden)``.
    A pre-hook on the head, so what the model does after it (a logit soft-cap) still runs.
    Yields a list that holds True once the head's input was gathered."""
    gathered: list[bool] = []

    def gather(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            hidden = args[0]
            gathered.append(True)
            return (hidden.reshape(-1, hidden.shape[-1])[kept][None], *args[1:])
        return None

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield gathered
    finally:
        handle.remove()


class _LabelTree:
    """The ``riding`` labels' words but the last, as a prefix tree of tokens to feed after a
    prompt (labels that start with the same words share them); every label's first word is
    scored at the prompt's last token.

    Node ``n`` is ``tokens[n]`` at ``depth[n]`` (1: a label's first word); its logits (kept
    position ``1 + n``; position 0 is the prompt's last token) score the next word of every
    riding label through it; ``seen[a, b]``: node ``a`` attends to node ``b`` (its branch).
    """

    def __init__(self, cont_ids: list[list[int]], riding: list[int], device):
        self.riding = riding
        index: dict[tuple[int, ...], int] = {}
        parent: list[int] = []
        for c in (cont_ids[j] for j in riding):
            for i in range(1, len(c)):
                if tuple(c[:i]) not in index:
                    index[tuple(c[:i])] = len(parent)
                    parent.append(index.get(tuple(c[: i - 1]), -1))
        self.tokens = [key[-1] for key in index]
        n = len(parent)
        seen = torch.eye(n, dtype=torch.bool)
        for a in range(n):
            b = parent[a]
            while b >= 0:
                seen[a, b] = True
                b = parent[b]
        self.seen = seen.to(device)
        self.depth = torch.tensor([len(key) for key in index], device=device, dtype=torch.long)
        # every (label, kept position, word) whose log-prob the label's score sums
        label, at, word = [], [], []
        for j in riding:
            c = cont_ids[j]
            for i in range(1, len(c)):
                label.append(j)
                at.append(1 + index[tuple(c[:i])])
                word.append(c[i])
        self.label, self.at, self.word = (
            torch.tensor(v, device=device, dtype=torch.long) for v in (label, at, word)
        )

    def score(self, logp: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Summed log-probs ``(rows, labels)`` from the kept positions' log-softmax."""
        scores = logp[:, 0, first]
        return scores.index_add_(1, self.label, logp[:, self.at, self.word])


def _shared_length(model, prompt_ids: list[list[int]]) -> int:
    """How many leading tokens all prompts share, worth running once (0: not worth it).

    Every prompt keeps at least its last token to itself (its logits score the labels).
    Peft prompt-learning models bring their own cache and are never shared this way.
    """
    if len(prompt_ids) < 2 or _prompt_learning(model) is not None:
        return 0
    n = min(len(os.path.commonprefix(prompt_ids)), min(map(len, prompt_ids)) - 1)
    return n if n >= MIN_SHARED_TOKENS else 0


def _attention_window(model) -> int | None:
    """The shortest past any layer attends to (a sliding window, a chunk), or None when
    every layer sees the whole sequence; 0 for layers whose cache is not keys and values."""
    inner = _unwrapped(model)
    config = inner.config.get_text_config(decoder=True)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
    except (ImportError, AttributeError, TypeError):  # another transformers: the plain fields
        sizes = [getattr(config, k, None) for k in ("sliding_window", "attention_chunk_size")]
        found = [int(v) for v in sizes if v is not None]
        return min(found) if found else None
    windows = [
        int(kw.get("sliding_window") or 0)
        for kind, kw in zip(types, kwargs, strict=True)
        if kind not in ("full_attention", "dummy")
    ]
    return min(windows) if windows else None


def _broadcast_cache(cache, rows: int):
    """The one-row ``cache`` seen as ``rows`` rows (no copy until the batch appends to it)."""
    return type(cache)(
        ddp_cache_data=[
            (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
            for layer in cache.layers
        ]
    )


def _continue(model, cache, cache_key, mask, tails, max_rows, drop: int = 0) -> torch.Tensor:
    """log P(tokens 2.. of each tail | prefix, token 1), for every (prompt, tail) pair.

    Tails of one length go through together, so no continuation token is padding. The
    cache's last ``drop`` positions (tokens appended after the prompts) are left out.
    """
    out = torch.zeros(mask.shape[0], len(tails), device=mask.device)
    end = cache.layers[0].keys.shape[-2] - drop
    layers = [(layer.keys[..., :end, :], layer.values[..., :end, :]) for layer in cache.layers]
    by_length: dict[int, list[int]] = {}
    for j, tail in enumerate(tails):
        by_length.setdefault(len(tail), []).append(j)
    for cols in by_length.values():
        same = torch.tensor([tails[j] for j in cols], device=mask.device)
        out[:, cols] = _continue_same_length(
            model, type(cache), layers, cache_key, mask, same, max_rows
        )
    return out


def _continue_same_length(
    model, cache_type, layers, cache_key, mask, tails: torch.Tensor, max_rows: int
):
    """``tails`` is ``(n_tails, n)``: feed tokens 1..n-1 on the cached prompt (``layers``:
    its keys and values per layer), score 2..n."""
    device = mask.device
    n_prompts, (n_tails, width) = mask.shape[0], (tails.shape[0], tails.shape[1] - 1)
    lengths = mask.sum(-1)
    row_p = torch.arange(n_prompts, device=device).repeat_interleave(n_tails)
    row_t = torch.arange(n_tails, device=device).repeat(n_prompts)
    result = torch.zeros(len(row_p), device=device)
    for s in range(0, len(row_p), max_rows):
        rp, rt = row_p[s : s + max_rows], row_t[s : s + max_rows]
        sub = cache_type(ddp_cache_data=[(k[rp], v[rp]) for k, v in layers])
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


def _check_fits(model, tokenizer, ids, cont_ids) -> None:
    limit = context_length(model, tokenizer)
    longest = max(map(len, ids)) + max(map(len, cont_ids))
    if longest > limit:
        raise DataError(
            f"a prompt plus continuation takes {longest} tokens, over the context of {limit}; "
            "score_causal cuts input text to fit"
        )


def _takes_custom_masks(model) -> bool:
    """Whether the model's attention takes a 4-D mask as given (transformers' sdpa, eager)
    and its positions from ``position_ids`` (not ALiBi models such as Bloom and MPT, which
    place tokens by the mask and take no position ids)."""
    inner = _unwrapped(model)
    if _prompt_learning(model) is not None or not has_lm_head(inner):
        return False
    if not _takes_position_ids(model):
        return False
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) in (
        "sdpa",
        "eager",
    )


def _takes_position_ids(model) -> bool:
    """Whether the model's forward places tokens by ``position_ids`` (not so ALiBi models
    such as Bloom and MPT, whose biases come from the mask or the token's index)."""
    return "position_ids" in _forward_params(model)


def _dtype_of(model) -> torch.dtype:
    """The dtype the hidden states (and so the attention's queries) have."""
    return model.get_input_embeddings().weight.dtype


def _prompt_learning(model):
    """The active peft config of a prompt-learning model (prefix / prompt tuning), else None."""
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def _cache_of(output):
    """The cache a forward returned (transformers 5.x names it ``cache``, earlier
    ``past_key_values``)."""
    return getattr(output, "cache", None) or output.past_key_values


def _prepends_virtual_tokens(model) -> bool:
    """True for a peft prompt-learning model that is not prefix tuning (prompt/p-tuning)."""
    config = _prompt_learning(model)
    if config is None:
        return False
    cached = (PeftType.PREFIX_TUNING, getattr(PeftType, "CARTRIDGE", PeftType.PREFIX_TUNING))
    return config.peft_type not in cached


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_params(model):
    """The parameters the (unwrapped) model's ``forward`` names."""
    return inspect.signature(type(_unwrapped(model)).forward).parameters
