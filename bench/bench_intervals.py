"""Bootstrap intervals: what they cost, and whether a 95% interval covers the truth 95% of the time.

    .venv/bin/python bench/bench_intervals.py          # -> bench/results/bench_intervals.json
    .venv/bin/python bench/bench_intervals.py --quick  # fewer repeats, smoke run

Pools of real predictions: a rank-8 MiniLM LoRA adapter's test-split predictions on AG News
(7,600 rows, 4 labels) and Banking77 (3,080 rows, 77 labels), the adapters of
``bench_serve.py`` (trained once and kept in ``--work``).

- **Cost**, side by side in one run on 10,000 rows (drawn from the AG News pool):
  ``peftkit.metrics.intervals.bootstrap_intervals`` (accuracy and macro-F1 together, 1,000
  resamples, BCa) against ``scipy.stats.bootstrap`` (BCa, its default; 1,000 resamples) for
  accuracy alone (vectorised) and for macro-F1 (scikit-learn's ``f1_score`` per resample
  and per jackknife row, what a user would write; its percentile method timed too). Goal:
  under 1 s for 10,000 rows.
- **Coverage**: the pool's accuracy and macro-F1 are the truth; ``--repeats`` times, draw a
  test set of ``n`` rows from the pool (seeded), compute the 95%
  intervals on it, and count how often they contain the truth. About 95% is right; far
  below means the intervals are too narrow. Rows are drawn with replacement, so each test
  set is an independent sample of the pool's distribution (drawn without replacement, a
  test set that is a large share of its pool makes every interval too wide).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import environment, table, write_results  # noqa: E402

POOLS = {"agnews": "ag_news", "banking77": "banking77"}


def pools(work: Path) -> dict:
    """Each pool's gold and predicted label ids, and its labels (predictions cached)."""
    import json

    from bench_serve import build_registry, source

    cache = work / "interval_pools.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    build_registry(work, steps=30)
    from peftkit import AdaptedModel, Registry, load_base, load_data

    base = load_base("minilm")
    out = {}
    registry = Registry(work / "registry", read_only=True)
    with AdaptedModel(base, registry) as model:
        for adapter, data_name in POOLS.items():
            data = load_data(source(data_name))
            test = data.split("test")
            labels = list(registry.get(adapter).labels)
            # the adapter's label ids (it was trained on a sample: map by name)
            ids = {name: i for i, name in enumerate(labels)}
            keep = [i for i, y in enumerate(test.labels) if data.labels[y] in ids]
            probs = model.predict_proba([test.texts[i] for i in keep], adapter)
            out[adapter] = {
                "labels": labels,
                "gold": [ids[data.labels[test.labels[i]]] for i in keep],
                "pred": [int(k) for k in probs.argmax(1)],
                "test_rows_without_a_trained_label": len(test.labels) - len(keep),
            }
    cache.write_text(json.dumps(out))
    return out


def truth(gold, pred, labels) -> dict[str, float]:
    from peftkit.metrics.intervals import confusion_counts, scores_from_counts

    n = len(labels)
    scores = scores_from_counts(confusion_counts(np.asarray(gold) * n + pred, n)[None])
    return {k: float(v[0]) for k, v in scores.items()}


