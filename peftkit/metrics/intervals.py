"""Error bars: seeded bootstrap intervals over test rows, and paired comparisons of two runs.

A score on 213 test rows is uncertain by about ±3 points; these functions say by how much::

    from peftkit.metrics.intervals import bootstrap_intervals, paired_comparison

    ci = bootstrap_intervals(gold, pred, labels)           # 1,000 resamples, seed 0
    ci["accuracy"]                                          # Interval(0.939, 0.906, 0.967)
    cmp = paired_comparison(gold, pred_a, pred_b, labels)   # same resampled rows for both
    cmp.verdict("accuracy"), cmp.mcnemar_p                  # ('not distinguishable', 0.41)

The bootstrap resamples row indices with replacement (all resamples at once, in chunks, with
numpy) and scores accuracy and macro-F1 on every resample from its confusion counts. A
run's interval is the bias-corrected and accelerated one (BCa, Efron 1987; what
``scipy.stats.bootstrap`` gives by default): the percentiles taken are moved by how far the
resamples' median sits from the estimate, and by the skew the jackknife finds. Macro-F1 with
many labels needs it: on a small test set many labels have one or two rows, its estimate
sits below the population's, and the plain percentiles (which the resamples, sparser still,
shift further down) miss it (``bench/bench_intervals.py``: 77 labels, 200 rows, 63%
coverage against 78% for BCa). The jackknife is exact and cheap: leaving out one row only
takes one from its confusion cell, so there is one leave-one-out score per occupied cell.
The difference of two runs keeps the percentile method. Macro-F1 averages over the labels
present (a gold row or a prediction), as ``compute_metrics`` does.
The paired version scores both runs on the same resampled rows, so what the two runs share
(easy and hard rows) cancels out of the difference. McNemar's exact test looks only at the
rows where one run is right and the other wrong: under "no difference" each such row is a
coin flip (scipy's ``binomtest``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftkit.errors import DataError
from peftkit.metrics.report import check_pair

__all__ = [
    "INTERVAL_METRICS",
    "RESAMPLES",
    "Interval",
    "PairedComparison",
    "bca_interval",
    "bca_intervals",
    "bootstrap_intervals",
    "bootstrap_method",
    "jackknife_scores",
    "check_settings",
    "confusion_counts",
    "mcnemar_p",
    "paired_comparison",
    "percentile_interval",
    "resampled_scores",
    "row_jackknife",
    "scores_from_counts",
]

RESAMPLES = 1000
INTERVAL_METRICS = ("accuracy", "macro_f1")
_CHUNK_CELLS = 2_000_000  # resampled row indices held at once (16 MB of int64)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_method(
    n_rows: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    kind: str = "BCa",
) -> str:
    """How an interval was made, in words for a report: ``"bootstrap over 213 test rows,
    1,000 resamples, seed 0, BCa 95%"`` (``kind``: ``"BCa"`` or ``"percentile"``)."""
    return (
        f"bootstrap over {n_rows:,} test rows, {resamples:,} resamples, seed {seed}, "
        f"{kind} {confidence:.0%}"
    )


