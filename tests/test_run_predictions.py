"""A training run keeps its per-row test predictions and puts 95% intervals next to its
scores (metrics.json, report.txt, the printed report); ``peftkit compare`` of two runs on the
same test rows gives their paired difference, McNemar's test and a verdict."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from test_recipes import GOOD, write_data, write_recipe

from peftkit import cli
from peftkit.config.recipes import load_recipe
from peftkit.errors import ConfigError
from peftkit.metrics.intervals import bootstrap_intervals, paired_comparison
from peftkit.run.pipeline import run_recipe
from peftkit.run.predictions import compare_two, read_predictions

LABELS = ["negative", "positive"]


def tiny_run(tmp_path, tiny_models, name, data, extra=()):
    recipe_path = write_recipe(
        tmp_path, GOOD.replace("base: minilm", f"base: {tiny_models['bert']}"), f"{name}.yaml"
    )
    overrides = [f"data.source={data}", "training.max_steps=2", "training.batch_size=8", *extra]
    recipe = load_recipe(recipe_path, overrides)
    echo = io.StringIO()
    outcome = run_recipe(recipe, run_dir=tmp_path / name, registry=tmp_path / "reg", out=echo)
    return outcome, echo.getvalue()


def test_training_run_writes_predictions_and_intervals(tmp_path, tiny_models, reset_accelerate):
    data = write_data(tmp_path / "data", LABELS, n_eval=40)
    outcome, printed = tiny_run(tmp_path, tiny_models, "run", data)
    run = outcome.run_dir

    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(40))
    assert [r["text"] for r in rows] == [t["text"] for t in test]
    assert [r["gold"] for r in rows] == [t["label"] for t in test]
    for r in rows:
        assert set(r["probs"]) == set(LABELS) and abs(sum(r["probs"].values()) - 1) < 1e-4
        assert r["pred"] == max(r["probs"], key=r["probs"].get)

    metrics = json.loads((run / "metrics.json").read_text())
    keys = list(metrics)
    assert keys[keys.index("accuracy") + 1] == "accuracy_ci95"  # next to the score
    assert keys[keys.index("macro_f1") + 1] == "macro_f1_ci95"
    gold = [LABELS.index(r["gold"]) for r in rows]
    pred = [LABELS.index(r["pred"]) for r in rows]
    assert metrics["accuracy"] == np.mean(np.array(gold) == np.array(pred))
    ci = bootstrap_intervals(gold, pred, LABELS, seed=0)
    for key in ("accuracy", "macro_f1"):
        low, high = metrics[f"{key}_ci95"]
        assert low <= metrics[key] <= high
        assert (low, high) == (round(ci[key].low, 6), round(ci[key].high, 6))
    method = "bootstrap over 40 test rows, 1,000 resamples, seed 0, BCa 95%"
    assert metrics["ci_method"] == method
    for text in (printed, (run / "report.txt").read_text()):
        assert "macro avg" in text and f"95% intervals: {method}" in text
        assert f"accuracy {metrics['accuracy']:.4f} [" in text

    read = read_predictions(run)
    assert read.labels == tuple(LABELS) and read.gold.tolist() == gold
    assert read.pred.tolist() == pred


def test_the_registry_entry_keeps_the_intervals(tmp_path, tiny_models, reset_accelerate, capsys):
    data = write_data(tmp_path / "data", LABELS, n_eval=40)
    outcome, _ = tiny_run(tmp_path, tiny_models, "run", data)
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    from peftkit import Registry

    entry = Registry(tmp_path / "reg").get(metrics["registered"])
    for key in ("accuracy", "macro_f1", "accuracy_ci95", "macro_f1_ci95", "ci_method"):
        assert entry.metrics[key] == metrics[key]
    assert entry.metrics["temperature"] == metrics["temperature"]  # and the calibration
    assert cli.main(["adapters", "--registry", str(tmp_path / "reg"), "list"]) == 0
    low, high = metrics["accuracy_ci95"]
    assert f"[{low:.4f}, {high:.4f}]" in capsys.readouterr().out


# --- peftkit compare RUN_A RUN_B -----------------------------------------------------------------


def compare_cli(capsys, *argv):
    code = cli.main(["compare", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_compare_two_runs_on_the_same_rows(tmp_path, tiny_models, reset_accelerate, capsys):
    data = write_data(tmp_path / "data", LABELS, n_eval=40)
    other_rows = write_data(tmp_path / "data_other", LABELS, n_eval=40, seed=1)  # other texts
    fewer_rows = write_data(tmp_path / "data_fewer", LABELS, n_eval=24)
    a, _ = tiny_run(tmp_path, tiny_models, "a", data)
    b, _ = tiny_run(tmp_path, tiny_models, "b", data, ["training.seed=1", "adapter.peft.r=8"])
    other, _ = tiny_run(tmp_path, tiny_models, "other", other_rows)
    fewer, _ = tiny_run(tmp_path, tiny_models, "fewer", fewer_rows)
    capsys.readouterr()

    out = compare_cli(capsys, a.run_dir, b.run_dir)
    lines = out.splitlines()
    assert lines[0].count("95% interval") == 2 and lines[2].startswith("a ")
    assert "paired comparison on 40 shared test rows (B - A; A = a, B = b)" in out
    assert "McNemar exact p = " in out and "method: paired bootstrap over 40 test rows" in out
    gold_a, pred_a = _gold_pred(a.run_dir)
    _, pred_b = _gold_pred(b.run_dir)
    expected = paired_comparison(gold_a, pred_a, pred_b, LABELS)
    acc = expected.difference["accuracy"]
    assert f"accuracy  {acc.estimate:+.4f}  95% [{acc.low:+.4f}, {acc.high:+.4f}]" in out
    assert f"McNemar exact p = {expected.mcnemar_p:.4g}" in out
    verdict = expected.verdict("accuracy")
    assert verdict.replace("A is", "A (a) is").replace("B is", "B (b) is") in out

    as_json = json.loads(compare_cli(capsys, "--json", a.run_dir, b.run_dir))
    assert [r["run"] for r in as_json["runs"]] == ["a", "b"]
    paired = as_json["paired"]
    assert (paired["a"], paired["b"], paired["rows"]) == ("a", "b", 40)
    assert paired["mcnemar_p"] == expected.mcnemar_p
    assert paired["verdict"]["accuracy"] == verdict

    # a run against itself: a difference of exactly 0, not distinguishable, p = 1
    same = json.loads(compare_cli(capsys, "--json", a.run_dir, a.run_dir))["paired"]
    assert same["difference"]["accuracy"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    assert same["verdict"] == {"accuracy": "not distinguishable", "macro_f1": "not distinguishable"}
    assert same["mcnemar_p"] == 1.0

    out = compare_cli(capsys, a.run_dir, other.run_dir)
    assert "texts or gold labels differ: not the same test rows" in out
    assert "McNemar" not in out
    out = compare_cli(capsys, a.run_dir, fewer.run_dir)
    assert "a has 40 test rows and fewer has 24" in out
    # three runs: the table alone, as before
    out = compare_cli(capsys, a.run_dir, b.run_dir, other.run_dir)
    assert len(out.splitlines()) == 5 and "paired" not in out


def test_compare_without_predictions_says_why(tmp_path, tiny_models, reset_accelerate, capsys):
    data = write_data(tmp_path / "data", LABELS)
    a, _ = tiny_run(tmp_path, tiny_models, "a", data)
    b, _ = tiny_run(tmp_path, tiny_models, "b", data)
    (b.run_dir / "predictions.jsonl").unlink()  # as a run made before predictions were kept
    capsys.readouterr()
    out = compare_cli(capsys, a.run_dir, b.run_dir)
    assert out.splitlines()[2].startswith("a ") and "no predictions.jsonl" in out
    with pytest.raises(ConfigError, match="no predictions.jsonl"):
        compare_two(a.run_dir, b.run_dir)


def _gold_pred(run_dir):
    read = read_predictions(run_dir)
    return read.gold, read.pred
