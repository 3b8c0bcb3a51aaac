"""A training run's test predictions, one row each, and the intervals and comparisons made
from them.

A training run writes ``predictions.jsonl`` into its folder (``<task>-predictions.jsonl``
for the recipe's later tasks), one line per test row, in the split's order::

    {"index": 0, "text": "a fine film", "gold": "positive", "pred": "positive",
     "probs": {"negative": 0.12, "positive": 0.88}}

``probs`` are what the saved adapter serves: when the run's calibration fit a temperature
(``task.json``'s ``calibration``) they are the calibrated probabilities, and the softmax as
trained is kept as ``probs_uncalibrated`` (so the reliability diagram can be redrawn from the
file). When the adapter has a reject threshold or an out-of-scope label, each row says
whether it ``abstained``, as ``AdaptedModel.predict`` would. ``pred`` is the argmax either
way (a temperature does not move it). Files written before these fields read as before.

and ``metrics.json`` carries a 95% interval next to accuracy and macro-F1
(:func:`interval_metrics`). Two runs scored on the same test rows are compared later from
these files alone (:func:`compare_two`), with the paired bootstrap and McNemar's test.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.errors import ConfigError
from peftkit.metrics.calibration import abstained, apply_temperature
from peftkit.metrics.intervals import (
    INTERVAL_METRICS,
    PairedComparison,
    bootstrap_intervals,
    bootstrap_method,
    paired_comparison,
)
from peftkit.paths import atomic_write_text

__all__ = [
    "PREDICTIONS_FILE",
    "RunPredictions",
    "compare_two",
    "comparison_text",
    "interval_metrics",
    "interval_text",
    "read_predictions",
    "write_predictions",
]

PREDICTIONS_FILE = "predictions.jsonl"
INTERVAL_SEED = 0  # fixed, so a run's interval does not move with its training seed


def interval_metrics(metrics: dict[str, Any], gold: Any, pred: Any, labels: Any) -> dict[str, Any]:
    """``metrics`` with ``<metric>_ci95: [low, high]`` after accuracy and macro_f1, and
    ``ci_method`` saying how the intervals were made."""
    ci = bootstrap_intervals(gold, pred, labels, seed=INTERVAL_SEED)
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out[key] = value
        if key in ci:
            out[f"{key}_ci95"] = [round(ci[key].low, 6), round(ci[key].high, 6)]
            if all(f"{k}_ci95" in out for k in ci):  # the method after the last interval
                out["ci_method"] = bootstrap_method(len(gold), seed=INTERVAL_SEED)
    return out


def interval_text(metrics: dict[str, Any]) -> str:
    """One line for the report: ``accuracy 0.9390 [0.9061, 0.9671], macro-F1 ... (95%
    intervals: bootstrap over 213 test rows, ...)``; empty when there are none."""
    parts = []
    for key, title in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        if f"{key}_ci95" in metrics:
            low, high = metrics[f"{key}_ci95"]
            parts.append(f"{title} {metrics[key]:.4f} [{low:.4f}, {high:.4f}]")
    if not parts:
        return ""
    return f"{', '.join(parts)} (95% intervals: {metrics['ci_method']})"


def write_predictions(
    path: Path,
    split: Any,
    labels: Any,
    probs: np.ndarray,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """One JSON line per row of ``split`` (texts, gold ids) with ``probs`` (rows x labels, the
    softmax as trained) as the adapter serves them under ``calibration`` (``TaskInfo``'s
    record: temperature, threshold, out-of-scope label; None: as trained)."""
    raw = np.asarray(probs, dtype=np.float64)
    pred = raw.argmax(axis=1)
    cal = calibration or {}
    temperature = float(cal.get("temperature") or 1.0)
    served = apply_temperature(raw, temperature) if temperature != 1.0 else raw
    threshold, oos = cal.get("threshold"), cal.get("out_of_scope")
    flags = None
    if threshold is not None or oos is not None:
        oos_id = list(labels).index(oos) if oos in labels else None
        flags = abstained(served, None if threshold is None else float(threshold), oos_id)

    def named(values: np.ndarray) -> dict[str, float]:
        return {lab: round(float(p), 6) for lab, p in zip(labels, values, strict=True)}

    lines = []
    for i, text in enumerate(split.texts):
        row: dict[str, Any] = {"index": i, "text": text}
        if split.text_pairs is not None:
            row["text_pair"] = split.text_pairs[i]
        row["gold"] = labels[split.labels[i]]
        row["pred"] = labels[int(pred[i])]
        if flags is not None:
            row["abstained"] = bool(flags[i])
        row["probs"] = named(served[i])
        if served is not raw:
            row["probs_uncalibrated"] = named(raw[i])
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(path, "".join(lines))
    return path


@dataclass(frozen=True)
class RunPredictions:
    """A run's test predictions read back: label names, gold and predicted ids per row, and
    a fingerprint of the rows (texts and gold labels) to tell whether two runs share them."""

    run: str
    labels: tuple[str, ...]
    gold: np.ndarray
    pred: np.ndarray
    rows_hash: str


def read_predictions(run_dir: str | Path) -> RunPredictions:
    """The first task's ``predictions.jsonl`` of a finished run folder (labels from its
    ``metrics.json`` report, else in order of appearance)."""
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file() or path.is_symlink():
        raise ConfigError(
            f"{run_dir}: no {PREDICTIONS_FILE} (runs made before peftkit kept per-row test "
            "predictions, or without a test split, cannot be compared row by row)"
        )
    rows: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            # an evaluation run lists every template's rows in turn: take the first template's
            if "template" in row and rows and row["template"] != rows[0]["template"]:
                break
            rows.append(row)
            key = [row["text"], row.get("text_pair"), row["gold"]]
            digest.update((json.dumps(key) + "\n").encode())
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable predictions ({exc})") from None
    labels = _labels(run_dir, rows)
    ids = {name: i for i, name in enumerate(labels)}
    return RunPredictions(
        run=run_dir.name,
        labels=labels,
        gold=np.array([ids[r["gold"]] for r in rows], dtype=np.int64),
        pred=np.array([ids[r["pred"]] for r in rows], dtype=np.int64),
        rows_hash=digest.hexdigest(),
    )


def _labels(run_dir: Path, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    report = run_dir / "report.json"
    if report.is_file():
        try:
            return tuple(json.loads(report.read_text())["labels"])
        except (ValueError, KeyError, TypeError):
            pass
    if rows and isinstance(rows[0].get("probs"), dict):
        return tuple(rows[0]["probs"])
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["gold"], None)
        seen.setdefault(r["pred"], None)
    return tuple(seen)


def compare_two(run_a: str | Path, run_b: str | Path) -> tuple[PairedComparison | None, str]:
    """Compare two runs on their shared test rows: ``(comparison, "")``, or ``(None, why
    not)`` when they were not scored on the same rows (row counts, texts or gold labels
    differ) or with the same labels."""
    a, b = read_predictions(run_a), read_predictions(run_b)
    if a.gold.size != b.gold.size:
        return None, (
            f"{a.run} has {a.gold.size} test rows and {b.run} has {b.gold.size}: not scored "
            "on the same test rows, so no paired comparison"
        )
    if a.rows_hash != b.rows_hash:
        return None, (
            f"{a.run} and {b.run} have {a.gold.size} test rows each, but their texts or gold "
            "labels differ: not the same test rows, so no paired comparison"
        )
    if a.labels != b.labels:
        return None, f"{a.run} and {b.run} have different label sets: no paired comparison"
    return paired_comparison(a.gold, a.pred, b.pred, a.labels), ""


def comparison_text(cmp: PairedComparison, name_a: str, name_b: str) -> str:
    """The paired comparison for a terminal: B - A per metric with its interval and
    verdict, and McNemar's p-value."""
    lines = [f"paired comparison on {cmp.rows:,} shared test rows (B - A; A = {name_a}, "
             f"B = {name_b})"]  # fmt: skip
    for key, title in zip(INTERVAL_METRICS, ("accuracy", "macro-F1"), strict=True):
        d = cmp.difference[key]
        verdict = cmp.verdict(key).replace("A is", f"A ({name_a}) is")
        verdict = verdict.replace("B is", f"B ({name_b}) is")
        lines.append(
            f"  {title:<9} {d.estimate:+.4f}  95% [{d.low:+.4f}, {d.high:+.4f}]  {verdict}"
        )
    lines.append(
        f"  McNemar exact p = {cmp.mcnemar_p:.4g} (accuracy; {cmp.a_only} rows only A gets "
        f"right, {cmp.b_only} only B)"
    )
    lines.append(f"  method: {cmp.method}")
    return "\n".join(lines)
