"""After the tasks of a recipe are trained: revisit the earlier ones (continual learning) and
switch between the adapters just registered (``hotswap:``), timing it."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

log = logging.getLogger("peftkit.run")


def revisit(base, registry, tasks: list[Any], refs: list[str]) -> dict[str, float]:
    """Accuracy of each task's adapter (``refs``, one per task: its own, or the one that
    continued it) on that task's test split (continual learning). A label the task does
    not have (a continued adapter's new one) counts as wrong."""
    from peftkit.serving.adapted import AdaptedModel

    model = AdaptedModel(base, registry)
    scores = {}
    try:
        for task, ref in zip(tasks, refs, strict=False):
            data = task.data
            test = data.split("test")
            preds = model.predict(list(test.texts), adapter=ref)
            gold = [data.labels[y] for y in test.labels]
            hits = sum(p.label == g for p, g in zip(preds, gold, strict=True))
            scores[task.name] = hits / max(len(gold), 1)
    finally:
        model.close()
    log.info(
        "revisit (accuracy on each earlier task): "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    )
    return scores


def hotswap(base, registry, refs: list[str], spec) -> dict[str, Any]:
    """Switch between the adapters just trained; time ``use()`` and predict a mixed batch."""
    from peftkit.serving.adapted import AdaptedModel

    model = AdaptedModel(base, registry)
    try:
        t0 = time.perf_counter()
        for ref in refs:
            model.load(ref)
        load_ms = (time.perf_counter() - t0) * 1000 / max(len(refs), 1)
        times = []
        for i in range(spec.repeats):
            t0 = time.perf_counter()
            model.use(refs[i % len(refs)])
            times.append((time.perf_counter() - t0) * 1000)
        texts = list(spec.texts)
        adapters = [refs[i % len(refs)] for i in range(len(texts))]
        preds = model.predict_mixed(texts, adapters)
    finally:
        model.close()
    use_ms = statistics.median(times) if times else 0.0
    log.info(
        f"\nhot-swap between {', '.join(refs)}: load {load_ms:.1f} ms each, use() {use_ms:.3f} ms"
    )
    log.info("mixed batch (each row names its adapter):")
    width = max(len(r) for r in refs)
    for text, pred in zip(texts, preds, strict=True):
        log.info(f"  {pred.adapter:<{width}}  {pred.label:<12} {pred.score:.2f}  {text[:60]}")
    rows = [{"text": t, **p.to_dict()} for t, p in zip(texts, preds, strict=True)]
    return {
        "adapters": refs,
        "load_ms": round(load_ms, 2),
        "use_ms": round(use_ms, 4),
        "batch": rows,
    }


# --- prompt recipes: zero-/few-shot scoring, no training -------------------------------------
