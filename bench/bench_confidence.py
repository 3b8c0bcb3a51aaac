"""Calibrated adapters that know when not to answer: temperature scaling, the reject option
and an open-set test, on MiniLM LoRA adapters.

    .venv/bin/python bench/bench_confidence.py            # -> bench/results/bench_confidence.json
    .venv/bin/python bench/bench_confidence.py --quick    # smoke run (64 rows, 5 steps)
    .venv/bin/python bench/bench_confidence.py --epochs 3 # -> bench_confidence_3epochs.json

- **Calibration** (SST-2, AG News, TREC, Banking77 from /work/shared/data): a rank-8 LoRA
  trained for ``--steps`` steps (or ``--epochs`` passes over the kept training rows, as a
  recipe trains: 3 epochs by default; a model trained that long is the over-confident one
  temperature scaling is for, where 300 steps is under one epoch); one temperature fit on the validation split (NLL), then on
  the test split ECE (15 bins) and NLL before and after, against the uncalibrated softmax
  of the same model (the baseline: what the adapter gives without peftkit's step). Goal:
  ECE after at most half of before, accuracy unchanged.
- **Reject option** (Banking77): the threshold chosen on validation for a precision target
  (``--precision``, default 0.95); the precision and coverage it gives on test, and the test
  risk-coverage curve (AURC). Goal: test precision within 2 points of the target.
- **Open set** (Banking77): a seeded 25% of the intents held out as unseen; an adapter
  trained on the rest, calibrated and thresholded on its validation split as above; on
  test, the share of unseen-intent queries rejected, the known-intent coverage and
  precision, and the AUROC of the top probability separating known from unseen queries.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

TASKS = {"sst2": "sst2", "agnews": "ag_news", "trec": "trec", "banking77": "banking77"}
MAX_LENGTH = 64
BATCH_SIZE = 16
UNSEEN_SHARE = 0.25


def _train(base: Any, data: Any, steps: int, seed: int, work: Path, extra: Any = None):
    """Train one adapter; its validation and test probabilities (softmax, as trained), and
    those of ``extra`` (a Split) when given."""
    from peftkit import TrainConfig, load_preset, train
    from peftkit.run.confidence import split_probs

    config = TrainConfig(
        max_steps=steps, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, seed=seed, progress=False,
        patience=None, checkpoint_every=100_000, eval_every=max(steps, 1),
    )  # fmt: skip
    t0 = time.perf_counter()
    with train(base, load_preset("lora"), data, config, work) as result:
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        val = split_probs(base, result.model, data.split("validation"), 64)
        val_s = time.perf_counter() - t1
        test = np.asarray(result.test_probs, dtype=np.float64)
        more = None if extra is None else split_probs(base, result.model, extra, 64)
    return {"val": val, "test": test, "extra": more, "train_s": train_s, "val_forward_s": val_s}


def calibration_row(name: str, data: Any, probs: dict[str, Any]) -> dict[str, Any]:
    from peftkit.metrics.calibration import (
        apply_temperature,
        expected_calibration_error,
        fit_temperature,
        negative_log_likelihood,
    )

    val_gold = np.asarray(data.split("validation").labels)
    gold = np.asarray(data.split("test").labels)
    t0 = time.perf_counter()
    temperature = fit_temperature(probs["val"], val_gold)
    fit_s = time.perf_counter() - t0
    raw, cal = probs["test"], apply_temperature(probs["test"], temperature)
    before, after = expected_calibration_error(raw, gold), expected_calibration_error(cal, gold)
    floor = ece_floor(cal)
    return {
        "task": name,
        "labels": len(data.labels),
        "validation_rows": len(val_gold),
        "test_rows": len(gold),
        "temperature": round(temperature, 4),
        "accuracy_before": round(float((raw.argmax(1) == gold).mean()), 4),
        "accuracy_after": round(float((cal.argmax(1) == gold).mean()), 4),
        "ece_before": round(before, 4),
        "ece_after": round(after, 4),
        "ece_ratio": round(after / before, 3) if before > 0 else None,
        "ece_floor": round(floor, 4),
        "goal_met": bool(after <= before / 2),
        "nll_before": round(negative_log_likelihood(raw, gold), 4),
        "nll_after": round(negative_log_likelihood(cal, gold), 4),
        "train_s": round(probs["train_s"], 1),
        "calibration_s": round(probs["val_forward_s"] + fit_s, 3),
        "fit_ms": round(fit_s * 1000, 2),
    }


def ece_floor(probs: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these confidences shows on this many rows:
    labels drawn from ``probs`` themselves, averaged over ``draws``. An ECE near it is as
    low as this test split can measure."""
    from peftkit.metrics.calibration import expected_calibration_error

    rng = np.random.default_rng(seed)
    cumulative = probs.cumsum(1)
    out = []
    for _ in range(draws):
        u = rng.random((len(probs), 1))
        labels = np.minimum((u > cumulative).sum(1), probs.shape[1] - 1)
        out.append(expected_calibration_error(probs, labels))
    return float(np.mean(out))


