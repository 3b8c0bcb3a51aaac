"""Error bars on evaluation runs: a 95% bootstrap interval per template and for the mean over
templates, in results.json, the printed table and the eval run's metrics.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic
from test_recipes import write_data

from peftkit import cli
from peftkit.errors import DataError
from peftkit.metrics.intervals import bootstrap_intervals, bootstrap_method
from peftkit.metrics.report import compute_metrics
from peftkit.prompting.evaluation import evaluate_prompts
from peftkit.prompting.results import PromptEvaluation, TemplateResult, template_intervals

LABELS = ("negative", "neutral", "positive")


def probs_with_accuracy(gold: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Probabilities whose argmax is right on about ``accuracy`` of the rows."""
    rng = np.random.default_rng(seed)
    pred = np.where(rng.random(gold.size) < accuracy, gold, (gold + 1) % len(LABELS))
    probs = rng.random((gold.size, len(LABELS))) * 0.3
    probs[np.arange(gold.size), pred] = 1.0
    return probs / probs.sum(axis=1, keepdims=True)


def evaluation(accuracies, n=150, calibrated=False) -> PromptEvaluation:
    gold = np.arange(n) % len(LABELS)
    results = []
    for i, acc in enumerate(accuracies):
        probs = probs_with_accuracy(gold, acc, seed=i)
        m = compute_metrics(gold.tolist(), probs.argmax(1).tolist(), LABELS)
        results.append(
            TemplateResult(
                template=f"t{i}", scorer="causal", accuracy=m["accuracy"],
                macro_f1=m["macro_f1"], ece=0.1, examples_per_s=100.0, seconds=1.5,
                truncated=0, probs=probs,
                before={"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.2} if calibrated else None,
            )
        )  # fmt: skip
    config = {"method": "zero-shot", "calibration": "content-free" if calibrated else "none"}
    return PromptEvaluation(
        data="toy", split="test", labels=LABELS, texts=tuple(f"row {i}" for i in range(n)),
        gold=tuple(int(g) for g in gold), config=config, results=results,
    )  # fmt: skip


def test_each_template_gets_the_bootstrap_interval_of_its_own_predictions():
    run = evaluation([0.9, 0.6, 0.75])
    for r in run.results:
        assert r.intervals is not None
        want = bootstrap_intervals(list(run.gold), r.probs.argmax(1), LABELS, seed=0)
        assert r.intervals == want  # same seed, same resampled rows: the very same interval
        for key in ("accuracy", "macro_f1"):
            assert r.intervals[key].estimate == pytest.approx(getattr(r, key))
            assert r.intervals[key].contains(getattr(r, key))
            assert r.intervals[key].high - r.intervals[key].low > 0.02  # 150 rows: not a point
        assert r.ci_method == bootstrap_method(150, seed=0)


def test_the_mean_over_templates_has_an_interval_counting_rows_and_templates():
    run = evaluation([0.9, 0.6, 0.75])
    s = run.summary()
    assert run.across is not None and run.across_fixed is not None
    for key in ("accuracy", "macro_f1"):
        mean = s[key]["mean"]
        both, fixed = run.across[key], run.across_fixed[key]
        assert both.estimate == pytest.approx(mean) and fixed.estimate == pytest.approx(mean)
        assert both.contains(mean) and fixed.contains(mean)
        # templates this far apart: drawing the templates too widens the interval well
        # beyond the rows-only one (which only sees the rows' noise in the average)
        assert both.high - both.low > 2 * (fixed.high - fixed.low)
        assert both.low >= min(r.intervals[key].low for r in run.results if r.intervals)
        assert both.high <= max(r.intervals[key].high for r in run.results if r.intervals)
    # seeded: the same again
    again = evaluation([0.9, 0.6, 0.75])
    assert again.across == run.across and again.across_fixed == run.across_fixed


def test_one_template_the_mean_interval_is_that_templates_and_bad_input_is_named():
    run = evaluation([0.8])
    assert run.results[0].intervals is not None and run.across is not None
    one = run.results[0].intervals
    for across in (run.across, run.across_fixed):  # the same, up to float rounding
        for m, interval in one.items():
            got = across[m]
            assert (got.estimate, got.low, got.high) == pytest.approx(
                (interval.estimate, interval.low, interval.high), abs=1e-9
            )
    gold = [0, 1] * 10
    with pytest.raises(DataError, match="no template predictions"):
        template_intervals(gold, [], ("a", "b"))
    with pytest.raises(DataError, match="resamples"):
        template_intervals(gold, [gold], ("a", "b"), resamples=1)


def test_results_json_and_the_table_carry_the_intervals(tmp_path):
    run = evaluation([0.9, 0.6, 0.75])
    saved = json.loads((run.save(tmp_path / "out") / "results.json").read_text())
    for t, r in zip(saved["templates"], run.results, strict=True):
        assert r.intervals is not None
        assert list(t)[:7] == [
            "template", "scorer", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95",
            "ci_method",
        ]  # fmt: skip
        assert t["accuracy_ci95"] == [
            round(r.intervals["accuracy"].low, 6),
            round(r.intervals["accuracy"].high, 6),
        ]
        low, high = t["macro_f1_ci95"]
        assert low <= t["macro_f1"] <= high
        assert t["ci_method"] == "bootstrap over 150 test rows, 1,000 resamples, seed 0, BCa 95%"
    across = saved["across_templates"]
    assert across["templates"] == 3 and across["rows"] == 150
    for key in ("accuracy", "macro_f1"):
        assert across[key]["mean"] == pytest.approx(saved["summary"][key]["mean"])
        low, high = across[key]["ci95"]
        assert low <= across[key]["mean"] <= high
        fixed_low, fixed_high = across[key]["ci95_templates_fixed"]
        assert low < fixed_low and fixed_high < high
    assert "3 templates, both drawn with replacement" in across["ci_method"]
    assert "templates held fixed" in across["ci_method_templates_fixed"]

    table = run.table()
    print(table)
    lines = table.splitlines()
    assert "accuracy 95% CI" in lines[1] and "macro_f1 95% CI" in lines[1]
    for r in run.results:
        assert r.intervals is not None
        row = next(line for line in lines if line.startswith(r.template + " "))
        acc = r.intervals["accuracy"]
        assert re.search(rf"{r.accuracy:.4f} +\[{acc.low:.4f}, {acc.high:.4f}\]", row)
        assert f"[{r.intervals['macro_f1'].low:.4f}, {r.intervals['macro_f1'].high:.4f}]" in row
    mean_row = next(line for line in lines if line.startswith("mean ± std"))
    assert run.across is not None
    acc = run.across["accuracy"]
    assert f"[{acc.low:.4f}, {acc.high:.4f}]" in mean_row
    assert lines[-2] == (
        "95% intervals: per template, bootstrap over 150 test rows, 1,000 resamples, seed 0, "
        "BCa 95%"
    )
    assert lines[-1] == (
        "mean over templates: bootstrap over 150 test rows (the same for every template) and 3 "
        "templates, both drawn with replacement; 1,000 resamples, seed 0, BCa 95%"
    )


def test_a_calibrated_table_says_its_intervals_are_of_the_calibrated_scores():
    run = evaluation([0.9, 0.6], calibrated=True)
    table = run.table()
    assert "->" in table and "95% intervals (of the calibrated scores): per template" in table
    one = evaluation([0.7])
    assert "mean over templates" not in one.table()
    assert "95% intervals: per template" in one.table()


def test_evaluate_prompts_gives_intervals_on_its_scored_rows(tiny_models, tmp_path):
    from peftkit.models.base import load_base

    prompts = tmp_path / "toy.yaml"
    prompts.write_text(
        'family: toy\nlabels: [negative, positive]\nverbalizer: {negative: " bad", positive: " good"}\n'
        'templates:\n  plain: "{text} it was"\n  other: "{text} all in all"\n'
    )
    data = synthetic("sentiment", n=90)
    run = evaluate_prompts(load_base(str(tiny_models["llama"])), data, prompts, batch_size=8)
    test = data.split("test")
    assert run.across is not None
    for r in run.results:
        want = bootstrap_intervals(list(test.labels), r.probs.argmax(1), data.labels)
        assert r.intervals == want and r.intervals["accuracy"].contains(r.accuracy)
    mean = float(np.mean([r.accuracy for r in run.results]))
    assert run.across["accuracy"].estimate == pytest.approx(mean)
    assert run.across["accuracy"].contains(mean)
    assert "accuracy 95% CI" in run.table()


def test_the_eval_runs_metrics_json_carries_intervals_as_a_training_run(
    tmp_path, tiny_models, capsys, reset_accelerate, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = write_data(tmp_path / "toy", ["negative", "positive"], n_eval=24)
    argv = [
        "eval", "zero-shot-sst2", f"base={tiny_models['llama']}", f"data.source={data}",
        "evaluation.batch_size=8",
    ]  # fmt: skip
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "accuracy 95% CI" in out and "95% intervals: per template" in out
    (run,) = Path("runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    keys = list(metrics)
    i = keys.index("accuracy")
    assert keys[i : i + 5] == [
        "accuracy",
        "accuracy_ci95",
        "macro_f1",
        "macro_f1_ci95",
        "ci_method",
    ]
    assert metrics["ci_method"] == "bootstrap over 24 test rows, 1,000 resamples, seed 0, BCa 95%"
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high
    # the report under the table ends with the first template's intervals, as a training run's
    line = f"accuracy {metrics['accuracy']:.4f} [{low:.4f}, {high:.4f}]"
    report = (run / "report.txt").read_text()
    assert line in report and report.rstrip().endswith(f"(95% intervals: {metrics['ci_method']})")
    results = json.loads((run / "results.json").read_text())
    assert metrics["accuracy_ci95"] == results["templates"][0]["accuracy_ci95"]
    assert metrics["across_templates"] == results["across_templates"]
    for t in metrics["templates"]:
        assert t["accuracy_ci95"][0] <= t["accuracy"] <= t["accuracy_ci95"][1]
