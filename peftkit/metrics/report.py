"""Classification metrics: peftkit's shipped ``evaluate`` modules, a per-class report, ECE.

The hub is not reachable here, so ``evaluate.load("accuracy")`` fails. peftkit ships its
own metric scripts in ``peftkit/metrics/<name>/<name>.py`` (package data) and loads them
by path, which needs no network::

    from peftkit.metrics.report import classification_report, compute_metrics, load_metric

    load_metric("f1").compute(references=[0, 1, 1], predictions=[0, 1, 0], average="macro")
    compute_metrics([0, 1, 1], [0, 1, 0], labels=["neg", "pos"])
    # {'accuracy': 0.667, 'macro_f1': 0.667, 'weighted_f1': 0.667, 'macro_precision': 0.75, ...}
    print(classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"]).to_text())

Label ids are positions in ``labels``. A class that is never present or never predicted
scores 0.0 (sklearn's ``zero_division=0``), silently.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.errors import ConfigError, DataError, did_you_mean
from peftkit.metrics import METRICS  # noqa: F401  (what compute_metrics returns)

if TYPE_CHECKING:  # importing evaluate costs seconds (it pulls in transformers)
    import evaluate

METRIC_NAMES = ("accuracy", "f1", "precision", "recall")
METRICS_DIR = Path(__file__).resolve().parent


# --- the evaluate modules -------------------------------------------------------------


def metric_script(name: str) -> Path:
    """The shipped script of metric ``name``: ``peftkit/metrics/<name>/<name>.py``."""
    if name not in METRIC_NAMES:
        raise ConfigError(
            f"unknown metric {name!r}{did_you_mean(name, METRIC_NAMES)}; "
            f"peftkit ships: {', '.join(METRIC_NAMES)}"
        )
    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        raise ConfigError(
            f"metric script {script} is missing; the peftkit install is incomplete "
            "(reinstall it: the wheel ships peftkit/metrics/*/*.py as package data)"
        )
    return script


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load peftkit's own ``evaluate`` module ``name`` (cached; works offline).

    ``name`` is one of ``"accuracy"``, ``"f1"``, ``"precision"``, ``"recall"``. evaluate
    copies the script into its module cache (``$HF_MODULES_CACHE``) and imports it from
    there, so the install location may be read-only. Results stay in memory.

    >>> f1 = load_metric("f1")
    >>> f1.compute(references=[0, 1, 2], predictions=[0, 1, 1], average="macro")["f1"]
    0.5555555555555555
    """
    script = metric_script(name)
    import evaluate

    try:
        return evaluate.load(str(script.parent), keep_in_memory=True)
    except PermissionError as exc:
        cache = os.environ.get("HF_MODULES_CACHE", "~/.cache/huggingface/modules")
        raise ConfigError(
            f"cannot load metric {name!r}: evaluate could not write its module cache "
            f"({exc.filename or cache}); set HF_MODULES_CACHE to a writable folder"
        ) from exc


# --- input checks -----------------------------------------------------------------------


def _label_ids(values: Sequence[int] | np.ndarray, what: str, n_labels: int) -> np.ndarray:
    """``values`` as a 1-D int64 array of ids in ``[0, n_labels)``, or a DataError."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D sequence of label ids; got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(
            f"{what} must hold integer label ids (positions in labels); got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= n_labels))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{what}[{i}] = {int(arr[i])} is not a label id: there are {n_labels} labels, "
            f"so valid ids are 0..{n_labels - 1} ({bad.size} of {arr.size} ids out of range)"
        )
    return arr


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(label) for label in labels)
    if not names:
        raise DataError("labels is empty; give the label names in id order")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"labels must be unique; repeated: {', '.join(map(repr, dupes))}")
    return names


def check_pair(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Gold and predicted label ids as arrays of equal length within ``labels``, and the
    label names; a DataError naming what is wrong otherwise."""
    names = _check_labels(labels)
    true = _label_ids(y_true, "y_true", len(names))
    pred = _label_ids(y_pred, "y_pred", len(names))
    if true.size != pred.size:
        raise DataError(f"y_true has {true.size} items but y_pred has {pred.size}")
    if true.size == 0:
        raise DataError("y_true and y_pred are empty; there is nothing to score")
    return true, pred, names


