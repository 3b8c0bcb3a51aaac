"""Calibrating zero/few-shot label probabilities, and measuring what it changed.

Two corrections for a prompt's bias towards some labels:

- **contextual calibration** (Zhao et al., 2021): score content-free inputs ("N/A", "",
  "[MASK]") with the same prompt and demonstrations; their mean probabilities ``p_cf`` are
  the prompt's bias, and ``calibrated = (p / p_cf)`` renormalized per row;
- **domain-conditional PMI** (Holtzman et al., 2021): ``log P(label | prompt) -
  log P(label | domain prompt)``; ``score_causal(..., normalize="pmi")`` computes it and
  :func:`domain_pmi` does the subtraction on arrays you already have.

::

    from peftkit.prompting.calibration import calibration_report, content_free_probs, contextual_calibration

    score = lambda texts: score_causal(model, tok, prompt, texts, demos=demos).probs
    p_cf = content_free_probs(score)
    before = score(test_texts)
    after = contextual_calibration(before, p_cf)
    calibration_report(test_label_ids, before, after, labels=("negative", "positive"))
    # {'before': {'accuracy': ..., 'macro_f1': ..., 'ece': ...}, 'after': {...}}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from peftkit.errors import DataError
from peftkit.metrics.report import probability_metrics

__all__ = [
    "CONTENT_FREE",
    "calibration_report",
    "content_free_probs",
    "contextual_calibration",
    "domain_pmi",
]

CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_probs(
    score: Callable[[list[str]], np.ndarray], inputs: Sequence[str] = CONTENT_FREE
) -> np.ndarray:
    """``p_cf``: the mean label probabilities ``score`` gives the content-free ``inputs``.

    ``score`` maps texts to an ``(n, n_labels)`` probability array (the same prompt and
    demonstrations as the real inputs will get).
    """
    probs = _as_probs(score(list(inputs)), "the content-free probabilities")
    return probs.mean(axis=0)


def contextual_calibration(probs: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """``probs / p_cf``, each row renormalized to sum to 1 (the identity for a uniform p_cf).

    >>> contextual_calibration(np.array([[0.6, 0.4]]), np.array([0.75, 0.25])).round(3)
    array([[0.333, 0.667]])
    """
    p = _as_probs(probs, "probs")
    cf = np.asarray(p_cf, dtype=float).reshape(-1)
    if cf.shape[0] != p.shape[1]:
        raise DataError(f"p_cf has {cf.shape[0]} labels but probs has {p.shape[1]} columns")
    if np.any(cf <= 0):
        raise DataError("p_cf must be positive for every label (it divides the probabilities)")
    out = p / cf
    return out / out.sum(axis=1, keepdims=True)


def domain_pmi(logprobs: np.ndarray, domain_logprobs: np.ndarray) -> np.ndarray:
    """``log P(label | prompt) - log P(label | domain)``; ``domain_logprobs`` broadcasts.

    >>> domain_pmi(np.log([[0.5, 0.5]]), np.log([0.8, 0.2])).argmax(axis=1)
    array([1])
    """
    cond = np.asarray(logprobs, dtype=float)
    base = np.asarray(domain_logprobs, dtype=float)
    if base.shape[-1] != cond.shape[-1]:
        raise DataError(f"domain scores have {base.shape[-1]} labels, scores {cond.shape[-1]}")
    return cond - base


def calibration_report(
    y_true: Sequence[int] | np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    labels: Sequence[str],
    n_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1 and expected calibration error before and after calibration.

    ``before``/``after`` are ``(n, n_labels)`` probabilities; ``y_true`` are label ids.
    """
    return {
        name: probability_metrics(y_true, _as_probs(probs, name), labels, n_bins=n_bins)
        for name, probs in (("before", before), ("after", after))
    }


def _as_probs(probs: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty (n, n_labels) array; got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise DataError(f"{what} must be probabilities (softmax output, not log-probs)")
    return p
