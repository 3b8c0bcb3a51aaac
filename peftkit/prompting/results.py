"""An evaluation run's results: one :class:`TemplateResult` per template, gathered in a
:class:`PromptEvaluation` that prints its table and saves results.json and
predictions.jsonl (see ``prompting.evaluation`` for how they are computed).

Error bars: each template's accuracy and macro-F1 carry a 95% bootstrap interval over the
scored rows (``metrics.intervals.bootstrap_intervals``: 1,000 resamples, seed 0), and the
mean over templates carries one that counts both sources of doubt
(:func:`template_intervals`): each resample draws the rows with replacement (the
same rows for every template, so the templates stay paired) and the templates with
replacement, and scores the mean over the drawn templates on the drawn rows.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.errors import DataError
from peftkit.metrics.intervals import (
    INTERVAL_METRICS,
    RESAMPLES,
    Interval,
    bca_interval,
    bca_intervals,
    bootstrap_method,
    check_settings,
    confusion_counts,
    resampled_scores,
    row_jackknife,
    scores_from_counts,
)
from peftkit.metrics.report import check_pair
from peftkit.paths import atomic_write_text

__all__ = [
    "INTERVAL_SEED",
    "METRICS",
    "PromptEvaluation",
    "TemplateResult",
    "across_template_method",
    "template_intervals",
]

METRICS = ("accuracy", "macro_f1", "ece")
INTERVAL_SEED = 0  # as training runs (run.predictions): the interval does not move with a seed


@dataclass
class TemplateResult:
    """One template's scores over the whole split."""

    template: str
    scorer: str
    accuracy: float
    macro_f1: float
    ece: float
    examples_per_s: float
    seconds: float
    truncated: int
    probs: np.ndarray = field(repr=False)
    before: dict[str, float] | None = None  # uncalibrated metrics when calibration is on
    # 95% intervals of accuracy and macro-F1 (after calibration, when it is on) and how they
    # were made; PromptEvaluation fills them from its gold labels when they are not given
    intervals: dict[str, Interval] | None = None
    ci_method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scores; with intervals, ``<metric>_ci95: [low, high]`` after accuracy and
        macro_f1 and ``ci_method`` after them, as a training run's metrics.json."""
        out: dict[str, Any] = {"template": self.template, "scorer": self.scorer}
        for key in ("accuracy", "macro_f1"):
            out[key] = getattr(self, key)
            if self.intervals is not None and key in self.intervals:
                out[f"{key}_ci95"] = _pair(self.intervals[key])
        if self.intervals is not None and self.ci_method is not None:
            out["ci_method"] = self.ci_method
        out.update(
            {
                "ece": self.ece,
                "examples_per_s": self.examples_per_s,
                "seconds": self.seconds,
                "truncated": self.truncated,
            }
        )
        if self.before is not None:
            out["before_calibration"] = self.before
        return out