# --- headline metrics ------------------------------------------------------------------


def present_labels(true: np.ndarray, pred: np.ndarray) -> list[int]:
    """The label ids with a gold row or a prediction, sorted: the ones macro averages count."""
    return sorted(set(np.unique(true).tolist()) | set(np.unique(pred).tolist()))


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
) -> dict[str, float]:
    """Accuracy, macro/weighted F1, macro precision and recall, through the evaluate modules.

    The macro averages are over the labels present: those with a gold row or a prediction
    (scikit-learn's default). A label with neither has no F1 to average; counting it as 0
    would bias a small test set's macro-F1 below the full population's, the more so the
    more labels there are.

    >>> compute_metrics([0, 1, 1, 2], [0, 1, 0, 2], labels=["a", "b", "c"])["macro_f1"]
    0.7777777777777777
    >>> compute_metrics([0, 1], [0, 1], labels=["a", "b", "never seen"])["macro_f1"]
    1.0
    """
    true, pred, names = check_pair(y_true, y_pred, labels)
    data = {"references": true.tolist(), "predictions": pred.tolist()}
    ids = present_labels(true, pred)

    def averaged(metric: str, average: str) -> float:
        result = load_metric(metric).compute(**data, labels=ids, average=average)
        return float(result[metric])

    return {
        "accuracy": float(load_metric("accuracy").compute(**data)["accuracy"]),
        "macro_f1": averaged("f1", "macro"),
        "weighted_f1": averaged("f1", "weighted"),
        "macro_precision": averaged("precision", "macro"),
        "macro_recall": averaged("recall", "macro"),
    }


# --- the per-class report --------------------------------------------------------------


@dataclass(frozen=True)
class ClassScores:
    """Precision, recall and F1 of one class (or an average), over ``support`` examples."""

    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassScores:
        return cls(
            float(data["precision"]),
            float(data["recall"]),
            float(data["f1"]),
            int(data["support"]),
        )


@dataclass(frozen=True)
class ClassificationReport:
    """Per-class scores, their macro and support-weighted averages, and the confusion matrix.

    ``per_class[i]`` belongs to ``labels[i]``; ``confusion[t][p]`` counts examples of true
    label ``t`` predicted as ``p``.
    """

    labels: tuple[str, ...]
    per_class: tuple[ClassScores, ...]
    macro: ClassScores
    weighted: ClassScores
    accuracy: float
    support: int
    confusion: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``per_class`` is keyed by label name, in label order."""
        return {
            "labels": list(self.labels),
            "per_class": {
                name: s.to_dict() for name, s in zip(self.labels, self.per_class, strict=True)
            },
            "macro": self.macro.to_dict(),
            "weighted": self.weighted.to_dict(),
            "accuracy": self.accuracy,
            "support": self.support,
            "confusion": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassificationReport:
        """The inverse of :meth:`to_dict` (for reports read back from a run folder)."""
        labels = tuple(data["labels"])
        return cls(
            labels=labels,
            per_class=tuple(ClassScores.from_dict(data["per_class"][n]) for n in labels),
            macro=ClassScores.from_dict(data["macro"]),
            weighted=ClassScores.from_dict(data["weighted"]),
            accuracy=float(data["accuracy"]),
            support=int(data["support"]),
            confusion=tuple(tuple(int(c) for c in row) for row in data["confusion"]),
        )

    def to_text(self, digits: int = 2) -> str:
        """An aligned table in the layout of sklearn's ``classification_report``."""
        heads = ("precision", "recall", "f1-score", "support")
        width = max(max(len(n) for n in self.labels), len("weighted avg"), digits)
        row = "{:>{w}s} " + " {:>9.{d}f}" * 3 + " {:>9}\n"
        lines = ["{:>{w}s} ".format("", w=width) + "".join(f" {h:>9}" for h in heads) + "\n\n"]
        for name, s in zip(self.labels, self.per_class, strict=True):
            lines.append(
                row.format(name, s.precision, s.recall, s.f1, s.support, w=width, d=digits)
            )
        lines.append("\n")
        acc = "{:>{w}s} " + " {:>9}" * 2 + " {:>9.{d}f} {:>9}\n"
        lines.append(acc.format("accuracy", "", "", self.accuracy, self.support, w=width, d=digits))
        for title, s in (("macro avg", self.macro), ("weighted avg", self.weighted)):
            lines.append(
                row.format(title, s.precision, s.recall, s.f1, s.support, w=width, d=digits)
            )
        return "".join(lines)


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
) -> ClassificationReport:
    """Per-class precision/recall/F1/support (via the evaluate modules) and the confusion.

    >>> report = classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    >>> report.per_class[0].precision, report.confusion
    (0.5, ((1, 0), (1, 1)))
    """
    true, pred, names = check_pair(y_true, y_pred, labels)
    n = len(names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    support = confusion.sum(axis=1)

    data = {"references": true.tolist(), "predictions": pred.tolist()}
    ids = list(range(n))
    scores = {
        metric: np.asarray(
            load_metric(metric).compute(**data, labels=ids, average=None)[metric], dtype=float
        )
        for metric in ("precision", "recall", "f1")
    }
    per_class = tuple(
        ClassScores(
            float(scores["precision"][i]),
            float(scores["recall"][i]),
            float(scores["f1"][i]),
            int(support[i]),
        )
        for i in range(n)
    )
    total = int(support.sum())

    # Macro and weighted averages are means of the per-class scores, as in sklearn; the
    # macro one over the labels present (gold or predicted), as compute_metrics.
    def average(weights: np.ndarray) -> ClassScores:
        p, r, f = (
            float(np.average(scores[m], weights=weights)) for m in ("precision", "recall", "f1")
        )
        return ClassScores(p, r, f, total)

    present = np.zeros(n)
    present[present_labels(true, pred)] = 1.0
    return ClassificationReport(
        labels=names,
        per_class=per_class,
        macro=average(present),
        weighted=average(support.astype(float)),
        accuracy=float(np.trace(confusion) / total),
        support=total,
        confusion=tuple(tuple(int(c) for c in r) for r in confusion),
    )


# --- calibration -----------------------------------------------------------------------


def probability_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    n_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, macro-F1 (of the argmax) and expected calibration error of ``probs``."""
    m = compute_metrics(y_true, np.asarray(probs).argmax(axis=1), labels)
    ece = expected_calibration_error(probs, y_true, n_bins=n_bins)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": ece}


def expected_calibration_error(
    probs: np.ndarray, y_true: Sequence[int] | np.ndarray, n_bins: int = 15
) -> float:
    """Expected calibration error of the top-class confidence, with equal-width bins.

    ``probs`` is ``(n, C)`` class probabilities (rows sum to 1; pass softmax output, not
    logits). Confidences fall in bins ``(k/n_bins, (k+1)/n_bins]``; the ECE is the
    example-weighted mean over bins of ``|accuracy - mean confidence|``.

    >>> probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    >>> round(expected_calibration_error(probs, [0, 1], n_bins=2), 4)  # (0.1 + 0.4) / 2
    0.25
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer; got {n_bins!r}")
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise DataError(f"probs must be a non-empty (n, C) array; got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise DataError("probs must be probabilities in [0, 1] (softmax output, not logits)")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
    if off.size:
        i = int(off[0])
        raise DataError(
            f"probs rows must sum to 1 (softmax output, not logits); row {i} sums to "
            f"{sums[i]:.4f} ({off.size} of {p.shape[0]} rows do not)"
        )
    true = _label_ids(y_true, "y_true", p.shape[1])
    if true.size != p.shape[0]:
        raise DataError(f"probs has {p.shape[0]} rows but y_true has {true.size} items")

    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == true).astype(float)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")  # right-closed bins
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)
