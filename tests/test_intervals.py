"""Bootstrap intervals, paired comparisons and McNemar's test (peftkit.metrics.intervals)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import f1_score

from peftkit.errors import DataError
from peftkit.metrics.intervals import (
    bootstrap_intervals,
    bootstrap_method,
    mcnemar_p,
    paired_comparison,
)

LABELS = ["a", "b", "c"]


def noisy(gold: np.ndarray, accuracy: float, seed: int, n_labels: int = 3) -> np.ndarray:
    """Predictions right on about ``accuracy`` of the rows, a random label elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = (gold + rng.integers(1, n_labels, gold.size)) % n_labels
    return np.where(rng.random(gold.size) < accuracy, gold, wrong)


def gold_labels(n: int, seed: int = 0, n_labels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_labels, n)


def test_interval_contains_point_estimate_and_matches_sklearn():
    gold = gold_labels(300)
    pred = noisy(gold, 0.8, seed=1)
    ci = bootstrap_intervals(gold, pred, LABELS)
    assert ci["accuracy"].estimate == pytest.approx(float(np.mean(gold == pred)))
    macro = f1_score(gold, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert ci["macro_f1"].estimate == pytest.approx(macro)
    for interval in ci.values():
        assert interval.low < interval.estimate < interval.high
        assert interval.contains(interval.estimate)


def test_a_label_never_seen_is_left_out_of_macro_f1():
    gold, pred = [0, 1, 1, 0] * 10, [0, 1, 0, 0] * 10  # label "c" never appears
    ci = bootstrap_intervals(gold, pred, LABELS)
    assert ci["macro_f1"].estimate == pytest.approx(f1_score(gold, pred, average="macro"))
    # each resample averages over its own labels present, so the interval holds the
    # estimate (counting "c" as a 0 would put every resample at 2/3 of it)
    assert ci["macro_f1"].low > 0.7 * ci["macro_f1"].estimate


def test_macro_f1_resamples_average_over_their_labels_present():
    from peftkit.metrics.intervals import scores_from_counts

    confusion = np.array([[[3, 1, 0], [0, 2, 0], [0, 0, 0]]])  # "c": no row, no prediction
    got = scores_from_counts(confusion)["macro_f1"][0]
    assert got == pytest.approx((6 / 7 + 4 / 5) / 2)


def test_interval_narrows_with_more_rows():
    widths = []
    for n in (100, 1000, 10000):
        gold = gold_labels(n)
        ci = bootstrap_intervals(gold, noisy(gold, 0.8, seed=2), LABELS)
        widths.append(ci["accuracy"].high - ci["accuracy"].low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] > 5 * widths[2]  # about sqrt(100) = 10x apart at the ends


def test_same_seed_same_interval_other_seed_other_interval():
    gold = gold_labels(200)
    pred = noisy(gold, 0.7, seed=3)
    one = bootstrap_intervals(gold, pred, LABELS, seed=5)
    two = bootstrap_intervals(gold, pred, LABELS, seed=5)
    other = bootstrap_intervals(gold, pred, LABELS, seed=6)
    assert one == two
    assert one["accuracy"] != other["accuracy"]


def test_paired_interval_excludes_zero_for_a_clearly_better_run():
    gold = gold_labels(1000)
    weak, strong = noisy(gold, 0.6, seed=4), noisy(gold, 0.9, seed=5)
    cmp = paired_comparison(gold, weak, strong, LABELS)
    for metric in ("accuracy", "macro_f1"):
        assert not cmp.difference[metric].contains(0.0)
        assert cmp.difference[metric].low > 0
        assert cmp.verdict(metric) == "B is better"
    assert cmp.mcnemar_p < 1e-6
    assert cmp.difference["accuracy"].estimate == pytest.approx(
        np.mean(strong == gold) - np.mean(weak == gold)
    )
    assert paired_comparison(gold, strong, weak, LABELS).verdict() == "A is better"


def test_paired_interval_holds_zero_for_identical_runs():
    gold = gold_labels(500)
    pred = noisy(gold, 0.75, seed=6)
    cmp = paired_comparison(gold, pred, pred.copy(), LABELS)
    for metric in ("accuracy", "macro_f1"):
        assert cmp.difference[metric].contains(0.0)
        assert cmp.verdict(metric) == "not distinguishable"
    assert (cmp.a_only, cmp.b_only, cmp.mcnemar_p) == (0, 0, 1.0)
    assert cmp.to_dict()["verdict"] == {
        "accuracy": "not distinguishable",
        "macro_f1": "not distinguishable",
    }


def test_paired_comparison_counts_the_discordant_rows():
    # 10 rows: A alone right on row 0, B alone right on rows 1-3, both right on 4-9
    gold = [0] * 10
    a = [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    b = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    cmp = paired_comparison(gold, a, b, ["x", "y"], resamples=200)
    assert (cmp.a_only, cmp.b_only) == (1, 3)
    assert cmp.mcnemar_p == pytest.approx(0.625)  # 2 * P(X <= 1), X ~ Bin(4, 1/2) = 10/16


@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (0, 0, 1.0),
        (1, 9, 22 / 1024),  # 2 * (1 + 10) / 2**10
        (0, 5, 2 / 32),  # 2 * 1 / 2**5
        (3, 3, 1.0),
        (2, 8, 2 * (1 + 10 + 45) / 1024),
    ],
)
def test_mcnemar_exact_known_values(a_only, b_only, expected):
    assert mcnemar_p(a_only, b_only) == pytest.approx(expected)
    assert mcnemar_p(b_only, a_only) == pytest.approx(expected)


def test_coverage_of_subsample_intervals():
    """The 95% interval of a 200-row subsample covers the population's accuracy in about 95%
    of repeats (200 repeats; a fair interval lands in [0.88, 0.99] almost surely)."""
    population = gold_labels(20000, seed=7)
    pred = noisy(population, 0.8, seed=8)
    truth = float(np.mean(population == pred))
    rng = np.random.default_rng(9)
    covered = 0
    repeats = 200
    for r in range(repeats):
        rows = rng.choice(population.size, size=200, replace=False)
        ci = bootstrap_intervals(population[rows], pred[rows], LABELS, resamples=500, seed=r)
        covered += ci["accuracy"].contains(truth)
    assert 0.88 <= covered / repeats <= 0.99


def test_ten_thousand_rows_under_a_second():
    gold = gold_labels(10000, n_labels=77)
    pred = noisy(gold, 0.9, seed=10, n_labels=77)
    labels = [f"l{i}" for i in range(77)]
    start = time.perf_counter()
    bootstrap_intervals(gold, pred, labels)
    assert time.perf_counter() - start < 1.0


def test_method_says_rows_resamples_and_seed():
    assert bootstrap_method(213) == (
        "bootstrap over 213 test rows, 1,000 resamples, seed 0, BCa 95%"
    )
    cmp = paired_comparison([0, 1] * 20, [0, 1] * 20, [1, 1] * 20, LABELS[:2])
    assert "percentile 95%" in cmp.method  # the difference of two runs: percentile


def test_jackknife_by_cells_is_leave_one_row_out():
    from peftkit.metrics.intervals import confusion_counts, jackknife_scores, scores_from_counts

    gold = gold_labels(60)
    pred = noisy(gold, 0.7, seed=3)
    values, weights = jackknife_scores(confusion_counts(gold * 3 + pred, 3))
    brute = {m: [] for m in values}
    for i in range(gold.size):
        keep = np.arange(gold.size) != i
        left = scores_from_counts(confusion_counts(gold[keep] * 3 + pred[keep], 3)[None])
        for m in brute:
            brute[m].append(left[m][0])
    for m in values:  # the same multiset: each cell's score, counted once per row in it
        assert weights.sum() == gold.size
        assert sorted(np.repeat(values[m], weights.astype(int))) == pytest.approx(sorted(brute[m]))


def test_bca_matches_scipy_on_accuracy():
    from scipy.stats import bootstrap

    gold = gold_labels(400)
    pred = noisy(gold, 0.85, seed=4)
    ours = bootstrap_intervals(gold, pred, LABELS, resamples=20000)["accuracy"]
    right = (gold == pred).astype(float)
    theirs = bootstrap((right,), np.mean, n_resamples=20000, method="BCa", random_state=0)
    ci = theirs.confidence_interval
    assert ours.low == pytest.approx(ci.low, abs=0.006)
    assert ours.high == pytest.approx(ci.high, abs=0.006)


def test_bca_corrects_macro_f1s_small_sample_bias():
    # 40 labels, 120 rows: a few rows a label, so resamples score macro-F1 below the
    # estimate; the percentile interval sits low, BCa moves it back up around the estimate
    from peftkit.metrics.intervals import percentile_interval, resampled_scores

    gold = gold_labels(120, n_labels=40)
    pred = noisy(gold, 0.8, seed=5, n_labels=40)
    labels = [f"l{i}" for i in range(40)]
    bca = bootstrap_intervals(gold, pred, labels)["macro_f1"]
    samples = resampled_scores([gold * 40 + pred], 40, 1000, 0)[0]["macro_f1"]
    plain = percentile_interval(bca.estimate, samples, 0.95)
    assert np.median(samples) < bca.estimate - 0.02
    assert bca.low > plain.low + 0.01 and bca.high > plain.high + 0.01
    assert bca.contains(bca.estimate)


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="resamples"):
        bootstrap_intervals([0, 1], [0, 1], ["x", "y"], resamples=1)
    with pytest.raises(DataError, match="confidence"):
        bootstrap_intervals([0, 1], [0, 1], ["x", "y"], confidence=95)
    with pytest.raises(DataError, match="y_true has 2 items but y_pred has 1"):
        paired_comparison([0, 1], [0, 1], [0], ["x", "y"])
