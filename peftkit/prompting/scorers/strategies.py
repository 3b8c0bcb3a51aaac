"""Three ways to compute log P(continuation | prompt) for every (prompt, continuation), and
the rule that picks one (``choose``). Each takes prompts and continuations as token ids and
returns the summed log-probs ``(n_prompts, n_continuations)``; all three give the same
numbers (``tests/test_scorers.py`` holds them to one forward per pair).

- ``packed``: prompts packed end to end into rows with no padding, the multi-token labels'
  words fed after each prompt as a tree (``label_tree.py``), a 4-D mask keeping each prompt
  to itself (``packing.py``): one forward scores every label. Needs an attention that takes
  a custom mask and positions by ``position_ids``.
- ``padded``: left-padded batches, the longest label inline, the other multi-token labels
  continuing the prompt's cache. Any model but a prompt-tuned one.
- ``per-label``: one right-padded forward per (prompt, continuation), full logits: what an
  lm-eval-style loop computes, and the reference.

Tokens every prompt starts with (shared demonstrations, an instruction) run once in the
first two, their cache broadcast to every row.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from peftkit.adapters.model import eval_mode
from peftkit.errors import ModelError
from peftkit.prompting.scorers.capabilities import (
    attention_window,
    cache_kwarg,
    cache_of,
    dtype_of,
    prepends_virtual_tokens,
    prompt_learning,
    takes_custom_masks,
    takes_position_ids,
)
from peftkit.prompting.scorers.common import device_of, pad_rows
from peftkit.prompting.scorers.label_tree import LabelTree
from peftkit.prompting.scorers.packing import PackedRows, head_at, plan_packing

MIN_SHARED_TOKENS = 8
"""Leading tokens common to all prompts of a call are run once when there are this many."""

TREE_LOGITS = 2**26
"""At most this many logits (rows x kept positions x vocabulary) per forward of the label
tree (256 MB in float32): a batch that would hold more runs in smaller pieces."""

Ids = list[list[int]]


# --- which one ------------------------------------------------------------------------------


def why_not(strategy: str, model, prompt_ids: Ids, cont_ids: Ids) -> str | None:
    """Why ``strategy`` cannot score these prompts exactly on ``model``; None when it can."""
    if strategy == "per-label":
        return None
    if prepends_virtual_tokens(model):
        # peft drops position_ids for it, so left padding would shift positions, and it
        # would put its virtual tokens again before a cached continuation
        return "a prompt-tuned model puts virtual tokens before every input"
    # Caches rebuilt from keys and values (a shared start, the other multi-token labels)
    # are full-attention caches: layers that see only a window of the past score otherwise
    # once a prompt outgrows it.
    window = attention_window(model)
    longest = max(map(len, prompt_ids), default=0) + max(map(len, cont_ids))
    fits = window is None or longest <= window
    multi = sum(len(c) > 1 for c in cont_ids)
    if strategy == "padded":
        if multi > 1 and not fits:
            return (
                f"a layer sees only the last {window} tokens, fewer than a prompt and its "
                f"label ({longest}): the other labels cannot continue a rebuilt cache"
            )
        return None
    if not fits:  # the packed mask replaces a sliding window's own
        return f"a layer sees only the last {window} tokens, fewer than a prompt and its label"
    if not takes_custom_masks(model):
        return (
            "its attention takes no 4-D mask and position ids as given (flash attention, "
            "prefix tuning, ALiBi models such as Bloom and MPT)"
        )
    if not _tree_budget(model, LabelTree.of_all(cont_ids, "cpu")):
        return f"one prompt's label tree needs more than TREE_LOGITS ({TREE_LOGITS}) logits"
    return None


def choose(model, prompt_ids: Ids, cont_ids: Ids) -> str:
    """The strategy ``"auto"`` means: the first of packed, padded, per-label that can."""
    return next(s for s in STRATEGIES if why_not(s, model, prompt_ids, cont_ids) is None)


def run(
    strategy: str, model, prompt_ids: Ids, cont_ids: Ids, batch_size: int, max_rows: int
) -> np.ndarray:
    """Summed log-probs by ``strategy`` (``"auto"``: :func:`choose`); a ModelError says why a
    strategy named outright cannot score these prompts on this model."""
    if strategy == "auto":
        strategy = choose(model, prompt_ids, cont_ids)
    reason = why_not(strategy, model, prompt_ids, cont_ids)
    if reason is not None:
        raise ModelError(f"strategy {strategy!r} cannot score on this model: {reason}")
    return STRATEGIES[strategy](model, prompt_ids, cont_ids, batch_size, max_rows)


def _tree_budget(model, tree: LabelTree) -> int:
    """How many prompts and their trees one packed forward may score (0: not one)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return TREE_LOGITS // ((len(tree.tokens) + 1) * vocab)


# --- the strategies -------------------------------------------------------------------------


def per_label(model, prompt_ids: Ids, cont_ids: Ids, batch_size: int, _max_rows: int = 0):
    """One right-padded forward per (prompt, continuation), ``batch_size`` pairs at a time."""
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