@dataclass
class PromptEvaluation:
    """Every template's result for one dataset split, scorer and configuration."""

    data: str
    split: str
    labels: tuple[str, ...]
    texts: tuple[str, ...]
    gold: tuple[int, ...]
    config: dict[str, Any]
    results: list[TemplateResult]
    processes: int = 1
    # the mean over templates with its 95% intervals: rows and templates resampled
    # (``across``), and rows only, the templates held fixed (``across_fixed``)
    across: dict[str, Interval] | None = field(default=None, init=False, repr=False)
    across_fixed: dict[str, Interval] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.results or not self.gold:
            return
        preds = [r.probs.argmax(axis=1) for r in self.results]
        per, self.across, self.across_fixed = template_intervals(self.gold, preds, self.labels)
        method = bootstrap_method(len(self.gold), seed=INTERVAL_SEED)
        for r, ci in zip(self.results, per, strict=True):
            if r.intervals is None:
                r.intervals, r.ci_method = ci, method

    def across_templates(self) -> dict[str, Any]:
        """The mean over templates of accuracy and macro-F1 with its 95% interval
        (``ci95``: rows and templates resampled; ``ci95_templates_fixed``: rows only) and
        how each was made; empty without results."""
        if self.across is None or self.across_fixed is None:
            return {}
        out: dict[str, Any] = {"templates": len(self.results), "rows": len(self.gold)}
        for key in INTERVAL_METRICS:
            out[key] = {
                "mean": self.across[key].estimate,
                "ci95": _pair(self.across[key]),
                "ci95_templates_fixed": _pair(self.across_fixed[key]),
            }
        out["ci_method"] = across_template_method(len(self.gold), len(self.results))
        out["ci_method_templates_fixed"] = across_template_method(
            len(self.gold), len(self.results), resample_templates=False
        )
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and (sample) standard deviation across templates of every metric."""
        keys = [*METRICS, "examples_per_s"]
        out = {k: _mean_std([getattr(r, k) for r in self.results]) for k in keys}
        if self.results and all(r.before is not None for r in self.results):
            for k in METRICS:
                out[f"before_{k}"] = _mean_std([r.before[k] for r in self.results if r.before])
        return out

    def table(self) -> str:
        """The results table: one row per template, then mean ± std across templates."""
        from peftkit.metrics.table import format_table

        calibrated = bool(self.results) and self.results[0].before is not None
        rows = []
        for r in self.results:
            row: dict[str, Any] = {"template": r.template, "scorer": r.scorer}
            if calibrated and r.before is not None:
                for k in METRICS:
                    row[k] = f"{r.before[k]:.4f} -> {getattr(r, k):.4f}"
            else:
                row.update({k: getattr(r, k) for k in METRICS})
            for k in INTERVAL_METRICS:
                row[f"{k}_ci95"] = _cell(r.intervals[k]) if r.intervals else None
            row.update(
                {
                    "examples/s": round(r.examples_per_s, 1),
                    "truncated": r.truncated,
                }
            )
            rows.append(row)
        s = self.summary()
        if len(self.results) > 1:
            row = {"template": "mean ± std", "scorer": ""}
            for k in METRICS:
                after = f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}"
                row[k] = (
                    f"{s['before_' + k]['mean']:.4f} ± {s['before_' + k]['std']:.4f} -> {after}"
                    if calibrated
                    else after
                )
            for k in INTERVAL_METRICS:
                row[f"{k}_ci95"] = _cell(self.across[k]) if self.across else None
            row["examples/s"] = f"{s['examples_per_s']['mean']:.1f}"
            row["truncated"] = ""
            rows.append(row)
        columns = [
            ("template", "template"),
            ("scorer", "scorer"),
            ("accuracy", "accuracy"),
            ("accuracy_ci95", "accuracy 95% CI"),
            ("macro_f1", "macro_f1"),
            ("macro_f1_ci95", "macro_f1 95% CI"),
            ("ece", "ece"),
            ("examples/s", "examples/s"),
            ("truncated", "truncated"),
        ]
        title = (
            f"{self.data} {self.split} ({len(self.gold)} rows), "
            f"{self.config.get('method', 'zero-shot')}, {self.config.get('calibration')} "
            f"calibration" + (" (before -> after)" if calibrated else "")
        )
        return title + "\n" + format_table(rows, columns) + self._interval_note(calibrated)

    def _interval_note(self, calibrated: bool) -> str:
        """The lines under the table saying how its intervals were made."""
        if self.across is None:
            return ""
        scores = " (of the calibrated scores)" if calibrated else ""
        lines = [
            f"95% intervals{scores}: per template, "
            f"{bootstrap_method(len(self.gold), seed=INTERVAL_SEED)}"
        ]
        if len(self.results) > 1:
            lines.append(
                f"mean over templates: {across_template_method(len(self.gold), len(self.results))}"
            )
        return "\n" + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "split": self.split,
            "rows": len(self.gold),
            "labels": list(self.labels),
            "config": self.config,
            "processes": self.processes,
            "templates": [r.to_dict() for r in self.results],
            "summary": self.summary(),
            "across_templates": self.across_templates(),
        }

    def predictions(self) -> list[dict[str, Any]]:
        """One record per (template, example): gold and predicted label, probabilities."""
        out = []
        for r in self.results:
            pred = r.probs.argmax(axis=1)
            for i, text in enumerate(self.texts):
                out.append(
                    {
                        "template": r.template,
                        "index": i,
                        "text": text,
                        "gold": self.labels[self.gold[i]],
                        "pred": self.labels[int(pred[i])],
                        "probs": {
                            lab: round(float(p), 6)
                            for lab, p in zip(self.labels, r.probs[i], strict=True)
                        },
                    }
                )
        return out

    def save(self, folder: str | Path, predictions: bool = True) -> Path:
        """Write ``results.json`` (and ``predictions.jsonl``) into ``folder``; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "results.json", json.dumps(self.to_dict(), indent=1) + "\n")
        if predictions:
            lines = "".join(json.dumps(p) + "\n" for p in self.predictions())
            atomic_write_text(folder / "predictions.jsonl", lines)
        return folder