def bootstrap_intervals(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """95% bootstrap intervals of accuracy and macro-F1 over the rows (keys of
    :data:`INTERVAL_METRICS`); the same ``seed`` gives the same intervals.

    >>> ci = bootstrap_intervals([0, 1, 1, 0] * 25, [0, 1, 0, 0] * 25, ["neg", "pos"])
    >>> ci["accuracy"].estimate, ci["accuracy"].contains(0.75)
    (0.75, True)
    """
    true, pred, names = check_pair(y_true, y_pred, labels)
    check_settings(resamples, confidence)
    n_labels = len(names)
    code = true * n_labels + pred
    samples = resampled_scores([code], n_labels, resamples, seed)[0]
    return bca_intervals(code, n_labels, samples, confidence)


def bca_intervals(
    code: np.ndarray, n_labels: int, samples: dict[str, np.ndarray], confidence: float
) -> dict[str, Interval]:
    """The BCa interval of each metric of rows coded ``true * n_labels + pred``, from its
    bootstrap ``samples`` (:func:`resampled_scores`)."""
    confusion = confusion_counts(code, n_labels)
    point = scores_from_counts(confusion[None])
    jack, weights = jackknife_scores(confusion)
    return {
        name: bca_interval(point[name][0], samples[name], jack[name], weights, confidence)
        for name in INTERVAL_METRICS
    }


def jackknife_scores(confusion: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The leave-one-row-out scores of a ``(C, C)`` confusion matrix: one per occupied
    cell (every row of a cell leaves the same matrix behind), and how many rows each
    stands for. Empty with fewer than 2 rows."""
    flat = confusion.ravel()
    cells = np.flatnonzero(flat)
    weights = flat[cells].astype(float)
    if flat.sum() < 2:
        return {m: np.zeros(0) for m in INTERVAL_METRICS}, np.zeros(0)
    per_chunk = max(1, _CHUNK_CELLS // flat.size)
    parts = []
    for start in range(0, cells.size, per_chunk):
        chunk = cells[start : start + per_chunk]
        left = np.repeat(flat[None], chunk.size, axis=0)
        left[np.arange(chunk.size), chunk] -= 1
        parts.append(scores_from_counts(left.reshape(chunk.size, *confusion.shape)))
    return {m: np.concatenate([p[m] for p in parts]) for m in INTERVAL_METRICS}, weights


def row_jackknife(code: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Each row's leave-it-out scores (rows coded ``true * n_labels + pred``), from
    :func:`jackknife_scores`' one score per cell; empty with fewer than 2 rows."""
    confusion = confusion_counts(code, n_labels)
    values, weights = jackknife_scores(confusion)
    if not weights.size:
        return values
    position = np.zeros(confusion.size, dtype=np.int64)
    position[np.flatnonzero(confusion.ravel())] = np.arange(weights.size)
    return {m: v[position[code]] for m, v in values.items()}


def bca_interval(
    estimate: float,
    samples: np.ndarray,
    jackknife: np.ndarray,
    weights: np.ndarray,
    confidence: float,
) -> Interval:
    """The bias-corrected and accelerated percentile interval (as ``scipy.stats.bootstrap``'s
    ``BCa``): bias ``z0`` from the share of ``samples`` below ``estimate`` (ties count half),
    acceleration from the skew of the ``jackknife`` scores (each counted ``weights`` times)."""
    from scipy.special import ndtr, ndtri

    n = samples.size
    below = (np.sum(samples < estimate) + 0.5 * np.sum(samples == estimate)) / n
    z0 = float(ndtri(np.clip(below, 0.5 / n, 1 - 0.5 / n)))
    accel = 0.0
    if weights.size:
        spread = np.average(jackknife, weights=weights) - jackknife
        denom = 6.0 * float(np.sum(weights * spread**2)) ** 1.5
        accel = float(np.sum(weights * spread**3)) / denom if denom > 0 else 0.0
    z = ndtri(np.array([(1 - confidence) / 2, (1 + confidence) / 2]))
    shifted = z0 + (z0 + z) / (1 - accel * (z0 + z))
    low, high = np.percentile(samples, 100 * ndtr(shifted))
    return Interval(float(estimate), float(low), float(high))


@dataclass(frozen=True)
class PairedComparison:
    """Run B against run A on the same rows: ``difference[metric]`` is B - A with its paired
    bootstrap interval; ``mcnemar_p`` is McNemar's exact p-value for accuracy;
    ``a_only``/``b_only`` count the rows only A (only B) gets right."""

    rows: int
    difference: dict[str, Interval]
    mcnemar_p: float
    a_only: int
    b_only: int
    method: str

    def verdict(self, metric: str = "accuracy") -> str:
        """``"not distinguishable"`` when the interval of the difference holds 0, else which
        run is better."""
        diff = self.difference[metric]
        if diff.contains(0.0):
            return "not distinguishable"
        return "B is better" if diff.estimate > 0 else "A is better"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "difference": {k: v.to_dict() for k, v in self.difference.items()},
            "verdict": {k: self.verdict(k) for k in self.difference},
            "mcnemar_p": self.mcnemar_p,
            "a_only_correct": self.a_only,
            "b_only_correct": self.b_only,
            "method": self.method,
        }


def paired_comparison(
    y_true: Sequence[int] | np.ndarray,
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare two runs scored on the same rows (``pred_a``, ``pred_b`` against one
    ``y_true``): the paired bootstrap interval of B - A for accuracy and macro-F1 (the same
    resampled rows for both runs) and McNemar's exact test for accuracy.

    >>> cmp = paired_comparison([0, 1] * 50, [0, 1] * 50, [0, 1] * 50, ["neg", "pos"])
    >>> cmp.verdict("accuracy"), cmp.mcnemar_p
    ('not distinguishable', 1.0)
    """
    true, a, names = check_pair(y_true, pred_a, labels)
    _, b, _ = check_pair(y_true, pred_b, labels)
    check_settings(resamples, confidence)
    n_labels = len(names)
    codes = [true * n_labels + a, true * n_labels + b]
    point = [scores_from_counts(confusion_counts(c, n_labels)[None]) for c in codes]
    sa, sb = resampled_scores(codes, n_labels, resamples, seed)
    difference = {
        name: percentile_interval(
            point[1][name][0] - point[0][name][0], sb[name] - sa[name], confidence
        )
        for name in INTERVAL_METRICS
    }
    right_a, right_b = a == true, b == true
    a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    return PairedComparison(
        rows=int(true.size),
        difference=difference,
        mcnemar_p=mcnemar_p(a_only, b_only),
        a_only=a_only,
        b_only=b_only,
        method=f"paired {bootstrap_method(true.size, resamples, seed, confidence, 'percentile')}"
        "; McNemar exact",
    )


def mcnemar_p(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p-value from the discordant pairs: ``a_only`` rows only run
    A gets right, ``b_only`` only run B. 1.0 when there is none.

    >>> round(mcnemar_p(1, 9), 4)   # 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 22/1024
    0.0215
    """
    if a_only < 0 or b_only < 0:
        raise DataError(f"discordant counts must be >= 0; got {a_only} and {b_only}")
    if a_only + b_only == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


# --- the resampling ------------------------------------------------------------------------


def check_settings(resamples: int, confidence: float) -> None:
    """DataError unless ``resamples`` is an integer >= 2 and ``confidence`` in (0, 1)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 2:
        raise DataError(f"resamples must be an integer of at least 2; got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence must be between 0 and 1 (0.95 for 95%); got {confidence!r}")


def resampled_scores(
    codes: list[np.ndarray], n_labels: int, resamples: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Each run's scores on ``resamples`` resamples of the rows, the same rows for every
    run. ``codes`` holds, per run, ``true * n_labels + pred`` for each row."""
    n = codes[0].size
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // n)
    cells = n_labels * n_labels
    out: list[list[dict[str, np.ndarray]]] = [[] for _ in codes]
    for start in range(0, resamples, per_chunk):
        k = min(per_chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        offset = (np.arange(k) * cells)[:, None]
        for run, code in enumerate(codes):
            counts = np.bincount((code[idx] + offset).ravel(), minlength=k * cells)
            out[run].append(scores_from_counts(counts.reshape(k, n_labels, n_labels)))
    return [{m: np.concatenate([c[m] for c in chunks]) for m in INTERVAL_METRICS} for chunks in out]


def confusion_counts(code: np.ndarray, n_labels: int) -> np.ndarray:
    """The ``(C, C)`` confusion matrix of rows coded ``true * n_labels + pred``."""
    return np.bincount(code, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def scores_from_counts(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro-F1 of each ``(k, C, C)`` confusion matrix (rows: true labels); the
    macro average over the labels present in that matrix (a gold row or a prediction), as
    :func:`peftkit.metrics.report.compute_metrics`."""
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(float)
    total = confusion.sum(axis=(1, 2))
    denom = confusion.sum(axis=2) + confusion.sum(axis=1)  # 2tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    macro = f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return {"accuracy": tp.sum(axis=1) / total, "macro_f1": macro}


def percentile_interval(estimate: float, samples: np.ndarray, confidence: float) -> Interval:
    """``estimate`` with the central ``confidence`` share of ``samples`` as its interval."""
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))