def _calibrated(data: Any, probs: dict[str, Any]):
    """(temperature, validation gold, calibrated validation, test gold, calibrated test)."""
    from peftkit.metrics.calibration import apply_temperature, fit_temperature

    val_gold = np.asarray(data.split("validation").labels)
    temperature = fit_temperature(probs["val"], val_gold)
    return (
        temperature,
        val_gold,
        apply_temperature(probs["val"], temperature),
        np.asarray(data.split("test").labels),
        apply_temperature(probs["test"], temperature),
    )


def _choose(val: np.ndarray, val_gold: np.ndarray, precision: float) -> Any:
    from peftkit.errors import ConfigError
    from peftkit.metrics.calibration import choose_threshold

    try:
        return choose_threshold(val, val_gold, precision=precision)
    except ConfigError as exc:
        return str(exc)


def _answered(test: np.ndarray, gold: np.ndarray, threshold: float) -> dict[str, float]:
    answered = test.max(1) >= threshold
    correct = test.argmax(1) == gold
    precision = float(correct[answered].mean()) if answered.any() else 1.0
    return {"coverage": round(float(answered.mean()), 4), "precision": round(precision, 4)}


def reject_row(data: Any, probs: dict[str, Any], precision: float) -> dict[str, Any]:
    from peftkit.metrics.calibration import risk_coverage

    _, val_gold, val, gold, test = _calibrated(data, probs)
    curve = risk_coverage(test, gold, max_points=50)
    choice = _choose(val, val_gold, precision)
    if isinstance(choice, str):
        return {"target_precision": precision, "error": choice, "test_curve": curve}
    on_test = _answered(test, gold, choice.threshold)
    return {
        "target_precision": precision,
        "threshold": round(choice.threshold, 4),
        "validation": choice.to_dict(),
        "test_coverage": on_test["coverage"],
        "test_precision": on_test["precision"],
        "test_accuracy_all": round(float((test.argmax(1) == gold).mean()), 4),
        "gap_points": round(100 * (on_test["precision"] - precision), 2),
        "goal_met": bool(abs(on_test["precision"] - precision) <= 0.02),
        "test_curve": curve,
    }


