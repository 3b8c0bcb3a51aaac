"""A run's calibration step: after training, before the adapter is saved, fit a temperature
on the validation split, choose a reject threshold for the recipe's target, and record both
in the adapter's ``task.json`` (``TaskInfo.calibration``), which prediction and serving apply.

The run folder gets ``reliability.png`` (test split, before and after the temperature),
``risk_coverage.png`` / ``risk_coverage.json`` (test split, calibrated, the threshold
marked) and ``calibration.json`` (everything below); ``metrics.json`` gets ``ece``,
``ece_calibrated``, ``temperature`` and the reject option's threshold, coverage and precision
on test; the report ends with the same figures. A temperature that stopped at its search
bound (``TEMPERATURE_BOUNDS``) is stored as that bound, recorded as ``temperature_bound``
(``"lower"`` / ``"upper"``) and said in one line of the report and the run log.
Recipe block (``CalibrationSpec``)::

    calibration:
      temperature: true            # unset: on when the adapter is trained (max_steps != 0)
      reject: {precision: 0.95}    # or {coverage: 0.8}; default: no reject option
      out_of_scope: oos            # a label of the data: predicting it is an abstention
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.config.recipes import CalibrationSpec, Recipe
from peftkit.errors import ConfigError
from peftkit.metrics.calibration import (
    N_BINS,
    abstained,
    apply_temperature,
    bound_text,
    choose_threshold,
    fit_temperature,
    label_index,
    negative_log_likelihood,
    out_of_scope_scores,
    reliability,
    risk_coverage,
    temperature_bound,
)

log = logging.getLogger(__name__)
VALIDATION = "validation"


@dataclass
class Confidence:
    """What the step found: ``metrics`` (for metrics.json), ``text`` (the report's lines),
    ``calibration`` (task.json's record; None when there was nothing to fit on)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    calibration: dict[str, Any] | None = None


def check_calibration(recipe: Recipe, tasks: list[Any]) -> None:
    """Before anything is loaded: a reject target needs every task's validation split, and
    ``out_of_scope`` must be a label of the recipe's data."""
    spec = recipe.calibration
    if spec.out_of_scope is not None and tasks:
        label_index(tasks[0].data.labels, spec.out_of_scope, f"{recipe.source}: calibration")
    if spec.reject is None:
        return
    for task in tasks:
        if not len(task.data.splits.get(VALIDATION, ())):
            raise ConfigError(
                f"{recipe.source}: calibration.reject chooses its threshold on the validation "
                f"split, and task {task.name!r} ({task.data.name}) has no rows there; give it a "
                "validation split (or drop calibration.reject)"
            )


def calibrate(
    base: Any, task: Any, result: Any, spec: CalibrationSpec, run_dir: Path, prefix: str = ""
) -> Confidence:
    """Fit, choose and record (``result.model.task.calibration``), write the plots; see
    the module docstring. ConfigError (naming the best achievable) for a reject target
    no threshold meets on validation."""
    data = task.data
    fit = spec.temperature if spec.temperature is not None else task.config.max_steps != 0
    if not fit and spec.reject is None and spec.out_of_scope is None:
        return Confidence()
    if not len(data.splits.get(VALIDATION, ())):
        return Confidence(text="calibration: no validation rows; temperature 1, no threshold")
    val = data.split(VALIDATION)
    val_probs = split_probs(base, result.model, val, task.config.eval_batch_size)
    val_gold = np.asarray(val.labels)
    temperature = fit_temperature(val_probs, val_gold) if fit else 1.0
    bound = temperature_bound(temperature) if fit else None  # the search stopped at an end
    val_cal = apply_temperature(val_probs, temperature)
    oos = _oos_id(data.labels, spec.out_of_scope)
    choice = None
    if spec.reject is not None:
        choice = choose_threshold(
            val_cal, val_gold, precision=spec.reject.precision, coverage=spec.reject.coverage,
            out_of_scope=oos, where=f"validation ({task.name})",
        )  # fmt: skip
    test_probs = result.test_probs
    if test_probs is not None:
        where, gold, raw = "test", np.asarray(data.split("test").labels), np.asarray(test_probs)
    else:
        where, gold, raw = VALIDATION, val_gold, val_probs
    calibrated = apply_temperature(raw, temperature)
    before, after = reliability(raw, gold), reliability(calibrated, gold)
    record: dict[str, Any] = {
        "temperature": round(temperature, 6),
        "temperature_bound": bound,  # "lower" / "upper": the fit stopped at that bound
        "threshold": None if choice is None else choice.threshold,
        "target": None if choice is None else choice.target,
        "out_of_scope": spec.out_of_scope if oos is not None else None,
        "ece_before": round(before["ece"], 6),
        "ece_after": round(after["ece"], 6),
        "ece_split": where,
        "validation_rows": len(val),
    }
    metrics: dict[str, Any] = {
        "temperature": record["temperature"],
        "ece": record["ece_before"],
        "ece_calibrated": record["ece_after"],
        "nll": round(negative_log_likelihood(raw, gold), 6),
        "nll_calibrated": round(negative_log_likelihood(calibrated, gold), 6),
    }
    lines = [
        f"calibration: temperature {temperature:.4f} "
        + (f"(NLL on {len(val)} validation rows); " if fit else "(not fit); ")
        + f"ECE on {where} {before['ece']:.4f} -> {after['ece']:.4f} ({N_BINS} bins), "
        f"NLL {metrics['nll']:.4f} -> {metrics['nll_calibrated']:.4f}"
    ]
    if bound is not None:
        metrics["temperature_bound"] = bound
        lines.append(bound_text(bound, len(val)))
    threshold = None if choice is None else choice.threshold
    curve = risk_coverage(calibrated, gold, oos)
    if choice is not None:
        figures, line = _reject_figures(choice, calibrated, gold, oos, where)
        metrics.update(figures)
        lines.append(line)
        curve["chosen"] = {"threshold": choice.threshold, "coverage": figures["reject_coverage"],
                           "risk": round(1 - figures["reject_precision"], 6)}  # fmt: skip
    if oos is not None:
        scores = out_of_scope_scores(calibrated, gold, oos, threshold)
        metrics["out_of_scope"] = {"label": spec.out_of_scope, **scores}
        lines.append(_oos_line(spec.out_of_scope, scores, where, threshold is not None))
    result.model.task = replace(result.model.task, calibration=record)
    _write(run_dir, prefix, task.name, record, before, after, curve, metrics)
    return Confidence(metrics, "\n".join(lines), record)


def _reject_figures(
    choice: Any, probs: np.ndarray, gold: np.ndarray, oos: int | None, where: str
) -> tuple[dict[str, Any], str]:
    """The threshold's coverage and precision on ``probs`` (the test split), and its line."""
    answered = ~abstained(probs, choice.threshold, oos)
    correct = probs.argmax(1) == gold
    coverage = float(answered.mean())
    precision = float(correct[answered].mean()) if answered.any() else 1.0
    key, goal = next(iter(choice.target.items()))
    line = (
        f"reject option: threshold {choice.threshold:.4f} for {key} >= {goal:g} on "
        f"validation (coverage {choice.coverage:.4f}, precision {choice.precision:.4f}); "
        f"on {where}: coverage {coverage:.4f}, precision {precision:.4f}"
    )
    figures = {
        "reject_threshold": round(choice.threshold, 6),
        "reject_target": choice.target,
        "reject_coverage": round(coverage, 6),
        "reject_precision": round(precision, 6),
        "reject_validation": choice.to_dict(),
    }
    return figures, line


def _oos_line(label: Any, scores: dict[str, float], where: str, thresholded: bool) -> str:
    line = (
        f"out-of-scope {label!r} on {where}: precision {scores['precision']:.4f}, recall "
        f"{scores['recall']:.4f} as predicted"
    )
    if thresholded:
        line += (
            f"; {scores['precision_thresholded']:.4f}, {scores['recall_thresholded']:.4f} "
            "with the threshold's abstentions counted as out-of-scope"
        )
    return line


def split_probs(base: Any, model: Any, split: Any, batch_size: int) -> np.ndarray:
    """``model``'s softmax probabilities on ``split``, its rows encoded as its task says
    (template, max length: as training and serving encode them)."""
    import torch

    from peftkit.data.batching import pad_id, position_limit
    from peftkit.training.predict import predict_logits
    from peftkit.training.train import split_encoder

    info = model.task
    cap = position_limit(getattr(base.model, "config", None))
    limit = info.max_length if cap is None else min(info.max_length, cap)
    enc = split_encoder(base.tokenizer, limit, info.template)(split)
    logits = predict_logits(model, enc, pad_id(base.tokenizer), batch_size)
    return torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()


def _oos_id(labels: tuple[str, ...], label: str | None) -> int | None:
    """The out-of-scope label's id, None when not set or (a ``then:`` task) not a label."""
    return None if label is None or label not in labels else labels.index(label)


def _write(run_dir, prefix, name, record, before, after, curve, metrics) -> None:
    from peftkit.run.folders import write_json
    from peftkit.run.plots import plot_reliability, plot_risk_coverage

    title = f"{name} · {record['ece_split']}"
    plot_reliability(before, after, run_dir / f"{prefix}reliability.png", title=title,
                     temperature=record["temperature"])  # fmt: skip
    plot_risk_coverage(curve, run_dir / f"{prefix}risk_coverage.png", title=title)
    write_json(run_dir / f"{prefix}risk_coverage.json", curve)
    write_json(
        run_dir / f"{prefix}calibration.json",
        {**record, "metrics": metrics, "reliability": {"before": before, "after": after}},
    )
