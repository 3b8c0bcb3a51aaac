"""peftkit.metrics.report and peftkit.run.plots: the shipped evaluate modules, reports, ECE, plots.

Reference values come from scikit-learn called directly on the same seeded random data.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from peftkit.errors import ConfigError, DataError
from peftkit.metrics.report import (
    METRIC_NAMES,
    METRICS_DIR,
    ClassificationReport,
    classification_report,
    compute_metrics,
    expected_calibration_error,
    load_metric,
)
from peftkit.run.plots import plot_confusion, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SKLEARN_FUNCS = {
    "f1": skm.f1_score,
    "precision": skm.precision_score,
    "recall": skm.recall_score,
}


def random_labels(n_labels: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions right ~60% of the time, otherwise uniform; the last class never occurs."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_labels - 1, n)
    noise = rng.integers(0, n_labels - 1, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, noise)
    return y_true, y_pred


# --- the evaluate modules -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["f1", "precision", "recall"])
@pytest.mark.parametrize("average", ["macro", "weighted", "micro"])
def test_module_matches_sklearn(name: str, average: str) -> None:
    y_true, y_pred = random_labels(6, 300, seed=0)
    ids = list(range(6))  # includes class 5, which never occurs
    got = load_metric(name).compute(
        references=y_true, predictions=y_pred, labels=ids, average=average
    )[name]
    want = SKLEARN_FUNCS[name](y_true, y_pred, labels=ids, average=average, zero_division=0)
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("name", ["f1", "precision", "recall"])
def test_module_binary_and_per_class(name: str) -> None:
    y_true, y_pred = random_labels(3, 200, seed=1)  # ids 0 and 1 only
    binary = load_metric(name).compute(references=y_true, predictions=y_pred, pos_label=0)
    assert binary[name] == pytest.approx(SKLEARN_FUNCS[name](y_true, y_pred, pos_label=0))
    per_class = load_metric(name).compute(
        references=y_true, predictions=y_pred, labels=[0, 1, 2], average=None
    )[name]
    want = SKLEARN_FUNCS[name](y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=0)
    assert per_class == pytest.approx(want.tolist())
    assert per_class[2] == 0.0


def test_accuracy_module_matches_sklearn() -> None:
    y_true, y_pred = random_labels(4, 250, seed=2)
    got = load_metric("accuracy").compute(references=y_true, predictions=y_pred)["accuracy"]
    assert got == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_load_metric_is_cached_and_rejects_unknown_names() -> None:
    assert load_metric("f1") is load_metric("f1")
    with pytest.raises(ConfigError, match=r"'acuracy'.*did you mean 'accuracy'"):
        load_metric("acuracy")
    with pytest.raises(ConfigError, match="peftkit ships: accuracy, f1, precision, recall"):
        load_metric("bleu")


def test_metric_scripts_are_folders_evaluate_loads_by_path() -> None:
    # each metric is a folder holding one script of its name (what evaluate.load(path) reads),
    # not a package of peftkit's: no __init__.py beside it
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file(), name
        assert not (METRICS_DIR / name / "__init__.py").exists(), name


def test_modules_load_offline_from_a_read_only_folder(tmp_path: Path) -> None:
    """A fresh process, hub offline, sockets refused, a read-only copy of the scripts."""
    folder = tmp_path / "site" / "metrics"
    folder.mkdir(parents=True)
    for name in METRIC_NAMES:
        (folder / name).mkdir()
        (folder / name / f"{name}.py").write_bytes((METRICS_DIR / name / f"{name}.py").read_bytes())
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | (stat.S_IXUSR if path.is_dir() else 0))
    before = sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    script = textwrap.dedent(
        f"""
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse

        import evaluate
        from pathlib import Path
        import peftkit.metrics.report as ev
        ev.METRICS_DIR = Path({str(folder)!r})
        f1 = evaluate.load({str(folder / "f1")!r})
        print("direct", f1.compute(references=[0, 1, 1], predictions=[0, 1, 0], average="macro")["f1"])
        print("via", ev.compute_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])["macro_f1"])
        """
    )
    cache = tmp_path / "modules"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = skm.f1_score([0, 1, 1], [0, 1, 0], average="macro")
    lines = dict(
        line.split() for line in done.stdout.splitlines() if line.startswith(("direct", "via"))
    )
    assert float(lines["direct"]) == pytest.approx(want)
    assert float(lines["via"]) == pytest.approx(want)
    # evaluate imported copies from its module cache and wrote nothing beside the scripts.
    assert sorted(p.name for p in cache.rglob("*.py") if p.parent.parent.name == "f1") == [
        "__init__.py",
        "f1.py",
    ]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


# --- compute_metrics --------------------------------------------------------------------


def test_compute_metrics_matches_sklearn() -> None:
    labels = ["a", "b", "c", "d", "never"]
    y_true, y_pred = random_labels(len(labels), 400, seed=3)
    got = compute_metrics(y_true.tolist(), y_pred.tolist(), labels)

    def sk(func, average):  # type: ignore[no-untyped-def]
        return func(y_true, y_pred, average=average, zero_division=0)

    want = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "macro_f1": sk(skm.f1_score, "macro"),
        "weighted_f1": sk(skm.f1_score, "weighted"),
        "macro_precision": sk(skm.precision_score, "macro"),
        "macro_recall": sk(skm.recall_score, "macro"),
    }
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # The never-seen class does not count in the macro average: counting it (as a 0) is
    # what scikit-learn gives with every label named, and scores lower.
    everything = skm.f1_score(
        y_true, y_pred, labels=range(len(labels)), average="macro", zero_division=0
    )
    assert 5 * everything == pytest.approx(4 * got["macro_f1"])


def test_absent_classes_score_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report([0, 0, 1, 1], [0, 0, 0, 0], ["a", "b", "c"])
        compute_metrics([0, 0, 1, 1], [0, 0, 0, 0], ["a", "b", "c"])
    assert report.per_class[1] == report.per_class[1].__class__(0.0, 0.0, 0.0, 2)
    assert report.per_class[2].support == 0 and report.per_class[2].f1 == 0.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "pattern"),
    [
        ([0, 1, 1], [0, 1], ["a", "b"], "y_true has 3 items but y_pred has 2"),
        ([0, 1, 5], [0, 1, 1], ["a", "b"], r"y_true\[2\] = 5 .* 2 labels, so valid ids are 0..1"),
        ([0, 1], [0, -1], ["a", "b"], r"y_pred\[1\] = -1 is not a label id"),
        ([0.0, 1.0], [0, 1], ["a", "b"], "integer label ids.*float64"),
        ([], [], ["a", "b"], "empty"),
        ([0, 1], [0, 1], [], "labels is empty"),
        ([0, 1], [0, 1], ["a", "a"], "unique; repeated: 'a'"),
    ],
)
def test_bad_input_is_a_data_error(y_true, y_pred, labels, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=pattern):
        compute_metrics(y_true, y_pred, labels)
    with pytest.raises(DataError, match=pattern):
        classification_report(y_true, y_pred, labels)


# --- classification_report --------------------------------------------------------------


@pytest.fixture(scope="module")
def report_data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    y_true, y_pred = random_labels(len(labels), 500, seed=4)
    return y_true, y_pred, labels


def test_report_matches_sklearn(report_data) -> None:  # type: ignore[no-untyped-def]
    y_true, y_pred, labels = report_data
    report = classification_report(y_true, y_pred, labels)
    ids = list(range(len(labels)))
    want = skm.classification_report(
        y_true, y_pred, labels=ids, target_names=labels, output_dict=True, zero_division=0
    )
    assert report.labels == tuple(labels)
    for name, scores in zip(labels, report.per_class, strict=True):
        ref = want[name]
        assert (scores.precision, scores.recall, scores.f1) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]), abs=1e-12
        )
        assert scores.support == ref["support"]
    # The macro average is over the labels present (sklearn's default labels): "tech"
    # never occurs, so it is left out; the weighted one gives it no weight either way.
    present = skm.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for mine, ref in (
        (report.macro, present["macro avg"]),
        (report.weighted, want["weighted avg"]),
    ):
        assert (mine.precision, mine.recall, mine.f1) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]), abs=1e-12
        )
        assert mine.support == ref["support"] == len(y_true)
    assert report.macro.f1 > want["macro avg"]["f1-score"]
    assert report.accuracy == pytest.approx(want["accuracy"])
    assert np.array_equal(
        np.array(report.confusion), skm.confusion_matrix(y_true, y_pred, labels=ids)
    )
    # Same layout as sklearn's text report (every label's row; the macro row as above).
    text = skm.classification_report(
        y_true, y_pred, labels=ids, target_names=labels, zero_division=0, digits=3
    ).splitlines()
    mine = report.to_text(digits=3).splitlines()
    assert len(mine) == len(text)
    for got, ref in zip(mine, text, strict=True):
        if ref.lstrip().startswith("macro avg"):
            m = report.macro
            assert got.split() == ["macro", "avg"] + [
                f"{v:.3f}" for v in (m.precision, m.recall, m.f1)
            ] + [str(m.support)]
        else:
            assert got == ref


def test_report_round_trips_through_json(report_data) -> None:  # type: ignore[no-untyped-def]
    report = classification_report(*report_data)
    data = json.loads(json.dumps(report.to_dict()))
    assert list(data["per_class"]) == list(report.labels)
    assert data["per_class"]["sport"]["support"] == report.per_class[3].support
    assert ClassificationReport.from_dict(data) == report


# --- expected calibration error ---------------------------------------------------------


def test_ece_hand_computed() -> None:
    # n_bins=4 -> bins (0,.25] (.25,.5] (.5,.75] (.75,1].
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # conf .9, pred 0, correct  -> bin 3
            [0.2, 0.8, 0.0],  # conf .8, pred 1, wrong    -> bin 3
            [0.3, 0.3, 0.4],  # conf .4, pred 2, correct  -> bin 1
            [0.6, 0.2, 0.2],  # conf .6, pred 0, wrong    -> bin 2
            [0.5, 0.25, 0.25],  # conf .5 (on an edge: lower bin), pred 0, correct -> bin 1
        ]
    )
    y_true = [0, 0, 2, 1, 0]
    # bin 3: acc 1/2, conf .85 -> |.5-.85| = .35, weight 2/5
    # bin 1: acc 2/2, conf .45 -> .55, weight 2/5
    # bin 2: acc 0/1, conf .6  -> .6,  weight 1/5
    want = 0.4 * 0.35 + 0.4 * 0.55 + 0.2 * 0.6
    assert expected_calibration_error(probs, y_true, n_bins=4) == pytest.approx(want)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    probs = np.tile([0.75, 0.25], (8, 1))
    y_true = [0, 0, 0, 1, 0, 0, 0, 1]  # 6 of 8 right at confidence .75
    assert expected_calibration_error(probs, y_true) == pytest.approx(0.0)
    assert expected_calibration_error(probs, [1] * 8) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("probs", "y_true", "n_bins", "error", "pattern"),
    [
        ([[2.0, -1.0]], [0], 15, DataError, "not logits"),
        ([[0.6, 0.6]], [0], 15, DataError, "row 0 sums to 1.2000"),
        ([[0.5, 0.5]], [0, 1], 15, DataError, "1 rows but y_true has 2"),
        ([[0.5, 0.5]], [2], 15, DataError, r"y_true\[0\] = 2"),
        ([0.5, 0.5], [0], 15, DataError, r"\(n, C\) array; got shape \(2,\)"),
        ([[0.5, 0.5]], [0], 0, ConfigError, "n_bins must be a positive integer"),
    ],
)
def test_ece_bad_input(probs, y_true, n_bins, error, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=pattern):
        expected_calibration_error(np.array(probs), y_true, n_bins=n_bins)


# --- plots ------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


@pytest.mark.parametrize("n_labels", [3, 80])
def test_plot_confusion_writes_png(tmp_path: Path, n_labels: int) -> None:
    labels = [f"intent_{i}_{'long_name' * (i % 4)}" for i in range(n_labels)]
    y_true, y_pred = random_labels(n_labels + 1, 40 * n_labels, seed=5)
    # "$" would start matplotlib mathtext, and "\frac" without arguments fails to draw.
    report = classification_report(y_true, y_pred, labels + [r"cost $\frac$"])
    out = plot_confusion(report, tmp_path / "plots" / f"confusion_{n_labels}.png", title="test")
    assert out == tmp_path / "plots" / f"confusion_{n_labels}.png"
    assert_png(out)


def test_plot_history_writes_png_and_svg(tmp_path: Path) -> None:
    history: list[dict[str, float]] = []
    for step in range(5, 205, 5):
        history.append({"step": step, "epoch": step / 100, "loss": 2 / (1 + step / 40), "lr": 2e-5})
        if step % 50 == 0:
            history.append(
                {"step": step, "eval_loss": 1.5 / (1 + step / 60), "eval_accuracy": 0.5 + step / 500,
                 "eval_macro_f1": 0.4 + step / 450, "eval_runtime": 3.2}
            )  # fmt: skip
    assert_png(plot_history(history, tmp_path / "curves.png"))
    svg = plot_history(history, tmp_path / "curves.svg").read_text()
    assert "<svg" in svg and "macro_f1" in svg and "runtime" not in svg
    assert "train (smoothed)" in svg and "eval (cross-entropy)" in svg
    named = plot_history(history, tmp_path / "pairs.svg", loss_label="train (pair loss)")
    assert "train (pair loss) (smoothed)" in named.read_text()


def test_plot_history_with_only_eval_rows(tmp_path: Path) -> None:
    assert_png(plot_history([{"step": 1, "eval_accuracy": 0.5}], tmp_path / "eval_only.png"))


def test_plot_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no 'loss' or 'eval_\\*' values"):
        plot_history([{"step": 1, "epoch": 0.1}], tmp_path / "x.png")
    with pytest.raises(DataError, match=r"history\[1\] has no numeric 'step'"):
        plot_history([{"step": 1, "loss": 1.0}, {"loss": 0.9}], tmp_path / "x.png")
    report = classification_report([0, 1], [0, 1], ["a", "b"])
    with pytest.raises(ConfigError, match=r"suffix must be one of \.png, \.svg, \.pdf"):
        plot_confusion(report, tmp_path / "confusion.jpg")
    assert not list(tmp_path.iterdir())