def open_set(base: Any, data: Any, steps: int, seed: int, precision: float, work: Path):
    """Hold out a seeded share of the intents; train on the rest; count unseen rejections."""
    from sklearn.metrics import roc_auc_score

    from peftkit.data.load import Split, TextDataset
    from peftkit.metrics.calibration import apply_temperature

    labels = list(data.labels)
    unseen = set(random.Random(seed).sample(labels, round(UNSEEN_SHARE * len(labels))))
    known = [lab for lab in labels if lab not in unseen]
    new_id = {labels.index(lab): i for i, lab in enumerate(known)}

    def known_rows(split: Split) -> Split:
        keep = [i for i, y in enumerate(split.labels) if y in new_id]
        return Split(
            tuple(split.texts[i] for i in keep), tuple(new_id[split.labels[i]] for i in keep)
        )

    test = data.split("test")
    held = [t for t, y in zip(test.texts, test.labels, strict=True) if y not in new_id]
    subset = TextDataset(
        f"{data.name}-known",
        tuple(known),
        {k: known_rows(data.split(k)) for k in ("train", "validation", "test")},
    )
    extra = Split(tuple(held), tuple(0 for _ in held))  # labels unused: scored only
    probs = _train(base, subset, steps, seed, work, extra=extra)
    temperature, val_gold, val, gold, test_known = _calibrated(subset, probs)
    test_unseen = apply_temperature(probs["extra"], temperature)
    scores = np.r_[test_known.max(1), test_unseen.max(1)]
    is_known = np.r_[np.ones(len(gold)), np.zeros(len(held))]
    out: dict[str, Any] = {
        "unseen_intents": sorted(unseen),
        "known_labels": len(known),
        "known_test_rows": len(gold),
        "unseen_test_rows": len(held),
        "temperature": round(temperature, 4),
        "known_accuracy": round(float((test_known.argmax(1) == gold).mean()), 4),
        "auroc_known_vs_unseen": round(float(roc_auc_score(is_known, scores)), 4),
        "target_precision": precision,
    }
    choice = _choose(val, val_gold, precision)
    if isinstance(choice, str):
        return {**out, "error": choice}
    on_known = _answered(test_known, gold, choice.threshold)
    rejected = float((test_unseen.max(1) < choice.threshold).mean()) if held else 0.0
    return {
        **out,
        "threshold": round(choice.threshold, 4),
        "unseen_rejected": round(rejected, 4),
        "known_coverage": on_known["coverage"],
        "known_precision": on_known["precision"],
        "train_s": round(probs["train_s"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 rows, 5 steps")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train each adapter this many passes over its kept training rows "
        "(overrides --steps; results go to bench_confidence_<N>epochs.json)",
    )
    parser.add_argument("--max-rows", type=int, default=4000, help="rows kept per split")
    parser.add_argument("--precision", type=float, default=0.95, help="the reject target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="training folders (a new temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-confidence-") as tmp:
        return run(args, args.work or Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    from peftkit import load_base, load_data

    steps, max_rows = (5, 64) if args.quick else (args.steps, args.max_rows)
    base = load_base("minilm")
    epochs = None if args.quick else args.epochs
    rows, banking, open_steps = [], None, steps
    for name, folder in TASKS.items():
        data = load_data(DATA / folder, max_rows=max_rows, seed=args.seed)
        if epochs is not None:
            steps = math.ceil(epochs * len(data.split("train").texts) / BATCH_SIZE)
            if name == "banking77":
                open_steps = math.ceil(steps * (1 - UNSEEN_SHARE))
        probs = _train(base, data, steps, args.seed, work / name)
        rows.append(calibration_row(name, data, probs) | {"steps": steps})
        print(f"{name}: ECE {rows[-1]['ece_before']} -> {rows[-1]['ece_after']}", flush=True)
        if name == "banking77":
            banking = (data, probs)
    assert banking is not None
    reject = reject_row(*banking, args.precision)
    opened = open_set(base, banking[0], open_steps, args.seed, args.precision, work / "open")
    print(table(
        [[r["task"], r["labels"], r["temperature"], f"{r['accuracy_before']} -> "
          f"{r['accuracy_after']}", f"{r['ece_before']} -> {r['ece_after']}", r["ece_ratio"],
          r["ece_floor"]] for r in rows],
        ["task", "labels", "T", "accuracy", "ECE (test)", "after/before", "floor"],
    ))  # fmt: skip
    print(f"reject (banking77, precision >= {args.precision}): "
          + ", ".join(f"{k} {v}" for k, v in reject.items() if k != "test_curve"))  # fmt: skip
    print("open set: " + ", ".join(
        f"{k} {v}" for k, v in opened.items() if k != "unseen_intents"))  # fmt: skip
    payload = {
        "benchmark": "bench_confidence",
        "settings": {
            "model": "minilm",
            "adapter": "lora (preset)",
            "steps": "per task (calibration rows)" if epochs is not None else steps,
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH,
            "max_rows_per_split": max_rows,
            "seed": args.seed,
            "ece_bins": 15,
            "unseen_share": UNSEEN_SHARE,
            "quick": args.quick,
        },  # fmt: skip
        "baseline": "the same adapter's uncalibrated softmax (temperature 1, no threshold)",
        "calibration": rows,
        "reject_banking77": reject,
        "open_set_banking77": opened,
        "environment": environment(),
    }
    name = "bench_confidence" if epochs is None else f"bench_confidence_{epochs:g}epochs"
    path = write_results(name, payload, quick=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
