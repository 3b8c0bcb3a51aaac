"""Evaluation runs: a dataset × a set of templates × a scorer, in one call.

::

    from peftkit import evaluate_prompts
    run = evaluate_prompts("smollm2-135m", "../shared/data/sst2", "sentiment",
                           calibration="content-free", max_rows=500)
    print(run.table())            # one row per template, then mean ± std across templates
    run.save("runs/sst2-zero-shot")   # results.json + predictions.jsonl (every example)

Each template's row holds accuracy, macro-F1, expected calibration error, examples/s and
how many inputs were cut to fit the context; with ``calibration="content-free"`` it also
holds the same metrics before calibration (``before``), from the same forward passes.
Accuracy and macro-F1 carry 95% bootstrap intervals over the scored rows, per template and
for the mean over templates (rows and templates resampled; see ``prompting.results``).

Under ``accelerate launch`` (or torchrun) the examples are split across the processes
(rank r takes rows r, r+W, r+2W, ...), each scores its share and the probabilities are
gathered, so every process returns the whole result and a large evaluation scales out
with no code change. examples/s is then the whole split over the slowest process's time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.config.scorers import pick_scorer, scorer_row
from peftkit.errors import ConfigError
from peftkit.prompting.results import PromptEvaluation, TemplateResult

__all__ = ["PromptEvaluation", "TemplateResult", "evaluate_prompts", "base_has"]

log = logging.getLogger(__name__)
CALIBRATIONS = ("none", "content-free")


NEEDS_TEXT = {
    "causal-lm": "a causal LM",
    "masked-lm": "a base with a masked-LM head",
    "any": "a base model",
    "nli": "an NLI classifier (config.id2label with an 'entailment' class)",
}


def base_has(base: Any) -> Callable[[str], bool]:
    """``has(need)``: whether ``base`` has what a scorer needing ``need`` takes (a
    ``config.scorers.NEEDS`` value)."""
    from peftkit.prompting.scorers.common import has_lm_head

    causal = base.kind == "causal-lm"
    id2label = getattr(getattr(base.model, "config", None), "id2label", None) or {}
    entails = any(str(v).lower().startswith("entail") for v in id2label.values())
    found = {
        "causal-lm": causal,
        "masked-lm": not causal and has_lm_head(base.model),
        "any": True,
        "nli": not causal and entails and hasattr(base.model, "classifier"),
    }
    return lambda need: found[need]


def config_has(config: Any, kind: str = "auto") -> Callable[[str], bool]:
    """``has(need)`` as :func:`base_has` gives it for the base that ``load_base(source,
    kind=kind)`` makes of ``config`` (``models.base.model_config(source)``), told without
    loading the weights: a causal LM where ``kind`` (``"auto"``: from the config) is
    causal-lm, else a head-less encoder (``AutoModel``: no masked-LM head, no classifier)."""
    from peftkit.models.base import infer_kind

    causal = (infer_kind(config) if kind == "auto" else kind) == "causal-lm"
    found = {"causal-lm": causal, "masked-lm": False, "any": True, "nli": False}
    return lambda need: found[need]


def without_demonstrations(
    scorer: str, has: Callable[[str], bool], uses_mask: Sequence[bool]
) -> str | None:
    """The first scorer that ``scorer`` resolves to for templates with or without a
    ``{mask}`` (``uses_mask``, one per template, in order) that takes no demonstrations;
    None when every one takes them."""
    for mask in uses_mask:
        used = pick_scorer(scorer, has, mask)
        if not scorer_row(used).demonstrations:
            return used
    return None


def evaluate_prompts(
    base: Any,
    data: Any,
    prompts: Any,
    *,
    templates: Sequence[str] | None = None,
    split: str = "test",
    scorer: str = "auto",
    normalize: str = "sum",
    calibration: str = "none",
    demonstrations: int = 0,
    demo_selection: str = "random",
    seed: int = 0,
    max_rows: int | None = None,
    sample: str = "stratified",
    demo_pool: Any = None,
    batch_size: int = 16,
    skip_mask_templates: bool = True,
) -> PromptEvaluation:
    """Score ``data``'s ``split`` with every template of ``prompts``; see the module doc.

    ``base``: a :class:`peftkit.models.base.Base` or a source for ``load_base`` (``"smollm2-135m"``,
    a folder, a hub id). ``data``: a ``TextDataset`` or a source for ``load_data``.
    ``prompts``: a prompt set name or YAML path, a ``PromptSet``, a ``Prompt`` or a list of
    them; ``templates`` picks some by name. ``demonstrations``: k in-context examples per
    class from the train split, ``demo_selection`` ``"random"`` (seeded, shared by every
    query) or ``"nearest"`` (per query, by the base's embeddings), drawn from ``demo_pool``
    (a ``Split``; default the train split). ``max_rows``: N rows of the split, a seeded
    sample stratified by label (``sample="stratified"``, every label kept where N allows) or
    the first N (``sample="first"``). Templates with a ``{mask}`` are skipped (and logged) unless
    the scorer fills one. ``scorer``: a row of ``peftkit.config.scorers.SCORER_TABLE`` or
    ``"auto"`` (the first the base can run). Progress goes to the ``peftkit.prompting`` logger. The embedding scorer over a whole set that has ``descriptions``
    also scores those (a first row named ``descriptions``; pick it alone with
    ``templates=["descriptions"]``).
    """
    from peftkit.data.load import TextDataset, load_data
    from peftkit.models.base import Base, load_base

    if calibration not in CALIBRATIONS:
        raise ConfigError(
            f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}"
        )
    if demo_selection not in ("random", "nearest"):
        raise ConfigError(f"demo_selection must be 'random' or 'nearest'; got {demo_selection!r}")
    if demonstrations < 0:
        raise ConfigError(f"demonstrations must be >= 0 (k per class); got {demonstrations}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1 (or None: every row); got {max_rows}")
    if sample not in ("stratified", "first"):
        raise ConfigError(f"sample must be 'stratified' or 'first'; got {sample!r}")
    if scorer != "auto" and demonstrations and not scorer_row(scorer).demonstrations:
        raise ConfigError(f"the {scorer} scorer takes no demonstrations; use demonstrations=0")
    pick_scorer(scorer, lambda _need: True, False)  # a name the table has
    if demo_selection == "nearest" and calibration != "none" and demonstrations:
        raise ConfigError(
            "content-free calibration needs demonstrations shared by every query; "
            "use demo_selection='random'"
        )
    if not isinstance(base, Base):
        base = load_base(base)
    if not isinstance(data, TextDataset):
        data = load_data(data)
    has = base_has(base)
    _check_needs(scorer, has, base)
    chosen = _prompts(prompts, templates, pick_scorer(scorer, has, False) == "embedding")
    masks = [p.template.uses_mask for p in chosen]
    refused = without_demonstrations(scorer, has, masks) if demonstrations else None
    if refused is not None:
        raise ConfigError(f"the {refused} scorer takes no demonstrations; use demonstrations=0")
    rows = data.split(split)
    if max_rows is not None and max_rows < len(rows):
        from peftkit.data.load import stratified_rows

        kept = (
            range(max_rows) if sample == "first" else stratified_rows(rows.labels, max_rows, seed)
        )
        rows = rows.subset(kept)
        log.info(
            "scoring %d of the %d %s rows (%s)", max_rows, len(data.split(split)), split, sample
        )
    state = _state()
    mine = list(range(state.process_index, len(rows), state.num_processes))
    shard = rows.subset(mine)
    demos = _demos(base, data, demo_pool, shard, demonstrations, demo_selection, seed)
    method = f"few-shot-{demonstrations}" if demonstrations else "zero-shot"
    results = []
    for prompt in chosen:
        used = pick_scorer(scorer, has, prompt.template.uses_mask)
        row = scorer_row(used)
        if prompt.template.uses_mask and not row.fills_mask:
            why = (
                "a masked LM"
                if base.kind == "causal-lm" or has("masked-lm")
                else ("a masked-LM head, which this base has not")
            )
            if skip_mask_templates and len(chosen) > 1:
                log.info("skipping template %r: its {mask} needs %s", prompt.name, why)
                continue
            raise ConfigError(
                f"template {prompt.name!r} has a {{mask}} field, which only a scorer that "
                f"fills it (masked-lm) can use; the {used} scorer cannot"
            )
        results.append(
            _evaluate_one(
                base, prompt, used, rows, mine, shard, data.labels, demos,
                normalize=normalize, calibration=calibration, batch_size=batch_size,
                state=state,
            )
        )  # fmt: skip
    if not results:
        raise ConfigError("no template left to evaluate (all need a masked LM)")
    config = {
        "base": base.source,
        "base_fingerprint": base.fingerprint.id,
        "base_dtype": str(base.model.dtype).removeprefix("torch."),
        "method": method,
        "scorer": scorer,
        "normalize": normalize,
        "calibration": calibration,
        "demonstrations": demonstrations,
        "demo_selection": demo_selection if demonstrations else None,
        "seed": seed,
        "batch_size": batch_size,
        "max_rows": max_rows,
    }
    return PromptEvaluation(
        data=data.name,
        split=split,
        labels=tuple(data.labels),
        texts=tuple(rows.texts),
        gold=tuple(rows.labels),
        config=config,
        results=results,
        processes=state.num_processes,
    )


def _evaluate_one(
    base, prompt, scorer, rows, mine, shard, labels, demos, *, normalize, calibration,
    batch_size, state,
) -> TemplateResult:  # fmt: skip
    from peftkit.metrics.report import probability_metrics
    from peftkit.prompting.calibration import content_free_probs, contextual_calibration

    def score(texts: list[str], pairs: list[str] | None):
        return _score(base, prompt, scorer, texts, pairs, labels, demos, normalize, batch_size)

    t0 = time.perf_counter()
    if len(shard):
        result = score(list(shard.texts), shard.text_pairs and list(shard.text_pairs))
        local, cut = result.probs, result.truncated
    else:  # more processes than rows
        local, cut = np.zeros((0, len(labels))), 0
    seconds = time.perf_counter() - t0
    probs, truncated, seconds = _gather(state, mine, local, cut, seconds, len(rows))
    raw = probs
    if calibration == "content-free":
        has_pairs = rows.text_pairs is not None
        p_cf = content_free_probs(lambda t: score(t, list(t) if has_pairs else None).probs)
        probs = contextual_calibration(probs, p_cf)

    def metrics(p: np.ndarray) -> dict[str, float]:
        return probability_metrics(list(rows.labels), p, labels)

    final = metrics(probs)
    return TemplateResult(
        template=prompt.name,
        scorer=scorer,
        accuracy=final["accuracy"],
        macro_f1=final["macro_f1"],
        ece=final["ece"],
        examples_per_s=len(rows) / seconds if seconds > 0 else float("inf"),
        seconds=round(seconds, 3),
        truncated=truncated,
        probs=probs,
        before=metrics(raw) if calibration != "none" else None,
    )


def _check_needs(scorer: str, has: Callable[[str], bool], base: Any) -> None:
    """A scorer named outright must be one the base can run."""
    if scorer == "auto" or has(scorer_row(scorer).needs):
        return
    article = "an" if base.kind[0] in "aeiou" else "a"
    loaded = f"{base.source!r} is loaded as {article} {base.kind} ({type(base.model).__name__})"
    fallback = pick_scorer("auto", has, False)
    raise ConfigError(
        f"the {scorer} scorer needs {NEEDS_TEXT[scorer_row(scorer).needs]}; {loaded}: use "
        f"scorer {fallback!r} (or 'auto')"
    )


def _score(base, prompt, scorer, texts, pairs, labels, demos, normalize, batch_size):
    row = scorer_row(scorer)
    fn = row.load()
    if row.reads == "labels":
        return fn(
            base.model, base.tokenizer, texts, prompt.verbalizer, labels=labels,
            batch_size=batch_size,
        )  # fmt: skip
    return fn(
        base.model, base.tokenizer, prompt, texts, pairs, labels=labels, demos=demos,
        normalize=normalize, batch_size=batch_size,
    )  # fmt: skip


def _prompts(prompts: Any, templates: Sequence[str] | None, embedding: bool) -> list[Any]:
    """The prompts to score; a whole set scored by embeddings starts with its descriptions
    (a sentence encoder compares texts with them too)."""
    from peftkit.prompting.templates import Prompt, PromptSet, load_prompt_set

    if isinstance(prompts, (str, Path)):
        prompts = load_prompt_set(prompts)
    if isinstance(prompts, Prompt):
        chosen = [prompts]
    elif isinstance(prompts, PromptSet):
        chosen = [prompts.get(t) for t in templates] if templates else list(prompts)
        if embedding and not templates and prompts.descriptions is not None:
            chosen.insert(0, prompts.descriptions_prompt())
        templates = None
    else:
        chosen = list(prompts)
        if not chosen or not all(isinstance(p, Prompt) for p in chosen):
            raise ConfigError("prompts must be a prompt set name/path, a PromptSet or Prompts")
    if templates:
        by_name = {p.name: p for p in chosen}
        missing = [t for t in templates if t not in by_name]
        if missing:
            raise ConfigError(f"no template {missing[0]!r}; have {', '.join(by_name)}")
        chosen = [by_name[t] for t in templates]
    return chosen


def _demos(base, data, pool, shard, k: int, selection: str, seed: int):
    from peftkit.prompting.demonstrations import nearest_demos, sample_demos

    if not k:
        return None
    pool = pool if pool is not None else data.split("train")
    if selection == "random":
        return sample_demos(
            pool.texts, pool.labels, k, seed=seed, label_names=data.labels,
            text_pairs=pool.text_pairs,
        )  # fmt: skip
    from peftkit.prompting.scorers import embed_texts

    return nearest_demos(
        shard.texts, pool.texts, pool.labels, k,
        lambda t: embed_texts(base.model, base.tokenizer, t),
        label_names=data.labels, text_pairs=pool.text_pairs, query_pairs=shard.text_pairs,
    )  # fmt: skip


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _gather(state, mine, local, truncated, seconds, n):
    """The whole split's probabilities, truncation count and the slowest shard's time."""
    if state.num_processes == 1:
        return local, truncated, seconds
    from accelerate.utils import gather_object

    parts = gather_object([(mine, local, truncated, seconds)])
    probs = np.zeros((n, local.shape[1]), dtype=local.dtype)
    for idx, p, _, _ in parts:
        if len(idx):
            probs[idx] = p
    return probs, sum(t for _, _, t, _ in parts), max(s for _, _, _, s in parts)