def cost(pool: dict, rows: int, repeats: int) -> dict:
    from scipy.stats import bootstrap
    from sklearn.metrics import f1_score

    from peftkit.metrics.intervals import bootstrap_intervals

    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(pool["gold"]), rows)
    gold = np.asarray(pool["gold"])[idx]
    pred = np.asarray(pool["pred"])[idx]
    labels = pool["labels"]
    n_labels = len(labels)

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def scipy_accuracy():
        bootstrap(((gold == pred).astype(float),), np.mean, n_resamples=1000,
                  method="BCa", random_state=0)  # fmt: skip

    def scipy_macro_f1(method: str):
        def f1(i):
            i = i.astype(int)
            return f1_score(gold[i], pred[i], average="macro", zero_division=0)

        bootstrap((np.arange(rows),), f1, n_resamples=1000, method=method,
                  vectorized=False, random_state=0)  # fmt: skip

    peftkit_s = best_of(lambda: bootstrap_intervals(gold, pred, labels))
    acc_s = best_of(scipy_accuracy)
    f1_pct_s = best_of(lambda: scipy_macro_f1("percentile"))
    t0 = time.perf_counter()  # its jackknife calls f1_score once per row: timed once
    scipy_macro_f1("BCa")
    f1_s = time.perf_counter() - t0
    return {
        "rows": rows,
        "labels": n_labels,
        "resamples": 1000,
        "method": "BCa (peftkit and scipy.stats.bootstrap's default)",
        "peftkit_accuracy_and_macro_f1_s": peftkit_s,
        "scipy_accuracy_s": acc_s,
        "scipy_sklearn_macro_f1_s": f1_s,
        "scipy_sklearn_macro_f1_percentile_s": f1_pct_s,
        "scipy_both_s": acc_s + f1_s,
        "scipy_both_over_peftkit": (acc_s + f1_s) / peftkit_s,
        "scipy_percentile_both_over_peftkit": (acc_s + f1_pct_s) / peftkit_s,
        "timing": f"best of {repeats} (scipy's BCa macro-F1: one run)",
    }


def coverage(pool: dict, n: int, repeats: int, seed: int = 0) -> dict:
    from peftkit.metrics.intervals import bootstrap_intervals

    gold, pred = np.asarray(pool["gold"]), np.asarray(pool["pred"])
    true = truth(gold, pred, pool["labels"])
    rng = np.random.default_rng(seed)
    hits = {k: 0 for k in true}
    widths: dict[str, list[float]] = {k: [] for k in true}
    for r in range(repeats):
        idx = rng.integers(0, len(gold), n)  # iid draws: the pool is the population
        ci = bootstrap_intervals(gold[idx], pred[idx], pool["labels"], seed=r)
        for k in true:
            hits[k] += int(ci[k].low <= true[k] <= ci[k].high)
            widths[k].append(ci[k].high - ci[k].low)
    return {
        "test_rows": n,
        "repeats": repeats,
        "truth": true,
        "coverage": {k: hits[k] / repeats for k in true},
        "mean_width": {k: float(np.mean(widths[k])) for k in true},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peftkit-bench-serve")
    )
    parser.add_argument("--repeats", type=int, default=500, help="subsamples per coverage row")
    parser.add_argument("--sizes", default="200,1000", help="test-set sizes for coverage")
    args = parser.parse_args()
    repeats = 40 if args.quick else args.repeats
    sizes = [int(s) for s in args.sizes.split(",")]
    env = environment()
    data = pools(Path(args.work))
    print("cost on 10,000 rows (AG News predictions), 1,000 resamples", flush=True)
    costs = cost(data["agnews"], 10_000, repeats=2 if args.quick else 5)
    print(
        f"  peftkit (accuracy + macro-F1): {costs['peftkit_accuracy_and_macro_f1_s']:.3f} s;"
        f" scipy accuracy {costs['scipy_accuracy_s']:.3f} s + scipy/sklearn macro-F1 "
        f"{costs['scipy_sklearn_macro_f1_s']:.3f} s = {costs['scipy_both_over_peftkit']:.1f}x"
    )
    rows, cover = [], []
    for name, pool in data.items():
        for n in sizes:
            c = coverage(pool, n, repeats)
            c["pool"] = name
            c["pool_rows"] = len(pool["gold"])
            cover.append(c)
            for k in c["coverage"]:
                rows.append([name, len(pool["labels"]), n, k, f"{c['truth'][k]:.4f}",
                             f"{c['coverage'][k]:.3f}", f"{c['mean_width'][k]:.4f}"])  # fmt: skip
    print(table(rows, ["pool", "labels", "test rows", "metric", "truth", "coverage", "width"]))
    payload = {
        "environment": env,
        "cost": costs,
        "coverage": cover,
        "goals": {
            "under_1s_for_10k_rows": costs["peftkit_accuracy_and_macro_f1_s"] < 1.0,
            "coverage_accuracy": {
                f"{c['pool']}/{c['test_rows']}": c["coverage"]["accuracy"] for c in cover
            },  # fmt: skip
        },
    }
    path = write_results("bench_intervals", payload, quick=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
