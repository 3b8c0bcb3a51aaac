"""In-context demonstrations for few-shot prompting, and fitting prompts to a context.

Pick k demonstrations per class, at random (seeded) or by nearest neighbours under an
embedding function; every selection is ordered reproducibly. :func:`fit_prompts` writes
each query's prompt (demonstrations, then the query) and makes it fit the model's context
by cutting input *text* only: never the template, never the label words. It counts the
prompts it had to cut::

    from peftkit.prompting.demonstrations import sample_demos, fit_prompts

    demos = sample_demos(split.texts, split.labels, k=2, seed=0, label_names=data.labels)
    fitted = fit_prompts(tokenizer, prompt, ["what a film"], demos=demos, budget=1024)
    fitted.prompts[0]   # 'great fun\\nSentiment: positive\\n\\n...\\n\\nwhat a film\\nSentiment:'
    fitted.truncated    # how many prompts lost some input text

The scorers call :func:`fit_prompts` themselves; pass ``demos=`` to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from peftkit.errors import ConfigError, DataError
from peftkit.prompting.templates import Prompt

__all__ = ["Demo", "FittedPrompts", "fit_prompts", "nearest_demos", "render", "sample_demos"]

Encode = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class Demo:
    """One demonstration: an input with its gold label name."""

    text: str
    label: str
    text_pair: str | None = None

    def row(self) -> dict[str, str | None]:
        return {"text": self.text, "text_pair": self.text_pair}


# --- choosing demonstrations ---------------------------------------------------------------


def sample_demos(
    texts: Sequence[str],
    labels: Sequence[str] | Sequence[int],
    k: int,
    *,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    text_pairs: Sequence[str] | None = None,
    order: str = "interleave",
) -> tuple[Demo, ...]:
    """``k`` random demonstrations per class (seeded), shared by every query.

    ``labels`` are names, or ids into ``label_names``. ``order="interleave"`` alternates
    classes (class order, then draw order); ``"shuffle"`` is a seeded permutation.

    >>> sample_demos(["a", "b", "c", "d"], ["x", "y", "x", "y"], k=1, seed=0)
    (Demo(text='c', label='x', text_pair=None), Demo(text='d', label='y', text_pair=None))
    """
    if order not in ("interleave", "shuffle"):
        raise ConfigError(f"order must be 'interleave' or 'shuffle'; got {order!r}")
    names, by_class = _by_class(texts, labels, label_names, text_pairs, k)
    rng = np.random.default_rng(seed)
    picked = {c: [int(i) for i in rng.choice(by_class[c], size=k, replace=False)] for c in names}
    if order == "interleave":
        chosen = [picked[c][j] for j in range(k) for c in names]
    else:
        chosen = [i for c in names for i in picked[c]]
        chosen = [chosen[j] for j in rng.permutation(len(chosen))]
    return tuple(_demo(i, texts, labels, label_names, text_pairs) for i in chosen)


def nearest_demos(
    queries: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[str] | Sequence[int],
    k: int,
    embed: Callable[[list[str]], np.ndarray],
    *,
    label_names: Sequence[str] | None = None,
    text_pairs: Sequence[str] | None = None,
    query_pairs: Sequence[str] | None = None,
) -> list[tuple[Demo, ...]]:
    """For each query, the ``k`` most similar pool examples of every class.

    ``embed`` maps texts to an ``(n, d)`` array (e.g. ``lambda t: embed_texts(m, tok, t)``);
    similarity is cosine, ties go to the earlier pool row. Each query's demonstrations are
    ordered from least to most similar, so the closest one sits next to the query.
    """
    names, by_class = _by_class(texts, labels, label_names, text_pairs, k)
    pool = _unit(np.asarray(embed(_joined(texts, text_pairs)), dtype=np.float64))
    asked = _unit(np.asarray(embed(_joined(queries, query_pairs)), dtype=np.float64))
    sims = asked @ pool.T
    result = []
    for row in sims:
        chosen: list[int] = []
        for c in names:
            idx = np.asarray(by_class[c])
            best = idx[np.lexsort((idx, -row[idx]))[:k]]
            chosen.extend(int(i) for i in best)
        chosen.sort(key=lambda i: (row[i], -i))
        result.append(tuple(_demo(i, texts, labels, label_names, text_pairs) for i in chosen))
    return result


def _by_class(texts, labels, label_names, text_pairs, k) -> tuple[list[str], dict[str, list[int]]]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (demonstrations per class) must be a positive integer; got {k!r}")
    if len(labels) != len(texts) or (text_pairs is not None and len(text_pairs) != len(texts)):
        raise DataError(
            f"the demonstration pool needs one label (and text pair) per text; got "
            f"{len(texts)} texts and {len(labels)} labels"
        )
    names = list(label_names) if label_names is not None else list(dict.fromkeys(map(str, labels)))
    by_class: dict[str, list[int]] = {c: [] for c in names}
    for i in range(len(texts)):
        name = _label_name(labels[i], label_names)
        if name not in by_class:
            raise DataError(f"pool row {i} has label {name!r}, not one of: {', '.join(names)}")
        by_class[name].append(i)
    short = [(c, len(rows)) for c, rows in by_class.items() if len(rows) < k]
    if short:
        listing = ", ".join(f"{c!r} has {n}" for c, n in short)
        smallest = min(len(rows) for rows in by_class.values())
        raise DataError(
            f"k={k} demonstrations per class, but the pool is too small: {listing}; "
            f"use k <= {smallest} or a larger pool"
        )
    return names, by_class


def _label_name(label, label_names) -> str:
    if label_names is not None and isinstance(label, int | np.integer):
        if not 0 <= int(label) < len(label_names):
            raise DataError(f"label id {label} is outside 0..{len(label_names) - 1}")
        return label_names[int(label)]
    return str(label)


def _demo(i, texts, labels, label_names, text_pairs) -> Demo:
    pair = None if text_pairs is None else text_pairs[i]
    return Demo(texts[i], _label_name(labels[i], label_names), pair)


def _joined(texts: Sequence[str], pairs: Sequence[str] | None) -> list[str]:
    return (
        list(texts) if pairs is None else [f"{t}\n{p}" for t, p in zip(texts, pairs, strict=True)]
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- writing and fitting prompts -------------------------------------------------------------


@dataclass(frozen=True)
class FittedPrompts:
    """Prompts that fit the budget, their token ids, and how many had text cut (which:
    ``cut_rows``)."""

    prompts: tuple[str, ...]
    ids: tuple[list[int], ...]
    budget: int
    cut_rows: tuple[int, ...] = ()

    @property
    def truncated(self) -> int:
        return len(self.cut_rows)


def render(
    prompt: Prompt,
    rows: Sequence[dict[str, str | None]],
    answers: Sequence[str],
    separator: str = "\n\n",
    mask: str | None = None,
) -> str:
    """Demonstration rows (each followed by its answer phrase), then the query row last.

    With a ``{mask}`` template the answer fills the demonstrations' mask instead.
    """
    template = prompt.template
    parts = []
    for row, answer in zip(rows[:-1], answers, strict=True):
        if template.uses_mask:
            parts.append(template.render(row, mask=answer.strip()))
        else:
            parts.append(template.render(row) + answer)
    parts.append(template.render(rows[-1], mask=mask))
    return separator.join(parts)


def fit_prompts(
    tokenizer,
    prompt: Prompt,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    *,
    budget: int,
    demos: Sequence[Demo] | Sequence[Sequence[Demo]] | None = None,
    encode: Encode | None = None,
    separator: str = "\n\n",
    mask: str | None = None,
) -> FittedPrompts:
    """One prompt per query, each at most ``budget`` tokens as ``encode`` counts them.

    ``demos`` is one tuple shared by all queries or one tuple per query. When a prompt is
    too long, the longest input texts (demonstrations' and query's alike) are cut to a
    common token length, from their end, until it fits; label words and template text are
    never cut. ``encode`` maps prompts to the ids the model sees (default: the tokenizer
    with its special tokens).
    """
    encode = encode or (lambda batch: tokenizer(batch, add_special_tokens=True)["input_ids"])
    available = ["text"] + ([] if text_pairs is None else ["text_pair"])
    prompt.template.check_fields(available)
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise DataError(f"got {len(texts)} texts but {len(text_pairs)} text_pairs")
    per_query = _per_query(demos, len(texts))
    for shots in per_query:
        for demo in shots:
            prompt.verbalizer.phrases(demo.label)  # a ConfigError names an unknown label
    all_rows, strings = [], []
    for i, shots in enumerate(per_query):
        rows = [d.row() for d in shots] + [
            {"text": texts[i], "text_pair": None if text_pairs is None else text_pairs[i]}
        ]
        answers = [prompt.verbalizer.answer(d.label) for d in shots]
        all_rows.append((rows, answers))
        strings.append(render(prompt, rows, answers, separator, mask))
    ids = list(encode(strings))
    pieces: dict[str, list[int]] = {}  # token cache for the cutting path
    cut = []
    for i, (rows, answers) in enumerate(all_rows):
        if len(ids[i]) > budget:
            strings[i], ids[i] = _fit_one(
                tokenizer, prompt, rows, answers, budget, encode, separator, mask, pieces
            )
            cut.append(i)
    return FittedPrompts(tuple(strings), tuple(ids), budget, tuple(cut))


def _per_query(demos, n: int) -> list[tuple[Demo, ...]]:
    if not demos:
        return [()] * n
    if isinstance(demos[0], Demo):
        return [tuple(demos)] * n
    if len(demos) != n:
        raise DataError(f"got demonstrations for {len(demos)} queries but {n} queries")
    return [tuple(d) for d in demos]


def _fit_one(tokenizer, prompt, rows, answers, budget, encode, separator, mask, pieces):
    """Cut the longest text fields to a common length until the prompt fits ``budget``."""
    keys = [(r, f) for r, row in enumerate(rows) for f in prompt.template.fields]
    for r, f in keys:
        value = rows[r][f]
        if value not in pieces:
            pieces[value] = tokenizer(value, add_special_tokens=False)["input_ids"]
    lengths = [len(pieces[rows[r][f]]) for r, f in keys]
    full = render(prompt, rows, answers, separator, mask)
    excess = len(encode([full])[0]) - budget
    for _ in range(8):
        cap = _water_level(lengths, excess)
        if cap < 0:
            break
        cut_rows = [dict(row) for row in rows]
        for (r, f), n in zip(keys, lengths, strict=True):
            if n > cap:
                cut_rows[r][f] = tokenizer.decode(pieces[rows[r][f]][:cap])
        text = render(prompt, cut_rows, answers, separator, mask)
        ids = encode([text])[0]
        if len(ids) <= budget:
            return text, ids
        excess += len(ids) - budget
    empty = [
        {k: ("" if k in prompt.template.fields else v) for k, v in row.items()} for row in rows
    ]
    bare = len(encode([render(prompt, empty, answers, separator, mask)])[0])
    raise DataError(
        f"prompt {prompt.name!r} does not fit the context: without any input text it takes "
        f"{bare} tokens ({len(rows) - 1} demonstrations and the template), but the budget is "
        f"{budget}; use fewer demonstrations (smaller k) or a shorter template"
    )


def _water_level(lengths: Sequence[int], excess: int) -> int:
    """The largest cap c >= 0 with sum(max(0, n - c)) >= excess; -1 if none exists."""
    if sum(lengths) < excess or not lengths:
        return -1
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(0, n - mid) for n in lengths) >= excess:
            lo = mid
        else:
            hi = mid - 1
    return lo
