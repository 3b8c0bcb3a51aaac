"""An evaluation run's results: one :class:`TemplateResult` per template, gathered in a
:class:`PromptEvaluation` that prints its table and saves results.json and
predictions.jsonl (see ``prompting.evaluation`` for how they are computed)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.paths import atomic_write_text

__all__ = ["METRICS", "PromptEvaluation", "TemplateResult"]

METRICS = ("accuracy", "macro_f1", "ece")


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

    def to_dict(self) -> dict[str, Any]:
        out = {
            "template": self.template,
            "scorer": self.scorer,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "examples_per_s": self.examples_per_s,
            "seconds": self.seconds,
            "truncated": self.truncated,
        }
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
            row["examples/s"] = f"{s['examples_per_s']['mean']:.1f}"
            row["truncated"] = ""
            rows.append(row)
        names = ["template", "scorer", *METRICS, "examples/s", "truncated"]
        title = (
            f"{self.data} {self.split} ({len(self.gold)} rows), "
            f"{self.config.get('method', 'zero-shot')}, {self.config.get('calibration')} "
            f"calibration" + (" (before -> after)" if calibrated else "")
        )
        return title + "\n" + format_table(rows, [(n, n) for n in names])

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


def _mean_std(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "std": float("nan")}
    return {
        "mean": float(statistics.fmean(values)),
        "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }
