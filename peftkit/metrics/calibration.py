"""How far a classifier's confidence can be trusted: temperature scaling, expected calibration
error, reliability diagrams, a reject threshold chosen for a target, risk-coverage curves.
Numpy (and scipy's scalar minimiser); no torch.

Everything works on probabilities, ``(n, C)`` rows summing to 1: their logs serve as logits,
since ``softmax(log p / T)`` is temperature scaling of the logits that gave ``p``::

    from peftkit.metrics.calibration import (
        apply_temperature, choose_threshold, expected_calibration_error, fit_temperature)

    T = fit_temperature(val_probs, val_gold)             # one scalar, NLL on validation
    temperature_bound(T)                                 # "lower"/"upper": stopped at a bound
    calibrated = apply_temperature(test_probs, T)        # same argmax, better confidence
    expected_calibration_error(calibrated, test_gold)    # 15 equal-width bins
    choice = choose_threshold(apply_temperature(val_probs, T), val_gold, precision=0.95)
    choice.threshold, choice.coverage                    # answer rows with score >= it

With ``out_of_scope`` (a label id) a row predicted as that label counts as an abstention,
whatever its confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftkit.errors import ConfigError, DataError, did_you_mean
from peftkit.metrics.report import expected_calibration_error

__all__ = [
    "N_BINS",
    "TEMPERATURE_BOUNDS",
    "ThresholdChoice",
    "abstained",
    "apply_temperature",
    "bound_text",
    "choose_threshold",
    "expected_calibration_error",
    "fit_temperature",
    "label_index",
    "negative_log_likelihood",
    "out_of_scope_scores",
    "reliability",
    "risk_coverage",
    "temperature_bound",
]

N_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
_AT_BOUND = 1e-3  # in log T: a fit this close to a search bound is that bound
MIN_ANSWERED = 10  # rows a precision target must be met over
_FLOOR = 1e-300  # log(0) would be -inf: a float32 softmax underflows on large logit gaps


def _checked(probs: Any, y_true: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise DataError(f"probs must be a non-empty (n, C) array; got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise DataError("probs must be probabilities (softmax output, not logits)")
    if y_true is None:
        return p, None
    y = np.asarray(y_true).reshape(-1)
    if y.size != p.shape[0]:
        raise DataError(f"probs has {p.shape[0]} rows but y_true has {y.size} items")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]):
        raise DataError(f"y_true must be label ids in [0, {p.shape[1]})")
    return p, y.astype(np.int64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """``softmax(log probs / temperature)`` per row (float64); the argmax is unchanged.

    >>> apply_temperature(np.array([[0.8, 0.2]]), 2.0).round(3)
    array([[0.667, 0.333]])
    """
    if not np.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    p, _ = _checked(probs)
    return np.exp(_log_softmax(np.log(np.maximum(p, _FLOOR)) / float(temperature)))


def negative_log_likelihood(probs: Any, y_true: Any, temperature: float = 1.0) -> float:
    """Mean ``-log p(gold)`` after scaling by ``temperature``."""
    p, y = _checked(probs, y_true)
    assert y is not None
    logp = _log_softmax(np.log(np.maximum(p, _FLOOR)) / float(temperature))
    return float(-logp[np.arange(y.size), y].mean())


def fit_temperature(
    probs: Any, y_true: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature in ``bounds`` minimising the NLL of ``y_true`` (temperature
    scaling, Guo et al. 2017): one scalar, fit on held-out rows. The NLL is convex in
    ``1/T``, so a bounded scalar search on ``log T`` finds its minimum."""
    from scipy.optimize import minimize_scalar

    p, y = _checked(probs, y_true)
    assert y is not None
    logp = np.log(np.maximum(p, _FLOOR))
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logp / np.exp(log_t))[rows, y].mean())

    low, high = np.log(bounds[0]), np.log(bounds[1])
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    best = float(found.x)
    # the bounded search never evaluates the ends: a minimum there is taken as it is, and a
    # search that stopped next to an end (the NLL still falling there) stopped at it
    best = min((low, best, high), key=nll)
    if best - low < _AT_BOUND:
        return float(bounds[0])
    if high - best < _AT_BOUND:
        return float(bounds[1])
    return float(np.exp(best))