def template_intervals(
    gold: Any,
    preds: list[Any],
    labels: Any,
    *,
    resamples: int = RESAMPLES,
    seed: int = INTERVAL_SEED,
    confidence: float = 0.95,
) -> tuple[list[dict[str, Interval]], dict[str, Interval], dict[str, Interval]]:
    """95% bootstrap intervals of accuracy and macro-F1 for templates scored on the same
    rows (``preds``: one array of predicted ids per template, against one ``gold``):

    - per template, the same as ``bootstrap_intervals(gold, pred, labels, seed=seed)``
      (the same resampled rows);
    - for the mean over templates, rows and templates both resampled: each resample draws
      the rows with replacement (the same rows for every template, so the templates stay
      paired) and as many templates as there are with replacement (its own seeded stream),
      and scores the mean over the drawn templates on the drawn rows;
    - for the mean over templates with the templates held fixed (rows resampled only).

    >>> per, both, fixed = template_intervals([0, 1] * 50, [[0, 1] * 50, [0, 0] * 50], "ab")
    >>> per[0]["accuracy"].estimate, both["accuracy"].estimate
    (1.0, 0.75)
    """
    if not preds:
        raise DataError("no template predictions to make intervals from")
    check_settings(resamples, confidence)
    pairs = [check_pair(gold, pred, labels) for pred in preds]
    true, names = pairs[0][0], pairs[0][2]
    n_labels = len(names)
    codes = [true * n_labels + pred for _, pred, _ in pairs]
    points = [scores_from_counts(confusion_counts(code, n_labels)[None]) for code in codes]
    samples = resampled_scores(codes, n_labels, resamples, seed)
    per = [
        bca_intervals(code, n_labels, sample, confidence)
        for code, sample in zip(codes, samples, strict=True)
    ]
    n_templates = len(preds)
    picks = np.random.default_rng([seed, 1]).integers(0, n_templates, (resamples, n_templates))
    # BCa's acceleration for the mean over templates: each row left out of every template
    jacks = [row_jackknife(code, n_labels) for code in codes]
    weights = np.ones(jacks[0]["accuracy"].size)
    both: dict[str, Interval] = {}
    fixed: dict[str, Interval] = {}
    for m in INTERVAL_METRICS:
        stacked = np.stack([sample[m] for sample in samples])  # templates x resamples
        mean = float(np.mean([point[m][0] for point in points]))
        jack = np.mean([j[m] for j in jacks], axis=0)
        fixed[m] = bca_interval(mean, stacked.mean(axis=0), jack, weights, confidence)
        drawn = stacked[picks, np.arange(resamples)[:, None]]  # resamples x drawn templates
        both[m] = bca_interval(mean, drawn.mean(axis=1), jack, weights, confidence)
    return per, both, fixed


def across_template_method(
    n_rows: int,
    n_templates: int,
    resamples: int = RESAMPLES,
    seed: int = INTERVAL_SEED,
    *,
    resample_templates: bool = True,
) -> str:
    """How the interval of the mean over templates was made, in words."""
    if resample_templates:
        drawn = f"and {n_templates} templates, both drawn with replacement"
    else:
        drawn = f"drawn with replacement, the {n_templates} templates held fixed"
    return (
        f"bootstrap over {n_rows:,} test rows (the same for every template) {drawn}; "
        f"{resamples:,} resamples, seed {seed}, BCa 95%"
    )


def _pair(interval: Interval) -> list[float]:
    return [round(interval.low, 6), round(interval.high, 6)]


def _cell(interval: Interval) -> str:
    return f"[{interval.low:.4f}, {interval.high:.4f}]"


def _mean_std(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "std": float("nan")}
    return {
        "mean": float(statistics.fmean(values)),
        "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }
