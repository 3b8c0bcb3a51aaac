"""Calibrated adapters that know when not to answer: temperature scaling, ECE, the reject
threshold (peftkit.metrics.calibration); the recipe's calibration block and a tiny run that
records them in task.json; AdaptedModel and the HTTP app applying them."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from helpers import synthetic
from test_recipes import GOOD, write_data, write_recipe

from peftkit import AdaptedModel, Registry, TrainConfig, load_base, load_preset, train
from peftkit.adapters.task import TaskInfo
from peftkit.config.recipes import load_recipe
from peftkit.data.dataset import Split
from peftkit.errors import ConfigError
from peftkit.metrics.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    bound_text,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    out_of_scope_scores,
    reliability,
    risk_coverage,
    temperature_bound,
)
from peftkit.run.pipeline import run_recipe
from peftkit.run.predictions import compare_two, read_predictions, write_predictions


def overconfident(n=3000, classes=4, temperature=2.5, seed=0):
    """Probabilities ``temperature`` times too sharp, with labels drawn from the true ones."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 3
    true = np.exp(logits / temperature)
    true /= true.sum(1, keepdims=True)
    gold = np.array([rng.choice(classes, p=row) for row in true])
    sharp = np.exp(logits - logits.max(1, keepdims=True))
    return sharp / sharp.sum(1, keepdims=True), gold


# --- the math ---------------------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature_and_halves_the_ece():
    probs, gold = overconfident(temperature=2.5)
    t = fit_temperature(probs, gold)
    assert t == pytest.approx(2.5, rel=0.08)
    scaled = apply_temperature(probs, t)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(scaled.sum(1), 1.0)
    before, after = (
        expected_calibration_error(probs, gold),
        expected_calibration_error(scaled, gold),
    )
    assert after <= before / 2 and before > 0.1
    assert negative_log_likelihood(scaled, gold) < negative_log_likelihood(probs, gold)
    # under-confident probabilities are sharpened (T < 1)
    soft = apply_temperature(probs, 5.0)
    assert fit_temperature(soft, gold) == pytest.approx(2.5 / 5.0, rel=0.08)


def test_a_temperature_that_stops_at_its_search_bound_is_the_bound_and_says_so():
    low, high = TEMPERATURE_BOUNDS
    gold = np.arange(40) % 3
    right = np.full((40, 3), 0.015)
    right[np.arange(40), gold] = 0.97  # confident and right: sharpening always helps
    assert fit_temperature(right, gold) == low and temperature_bound(low) == "lower"
    wrong = np.roll(right, 1, axis=1)  # confident and wrong: flattening always helps
    assert fit_temperature(wrong, gold) == high and temperature_bound(high) == "upper"
    assert fit_temperature(right[:2], gold[:2]) == low  # two rows: nothing to fit on
    assert fit_temperature(right, gold, bounds=(0.5, 4.0)) == 0.5
    assert temperature_bound(0.5, (0.5, 4.0)) == "lower"
    probs, labels = overconfident(n=500)
    fitted = fit_temperature(probs, labels)
    assert low < fitted < high and temperature_bound(fitted) is None
    assert apply_temperature(right, low).argmax(1).tolist() == gold.tolist()  # no overflow
    for side, value in (("lower", low), ("upper", high)):
        line = bound_text(side, 40)
        assert "\n" not in line and f"{side} search bound {value:g}" in line
        assert "40 validation rows" in line and "too few" in line


def test_reliability_bins_sum_to_the_rows_and_give_the_ece():
    probs, gold = overconfident(n=500)
    data = reliability(probs, gold)
    assert sum(data["count"]) == 500 and len(data["edges"]) == 16
    assert data["ece"] == pytest.approx(expected_calibration_error(probs, gold))
    filled = [(c, a) for c, a in zip(data["confidence"], data["accuracy"], strict=True) if c]
    assert all(c > a for c, a in filled[-3:])  # overconfident at the top


def test_choose_threshold_meets_a_precision_or_a_coverage_target():
    probs, gold = overconfident(temperature=1.5)
    correct = probs.argmax(1) == gold
    for goal in (0.8, 0.9, 0.95):
        choice = choose_threshold(probs, gold, precision=goal)
        answered = probs.max(1) >= choice.threshold
        assert correct[answered].mean() >= goal
        assert choice.coverage == pytest.approx(answered.mean())
        # answering one more row (the next lower confidence) would miss the target or be all
        lower = probs.max(1)[~answered]
        if lower.size:
            more = probs.max(1) >= lower.max()
            assert correct[more].mean() < goal or more.sum() < 10
    choice = choose_threshold(probs, gold, coverage=0.6)
    assert (probs.max(1) >= choice.threshold).mean() >= 0.6
    assert choice.coverage == pytest.approx(0.6, abs=0.01)
    assert choice.to_dict()["target"] == {"coverage": 0.6}


def test_an_impossible_target_is_one_line_naming_the_best_achievable():
    probs, gold = overconfident(temperature=6.0)  # mostly wrong at any confidence
    with pytest.raises(ConfigError) as err:
        choose_threshold(probs, gold, precision=0.99, where="validation (sst2)")
    message = str(err.value)
    assert "\n" not in message and "best achievable is 0." in message
    assert "precision >= 0.99" in message and "validation (sst2)" in message
    with pytest.raises(ConfigError, match="exactly one reject target"):
        choose_threshold(probs, gold, precision=0.9, coverage=0.5)
    # coverage: every row predicted out-of-scope (label 0) leaves nothing to answer
    with pytest.raises(ConfigError, match="best achievable is"):
        choose_threshold(probs, gold, coverage=1.0, out_of_scope=0)


def test_risk_coverage_and_out_of_scope_scores():
    probs, gold = overconfident(n=800)
    curve = risk_coverage(probs, gold)
    assert curve["coverage"][-1] == 1.0 and len(curve["coverage"]) <= 200
    assert curve["risk"][-1] == pytest.approx(1 - (probs.argmax(1) == gold).mean(), abs=1e-6)
    assert curve["risk"][0] < curve["risk"][-1]
    assert 0 < curve["aurc"] < curve["risk"][-1]
    oos = out_of_scope_scores(probs, gold, 0, threshold=0.9)
    flagged = probs.argmax(1) == 0
    assert oos["recall"] == pytest.approx(((gold == 0) & flagged).sum() / (gold == 0).sum(), 1e-5)
    assert oos["recall_thresholded"] >= oos["recall"]  # abstentions count as out-of-scope


# --- TaskInfo ---------------------------------------------------------------------------------


INFO = TaskInfo(method="lora", labels=("neg", "pos", "oos"), pooling="mean", max_length=32,
                hidden_size=32)  # fmt: skip


def test_task_info_keeps_its_calibration_and_old_folders_read_as_before():
    assert "calibration" not in INFO.to_dict() and INFO.temperature == 1.0
    assert INFO.threshold is None and not INFO.abstains("neg", 0.01)
    cal = {"temperature": 2.0, "threshold": 0.7, "target": {"precision": 0.9},
           "out_of_scope": "oos", "ece_before": 0.2, "ece_after": 0.05}  # fmt: skip
    info = replace(INFO, calibration=cal)
    back = TaskInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert back.calibration == cal and back.temperature == 2.0 and back.threshold == 0.7
    assert back.abstains("pos", 0.69) and not back.abstains("pos", 0.7)
    assert back.abstains("oos", 0.99)  # the out-of-scope label is an abstention
    for bad in ({"temperature": 0}, {"threshold": 1.5}, {"out_of_scope": "spam"}):
        with pytest.raises(ConfigError, match="task calibration"):
            replace(INFO, calibration=bad)


# --- the run folder's predictions.jsonl -------------------------------------------------------


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_carry_the_served_probabilities_and_abstentions(tmp_path):
    labels = ["neg", "pos", "oos"]
    raw = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.4, 0.35, 0.25]])
    split = Split(texts=["a", "b", "c", "d"], labels=[0, 1, 2, 1])
    cal = {"temperature": 2.0, "threshold": 0.45, "out_of_scope": "oos"}
    rows = _rows(write_predictions(tmp_path / "p.jsonl", split, labels, raw, cal))
    served = apply_temperature(raw, 2.0)
    for r, s_row, r_row in zip(rows, served, raw, strict=True):
        assert list(r["probs"].values()) == pytest.approx(s_row.tolist(), abs=1e-6)
        assert list(r["probs_uncalibrated"].values()) == pytest.approx(r_row.tolist(), abs=1e-6)
        assert r["pred"] == labels[int(r_row.argmax())]  # the argmax does not move
        assert r["abstained"] == (s_row.max() < 0.45 or r["pred"] == "oos")
    assert [r["abstained"] for r in rows] == [False, True, True, True]
    assert list(rows[0]) == ["index", "text", "gold", "pred", "abstained", "probs",
                             "probs_uncalibrated"]  # fmt: skip
    # as trained (no calibration, or temperature 1 without a threshold): the old fields only
    for plain in (None, {"temperature": 1.0}):
        rows = _rows(write_predictions(tmp_path / "q.jsonl", split, labels, raw, plain))
        assert list(rows[0]) == ["index", "text", "gold", "pred", "probs"]
        assert list(rows[1]["probs"].values()) == pytest.approx(raw[1].tolist())
    # a threshold without a temperature: abstentions, the probabilities as trained
    rows = _rows(write_predictions(tmp_path / "r.jsonl", split, labels, raw, {"threshold": 0.6}))
    assert [r["abstained"] for r in rows] == [False, True, False, True]
    assert "probs_uncalibrated" not in rows[0]


def test_old_and_new_predictions_files_compare_row_by_row(tmp_path):
    labels = ["neg", "pos"]
    split = Split(texts=["a", "b", "c", "d", "e", "f"], labels=[0, 1, 0, 1, 0, 1])
    raw = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55], [0.9, 0.1], [0.6, 0.4]])
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    write_predictions(old / "predictions.jsonl", split, labels, raw)  # as runs wrote them
    write_predictions(new / "predictions.jsonl", split, labels, raw[::-1].copy(),
                      {"temperature": 0.5, "threshold": 0.9})  # fmt: skip
    assert "abstained" not in _rows(old / "predictions.jsonl")[0]
    a, b = read_predictions(old), read_predictions(new)
    assert a.labels == b.labels == ("neg", "pos") and a.rows_hash == b.rows_hash
    assert b.pred.tolist() == raw[::-1].argmax(1).tolist()
    comparison, why = compare_two(old, new)
    assert why == "" and comparison is not None and comparison.rows == 6


# --- the recipe -------------------------------------------------------------------------------


def test_the_recipe_calibration_block_is_checked(tmp_path):
    block = "calibration:\n  reject: {precision: 0.9}\n  out_of_scope: positive\n"
    recipe = load_recipe(write_recipe(tmp_path, GOOD + block))
    assert recipe.calibration.temperature is None and recipe.calibration.reject.precision == 0.9
    assert load_recipe(write_recipe(tmp_path, GOOD)).calibration.reject is None
    typo = write_recipe(tmp_path, GOOD + "calibration:\n  temprature: false\n", "t.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(typo)
    assert "t.yaml, line 12" in str(err.value) and "did you mean 'temperature'" in str(err.value)
    both = write_recipe(
        tmp_path, GOOD + "calibration:\n  reject: {precision: 0.9, coverage: 0.5}\n"
    )
    with pytest.raises(ConfigError, match="exactly one target"):
        load_recipe(both)
    with pytest.raises(ConfigError, match=r"reject.coverage must be in \(0, 1\]"):
        load_recipe(write_recipe(tmp_path, GOOD), ["calibration.reject.coverage=1.5"])


def test_an_unknown_out_of_scope_label_is_refused_before_anything_is_written(tmp_path, tiny_models):
    data = write_data(tmp_path / "data", ["negative", "positive"])
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    recipe = load_recipe(write_recipe(tmp_path, text), [f"data.source={data}",
                         "calibration.out_of_scope=positve"])  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean 'positive'"):
        run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert not (tmp_path / "run").exists() and not (tmp_path / "reg").exists()


def test_a_tiny_run_records_the_temperature_and_threshold_and_draws_them(
    tmp_path, tiny_models, reset_accelerate
):
    data = write_data(tmp_path / "data", ["negative", "positive"], n_eval=40)
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    overrides = [f"data.source={data}", "training.max_steps=4", "training.batch_size=8",
                 "calibration.reject.coverage=0.5"]  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path, text), overrides)
    echo = io.StringIO()
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg", out=echo)
    run = outcome.run_dir
    task = json.loads((run / "adapter" / "task.json").read_text())
    cal = task["calibration"]
    assert cal["temperature"] > 0 and cal["target"] == {"coverage": 0.5}
    assert 0 <= cal["threshold"] <= 1 and cal["ece_split"] == "test"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["temperature"] == cal["temperature"]
    assert metrics["ece"] == cal["ece_before"] and metrics["ece_calibrated"] == cal["ece_after"]
    assert 0 < metrics["reject_coverage"] <= 1 and "reject_precision" in metrics
    for name in ("reliability.png", "risk_coverage.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((run / "risk_coverage.json").read_text())
    assert curve["chosen"]["threshold"] == cal["threshold"] and curve["coverage"][-1] == 1.0
    line = f"ECE on test {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
    for report in (echo.getvalue(), (run / "report.txt").read_text()):
        assert line in report and "reject option: threshold" in report
    registered = Registry(tmp_path / "reg").get(outcome.entries[0])
    assert json.loads((registered.path / "task.json").read_text())["calibration"] == cal
    assert cal["temperature_bound"] in (None, "lower", "upper")
    # predictions.jsonl holds what the registered adapter serves: probabilities, abstentions
    rows = _rows(run / "predictions.jsonl")
    labels = ["negative", "positive"]
    served = np.array([[r["probs"][lab] for lab in labels] for r in rows])
    raw = np.array([[r["probs_uncalibrated"][lab] for lab in labels] for r in rows])
    np.testing.assert_allclose(served, apply_temperature(raw, cal["temperature"]), atol=1e-4)
    assert [r["pred"] for r in rows] == [labels[i] for i in raw.argmax(1)]
    assert [r["abstained"] for r in rows] == (served.max(1) < cal["threshold"]).tolist()
    texts = [json.loads(line)["text"] for line in (data / "test.jsonl").read_text().splitlines()]
    with AdaptedModel(load_base(tiny_models["bert"]), Registry(tmp_path / "reg")) as model:
        predicted = model.predict(texts[:12], adapter=outcome.entries[0])
    for row, got in zip(rows, predicted, strict=False):
        assert row["pred"] == got.label
        assert list(row["probs"].values()) == pytest.approx(list(got.probs.values()), abs=1e-4)
        if abs(got.score - cal["threshold"]) > 1e-4:
            assert row["abstained"] == got.abstained
    assert read_predictions(run).pred.tolist() == raw.argmax(1).tolist()  # compare reads it
    # a finished run with these files is still one --overwrite may replace
    again = run_recipe(recipe, run_dir=run, registry=tmp_path / "reg2", overwrite=True)
    assert (again.run_dir / "reliability.png").is_file()


def test_a_temperature_at_its_bound_is_stored_and_said_in_the_report_and_the_log(
    tmp_path, tiny_models, reset_accelerate, monkeypatch
):
    import peftkit.run.confidence as confidence

    def confident_and_right(base, model, split, batch_size):  # the validation rows' probs
        probs = np.full((len(split), 2), 0.01)
        probs[np.arange(len(split)), list(split.labels)] = 0.99
        return probs

    monkeypatch.setattr(confidence, "split_probs", confident_and_right)
    data = write_data(tmp_path / "data", ["negative", "positive"], n_eval=40)
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    overrides = [f"data.source={data}", "training.max_steps=2", "training.batch_size=8"]
    recipe = load_recipe(write_recipe(tmp_path, text), overrides)
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    run, low = outcome.run_dir, TEMPERATURE_BOUNDS[0]
    cal = json.loads((run / "adapter" / "task.json").read_text())["calibration"]
    assert cal["temperature"] == low and cal["temperature_bound"] == "lower"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["temperature"] == low and metrics["temperature_bound"] == "lower"
    line = bound_text("lower", 40)
    assert line in (run / "report.txt").read_text().splitlines()
    assert sum(line in row for row in (run / "run.log").read_text().splitlines()) == 1
    rows = _rows(run / "predictions.jsonl")  # served at that temperature: sharp, finite
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)


def test_an_out_of_scope_label_is_scored_and_an_unmeetable_target_refused(
    tmp_path, tiny_models, reset_accelerate
):
    data = write_data(tmp_path / "data", ["negative", "positive", "oos"], n_eval=40)
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    common = [f"data.source={data}", "training.max_steps=2", "training.batch_size=8",
              "calibration.out_of_scope=oos"]  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path, text), [*common, "calibration.reject.coverage=0.3"])
    echo = io.StringIO()
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg", out=echo)
    task = json.loads((outcome.run_dir / "adapter" / "task.json").read_text())
    assert task["calibration"]["out_of_scope"] == "oos"
    oos = json.loads((outcome.run_dir / "metrics.json").read_text())["out_of_scope"]
    assert oos["label"] == "oos"
    assert set(oos) >= {"precision", "recall", "precision_thresholded", "recall_thresholded"}
    assert oos["recall_thresholded"] >= oos["recall"]
    assert "out-of-scope 'oos' on test: precision" in echo.getvalue()

    # precision 0.99 over at least 10 answered rows: out of reach for a 2-step tiny model
    strict = load_recipe(write_recipe(tmp_path, text, "strict.yaml"),
                         [*common, "calibration.reject.precision=0.99"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_recipe(strict, run_dir=tmp_path / "strict", registry=tmp_path / "reg2")
    message = str(err.value)
    assert "\n" not in message and "precision >= 0.99" in message
    assert "the best achievable is" in message and "lower the target" in message
    assert not (tmp_path / "strict" / "adapter").exists()  # refused before saving
    assert Registry(tmp_path / "reg2").list() == []  # and before registering


# --- prediction and serving -------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    """(base, registry root, texts): 'plain' (as trained), 'hot' (temperature 3, a threshold
    between its scores) and 'oos' (the label of the first text named out-of-scope)."""
    root = tmp_path_factory.mktemp("calibrated")
    base = load_base(tiny_models["bert"])
    registry = Registry(root / "registry")
    data = synthetic("sentiment")
    config = TrainConfig(max_steps=3, batch_size=8, learning_rate=5e-2, progress=False,
                         patience=None)  # fmt: skip
    texts = list(data.split("test").texts[:12])
    with train(base, load_preset("lora"), data, config, root / "run") as result:
        registry.register("plain", result.model.save_pretrained(root / "plain"))
    with AdaptedModel(base, registry) as model:
        raw = model.predict_proba(texts, adapter="plain")
    scores = np.sort(apply_temperature(raw, 3.0).max(1))
    threshold = float((scores[5] + scores[6]) / 2)
    task = json.loads((root / "plain" / "task.json").read_text())
    first = task["labels"][int(raw[0].argmax())]
    for name, cal in (("hot", {"temperature": 3.0, "threshold": threshold}),
                      ("oos", {"temperature": 1.0, "out_of_scope": first})):  # fmt: skip
        shutil.copytree(root / "plain", root / name)
        (root / name / "task.json").write_text(json.dumps({**task, "calibration": cal}))
        registry.register(name, root / name)
    return base, root / "registry", texts, raw, threshold


def test_predict_applies_the_temperature_and_abstains_below_the_threshold(calibrated):
    base, root, texts, raw, threshold = calibrated
    with AdaptedModel(base, Registry(root)) as model:
        hot = model.predict_proba(texts, adapter="hot")
        np.testing.assert_allclose(hot, apply_temperature(raw, 3.0), atol=1e-5)
        assert not np.allclose(hot, raw, atol=1e-3)
        assert (hot.argmax(1) == raw.argmax(1)).all()
        plain = model.predict(texts, adapter="plain")
        assert not any(p.abstained for p in plain)
        rows = model.predict_mixed(texts + texts, ["hot"] * len(texts) + ["oos"] * len(texts))
    hot_rows, oos_rows = rows[: len(texts)], rows[len(texts) :]
    assert sum(p.abstained for p in hot_rows) == 6  # the threshold sits between 6 and 6
    for p, q in zip(hot_rows, plain, strict=True):
        assert p.label == q.label and p.abstained == (p.score < threshold)
        assert p.to_dict()["abstained"] == p.abstained
    assert oos_rows[0].abstained
    assert all(p.abstained == (p.label == oos_rows[0].label) for p in oos_rows)


def test_http_rows_say_whether_they_abstained(calibrated):
    from fastapi.testclient import TestClient

    from peftkit.config.serve import ServeConfig
    from peftkit.serving.http import create_app
    from peftkit.serving.scheduler import Scheduler

    base, root, texts, _, threshold = calibrated
    with AdaptedModel(base, Registry(root, read_only=True)) as model:
        expected = model.predict(texts, adapter="hot")
        scheduler = Scheduler(model, max_wait_ms=0).start()
        try:
            app = create_app(scheduler, Registry(root, read_only=True), base.fingerprint.id,
                             ServeConfig(registry=str(root)))  # fmt: skip
            with TestClient(app) as client:
                response = client.post("/v1/classify", json={"adapter": "hot", "inputs": texts})
        finally:
            scheduler.close(timeout=10)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["abstained"] for r in results] == [p.abstained for p in expected]
    assert any(r["abstained"] for r in results) and not all(r["abstained"] for r in results)
    for got, want in zip(results, expected, strict=True):
        assert got["label"] == want.label and got["score"] == pytest.approx(want.score, abs=1e-5)