def temperature_bound(
    temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> str | None:
    """``"lower"`` or ``"upper"`` when a :func:`fit_temperature` result is one of its search
    bounds (the NLL was still falling there: not a fitted value), else None."""
    if temperature <= bounds[0]:
        return "lower"
    if temperature >= bounds[1]:
        return "upper"
    return None


def bound_text(side: str, rows: int, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> str:
    """One line saying what a temperature stopped at its search bound means."""
    if side == "lower":
        why = "nearly all answered confidently and right, so sharpening kept lowering the NLL"
    else:
        why = "answered confidently and wrong so often that flattening kept lowering the NLL"
    value = bounds[0] if side == "lower" else bounds[1]
    return (
        f"calibration: the temperature stopped at its {side} search bound {value:g}: the "
        f"{rows} validation rows are {why} (or are too few to fit on); {value:g} is stored, "
        "a limit rather than a fit"
    )


def reliability(probs: Any, y_true: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """A reliability diagram's data: per equal-width confidence bin (right-closed, as
    :func:`expected_calibration_error` bins), its rows, mean confidence and accuracy
    (None for an empty bin), and the ECE."""
    p, y = _checked(probs, y_true)
    assert y is not None
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    count, conf, acc = [], [], []
    for b in range(n_bins):
        inside = bins == b
        count.append(int(inside.sum()))
        conf.append(float(confidence[inside].mean()) if inside.any() else None)
        acc.append(float(correct[inside].mean()) if inside.any() else None)
    return {
        "edges": [round(float(e), 6) for e in edges],
        "count": count,
        "confidence": conf,
        "accuracy": acc,
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
    }


# --- abstaining ------------------------------------------------------------------------------


def abstained(probs: Any, threshold: float | None, out_of_scope: int | None = None) -> np.ndarray:
    """Which rows abstain: top probability below ``threshold``, or predicted ``out_of_scope``."""
    p, _ = _checked(probs)
    out = np.zeros(p.shape[0], dtype=bool)
    if threshold is not None:
        out |= p.max(axis=1) < threshold
    if out_of_scope is not None:
        out |= p.argmax(axis=1) == out_of_scope
    return out


@dataclass(frozen=True)
class ThresholdChoice:
    """A reject threshold and what it gives on the rows it was chosen on."""

    threshold: float  # answer a row when its top probability is >= this
    coverage: float  # share of rows answered
    precision: float  # accuracy among the answered rows (1.0 when none is answered)
    target: dict[str, float]  # {"precision": x} or {"coverage": y}
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "coverage": round(self.coverage, 6),
            "precision": round(self.precision, 6),
            "target": dict(self.target),
            "rows": self.rows,
        }


def _sweep(p: np.ndarray, y: np.ndarray, out_of_scope: int | None):
    """Candidate thresholds (the distinct top probabilities, highest first) with the
    answered rows and correct answered rows at each (``score >= threshold``)."""
    confidence = p.max(axis=1)
    pred = p.argmax(axis=1)
    eligible = np.ones(y.size, dtype=bool) if out_of_scope is None else pred != out_of_scope
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    answered = np.cumsum(eligible[order])
    correct = np.cumsum((eligible & (pred == y))[order])
    # the last index of each run of equal confidences: ties are answered together
    last = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    return conf_sorted[last], answered[last], correct[last]


def choose_threshold(
    probs: Any,
    y_true: Any,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    out_of_scope: int | None = None,
    where: str = "validation",
    min_answered: int = MIN_ANSWERED,
) -> ThresholdChoice:
    """The threshold meeting one target on these rows: ``precision`` (accuracy among the
    answered rows at least this, answering as many rows as possible) or ``coverage`` (at
    least this share answered, at the highest threshold that does). A precision counts only
    over at least ``min_answered`` answered rows (all of them when there are fewer): one
    confident row answered right is no measurement. ConfigError naming the best achievable
    when no threshold meets the target."""
    if (precision is None) == (coverage is None):
        raise ConfigError("give exactly one reject target: precision=X or coverage=Y")
    goal = precision if precision is not None else coverage
    assert goal is not None
    if not 0 < goal <= 1:
        raise ConfigError(f"a reject target must be in (0, 1], got {goal!r}")
    p, y = _checked(probs, y_true)
    assert y is not None
    thresholds, answered, correct = _sweep(p, y, out_of_scope)
    n = y.size
    share = answered / n
    prec = np.divide(correct, answered, out=np.ones(len(answered)), where=answered > 0)
    oos = " (rows predicted out-of-scope abstain)" if out_of_scope is not None else ""
    if answered[-1] == 0:
        raise ConfigError(f"no threshold answers any of the {n} {where} rows{oos}: all abstain")
    if precision is not None:
        enough = answered >= max(1, min(min_answered, int(answered[-1])))
        ok = np.flatnonzero((prec >= precision - 1e-12) & enough)
        if ok.size == 0:
            best = int(np.argmax(np.where(enough, prec, -1.0)))
            raise ConfigError(
                f"no threshold reaches precision >= {precision:g} on the {n} {where} rows"
                f"{oos}: the best achievable is {prec[best]:.4f} (threshold "
                f"{thresholds[best]:.4f}, coverage {share[best]:.4f}, at least "
                f"{min(min_answered, int(answered[-1]))} rows answered); lower the target"
            )
        i = int(ok[-1])  # the lowest such threshold: the most rows answered
        target = {"precision": float(precision)}
    else:
        assert coverage is not None
        ok = np.flatnonzero(share >= coverage - 1e-12)
        if ok.size == 0:
            raise ConfigError(
                f"no threshold answers a coverage of {coverage:g} of the {n} {where} rows"
                f"{oos}: the best achievable is {share[-1]:.4f}; lower the target"
            )
        i = int(ok[0])  # the highest such threshold
        target = {"coverage": float(coverage)}
    return ThresholdChoice(float(thresholds[i]), float(share[i]), float(prec[i]), target, n)


def risk_coverage(
    probs: Any, y_true: Any, out_of_scope: int | None = None, max_points: int = 200
) -> dict[str, Any]:
    """The risk-coverage curve: at each threshold (highest first), the share of rows
    answered and the error rate among them; with the area under it (AURC, lower is better)
    and at most ``max_points`` points kept (the last, full-coverage one always)."""
    p, y = _checked(probs, y_true)
    assert y is not None
    thresholds, answered, correct = _sweep(p, y, out_of_scope)
    keep = answered > 0
    thresholds, answered, correct = thresholds[keep], answered[keep], correct[keep]
    coverage = answered / y.size
    risk = 1 - correct / np.maximum(answered, 1)
    # AURC: the mean risk over rows taken in confidence order (a step function of coverage)
    steps = np.diff(np.r_[0, answered])
    aurc = float((risk * steps).sum() / max(answered[-1], 1)) if answered.size else 0.0
    if len(coverage) > max_points:
        idx = np.unique(np.r_[np.linspace(0, len(coverage) - 1, max_points).astype(int)])
        thresholds, coverage, risk = thresholds[idx], coverage[idx], risk[idx]
    return {
        "threshold": [round(float(t), 6) for t in thresholds],
        "coverage": [round(float(c), 6) for c in coverage],
        "risk": [round(float(r), 6) for r in risk],
        "aurc": round(aurc, 6),
        "rows": int(y.size),
    }


def out_of_scope_scores(
    probs: Any, y_true: Any, out_of_scope: int, threshold: float | None
) -> dict[str, float]:
    """Precision and recall of the out-of-scope label: as predicted, and with every
    abstention (top probability below ``threshold``) counted as an out-of-scope answer."""
    p, y = _checked(probs, y_true)
    assert y is not None
    pred = p.argmax(axis=1)
    out: dict[str, float] = {}
    for key, flagged in (
        ("", pred == out_of_scope),
        ("_thresholded", abstained(p, threshold, out_of_scope)),
    ):
        gold = y == out_of_scope
        hits = int((flagged & gold).sum())
        out[f"precision{key}"] = hits / int(flagged.sum()) if flagged.any() else 0.0
        out[f"recall{key}"] = hits / int(gold.sum()) if gold.any() else 0.0
    return {k: round(v, 6) for k, v in out.items()}


def label_index(labels: Sequence[str], label: str | None, where: str) -> int | None:
    """``label``'s id among ``labels`` (None for None); ConfigError naming the valid ones."""
    if label is None:
        return None
    if label not in labels:
        raise ConfigError(
            f"{where}: out-of-scope label {label!r} is not one of the data's labels"
            f"{did_you_mean(label, list(labels))} ({', '.join(labels)})"
        )
    return list(labels).index(label)