def packed(model, prompt_ids: Ids, cont_ids: Ids, batch_size: int, _max_rows: int = 0):
    """Each prompt a segment (its tokens after the shared start, then the label tree's). A
    forward holds up to ``batch_size`` rows as wide as its longest segment (fewer where the
    mask would exceed ``packing.MASK_CELLS``) and as many segments as the logits budget
    allows; shorter segments fill the rows' room, so no token fed is padding but a row's
    end. Positions restart at each segment; the LM head runs only where labels are scored.
    """
    device = device_of(model)
    tree = LabelTree.of_all(cont_ids, device)
    first = torch.tensor([c[0] for c in cont_ids], device=device)
    n, dtype, key = len(tree.tokens), dtype_of(model), cache_kwarg(model)
    out = np.zeros((len(prompt_ids), len(cont_ids)))
    with eval_mode(model), torch.inference_mode():
        shared, lead_cache, own = run_shared(model, prompt_ids)
        plan = plan_packing(
            [len(p) + n for p in own], batch_size, _tree_budget(model, tree), shared
        )
        for rows in plan:
            batch = PackedRows(rows, own, tree, shared, dtype, device)
            prefix = {key: broadcast_cache(lead_cache, len(rows))} if shared else {}
            with head_at(model, batch.kept) as gathered:
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


def padded(model, prompt_ids: Ids, cont_ids: Ids, batch_size: int, max_rows: int):
    """Left-padded batches of ``batch_size`` prompts, the longest label's words fed inline
    (one branch: the plain causal mask serves); the other multi-token labels continue the
    prompt's cache, cut back to the prompt, ``max_rows`` (prompt, label) rows a forward."""
    device = device_of(model)
    multi = [j for j, c in enumerate(cont_ids) if len(c) > 1]
    tree = LabelTree(cont_ids, sorted(multi, key=lambda j: -len(cont_ids[j]))[:1], device)
    rest = [j for j in multi if j not in tree.riding]
    first = torch.tensor([c[0] for c in cont_ids], device=device)
    extra = tree.tokens
    tail = torch.tensor(extra, device=device, dtype=torch.long)
    # Positions kept as indices, not ``logits_to_keep=1``: a slice leaves the hidden states
    # non-contiguous, and PyTorch's matmul then runs the vocabulary projection as a bmm over
    # a per-row copy of the weight (3.4x slower on CPU); an index gathers a copy.
    keep = torch.arange(-len(extra) - 1, 0, device=device)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # less padding
    out = np.zeros((len(prompt_ids), len(cont_ids)))
    key = cache_kwarg(model)
    # A shared start cached before each prompt's left padding: only where a rebuilt cache is
    # exact (no window shorter than a prompt) and tokens are placed by position ids (ALiBi
    # models measure distance by index: the padding between would count).
    window = attention_window(model)
    longest = max(map(len, prompt_ids), default=0) + max(map(len, cont_ids))
    share = (window is None or longest <= window) and takes_position_ids(model)
    with eval_mode(model), torch.inference_mode():
        shared, lead_cache, prompt_ids = (
            run_shared(model, prompt_ids) if share else (0, None, prompt_ids)
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
                prefix[key] = broadcast_cache(lead_cache, len(rows))
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
                tails = [cont_ids[j] for j in rest]
                scores[:, rest] += continue_cache(
                    model, cache_of(res), key, prompt_mask, tails, max_rows, len(extra)
                )
            out[rows] = scores.cpu().numpy()
    return out


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "packed": packed,
    "padded": padded,
    "per-label": per_label,
}
"""The strategies, in the order ``"auto"`` tries them."""


# --- what they share ------------------------------------------------------------------------


def shared_length(model, prompt_ids: Ids) -> int:
    """How many leading tokens all prompts share, worth running once (0: not worth it).

    Every prompt keeps at least its last token to itself (its logits score the labels).
    Peft prompt-learning models bring their own cache and are never shared this way.
    """
    if len(prompt_ids) < 2 or prompt_learning(model) is not None:
        return 0
    n = min(len(os.path.commonprefix(prompt_ids)), min(map(len, prompt_ids)) - 1)
    return n if n >= MIN_SHARED_TOKENS else 0


def run_shared(model, prompt_ids: Ids):
    """Run the tokens every prompt starts with once: ``(shared, cache, prompt_ids)``, the
    prompts less those ``shared`` tokens, whose keys and values are in ``cache`` (one row).
    ``(0, None, prompt_ids)`` when not worth it."""
    shared = shared_length(model, prompt_ids)
    if not shared:
        return 0, None, prompt_ids
    first_ids = torch.tensor([prompt_ids[0][:shared]], device=device_of(model))
    cache = cache_of(model(input_ids=first_ids, use_cache=True, logits_to_keep=1))
    if not hasattr(cache, "layers"):  # a model without a transformers Cache: prompts run whole
        return 0, None, prompt_ids
    return shared, cache, [p[shared:] for p in prompt_ids]


def broadcast_cache(cache, rows: int):
    """The one-row ``cache`` seen as ``rows`` rows (no copy until the batch appends to it)."""
    return type(cache)(
        ddp_cache_data=[
            (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
            for layer in cache.layers
        ]
    )


def continue_cache(model, cache, key, mask, tails, max_rows, drop: int = 0) -> torch.Tensor:
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
        out[:, cols] = _continue_same_length(model, type(cache), layers, key, mask, same, max_rows)
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
