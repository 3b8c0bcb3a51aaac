"""Calibration across templates: SST-2, AG News, TREC with SmolLM2-135M (issue 4).

    .venv/bin/python bench/bench_calibration.py          # -> bench/results/bench_calibration.json
    .venv/bin/python bench/bench_calibration.py --quick  # 24 rows per task

Every causal template of the shipped family (``prompts/sentiment.yaml``, ``news_ag.yaml``,
``question_type.yaml``) scores the test rows once (sum of the label words'
log-probabilities, the shared-prefix scorer); from those same scores:

- ``raw``: softmax over the labels;
- ``contextual``: contextual calibration (Zhao et al. 2021), the mean probabilities of the
  content-free inputs "N/A", "" and "[MASK]" under the same template divided out;
- ``pmi``: domain-conditional PMI (Holtzman et al. 2021), log P(words | prompt) -
  log P(words | the template's domain prompt), softmaxed.

Per template: accuracy, macro-F1 and ECE (15 bins) for each; per task: mean and std across
templates. The goal: calibration raises the mean accuracy and narrows the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

TASKS = {  # key -> (data folder, prompt family, test rows used; None = all)
    "sst2": ("sst2", "sentiment", None),
    "ag_news": ("ag_news", "news_ag", 500),
    "trec": ("trec", "question_type", None),
}
METHODS = ("raw", "contextual", "pmi")


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tasks", default=",".join(TASKS))
    ns = parser.parse_args()

    from peftkit.data.load import load_data
    from peftkit.metrics.report import compute_metrics, expected_calibration_error
    from peftkit.models.base import load_base
    from peftkit.prompting.calibration import content_free_probs, contextual_calibration
    from peftkit.prompting.scorers import domain_logprobs, score_causal
    from peftkit.prompting.templates import load_prompt_set

    env = environment()
    base = load_base("smollm2-135m")
    model, tok = base.model, base.tokenizer
    rows_out, summary = [], {}
    for key in ns.tasks.split(","):
        folder, family, limit = TASKS[key]
        data = load_data(DATA / folder)
        test = data.split("test")
        n = 24 if ns.quick else (len(test) if limit is None else min(limit, len(test)))
        test = test.subset(range(n))
        gold = list(test.labels)
        per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
        for prompt in load_prompt_set(family):
            if prompt.template.uses_mask:
                continue
            t0 = time.perf_counter()
            scores = score_causal(
                model, tok, prompt, list(test.texts), labels=data.labels, batch_size=ns.batch_size
            )
            seconds = time.perf_counter() - t0

            def cf_score(texts, prompt=prompt, labels=data.labels):
                return score_causal(model, tok, prompt, texts, labels=labels).probs

            probs = {
                "raw": scores.probs,
                "contextual": contextual_calibration(scores.probs, content_free_probs(cf_score)),
                "pmi": softmax(
                    scores.logprobs - domain_logprobs(model, tok, prompt, labels=data.labels)
                ),
            }
            row = {"task": key, "template": prompt.name, "rows": n, "seconds": seconds}
            for m, p in probs.items():
                met = compute_metrics(gold, p.argmax(1).tolist(), data.labels)
                row[m] = {
                    "accuracy": met["accuracy"],
                    "macro_f1": met["macro_f1"],
                    "ece": expected_calibration_error(p, gold),
                }
                per_method[m].append(row[m])
            rows_out.append(row)
            print(
                f"[{key}] {prompt.name}: "
                + ", ".join(f"{m} {100 * row[m]['accuracy']:.1f}%" for m in METHODS)
                + f" ({seconds:.0f} s)",
                flush=True,
            )
        summary[key] = {
            m: {
                metric: {
                    "mean": statistics.fmean(r[metric] for r in per_method[m]),
                    "std": statistics.stdev(r[metric] for r in per_method[m])
                    if len(per_method[m]) > 1
                    else 0.0,
                }
                for metric in ("accuracy", "macro_f1", "ece")
            }
            for m in METHODS
        }
    goals = {
        key: {
            m: {
                "raises_mean_accuracy": s[m]["accuracy"]["mean"] > s["raw"]["accuracy"]["mean"],
                "narrows_spread": s[m]["accuracy"]["std"] < s["raw"]["accuracy"]["std"],
            }
            for m in ("contextual", "pmi")
        }
        for key, s in summary.items()
    }
    payload = {
        "benchmark": "bench_calibration",
        "issue": 4,
        "model": "smollm2-135m (packaged, fp32)",
        "environment": env,
        "rows": rows_out,
        "summary": summary,
        "goals": goals,
    }
    out = write_results("bench_calibration", payload, quick=ns.quick)

    def cell(d: dict) -> str:
        return f"{100 * d['accuracy']:.1f} / {100 * d['macro_f1']:.1f} / {d['ece']:.3f}"

    lines = [[r["task"], r["template"], *(cell(r[m]) for m in METHODS)] for r in rows_out]
    for key, s in summary.items():
        lines.append(
            [key, "mean ± std acc"]
            + [f"{100 * s[m]['accuracy']['mean']:.1f} ± {100 * s[m]['accuracy']['std']:.1f}"
               for m in METHODS]
        )  # fmt: skip
    print(table(lines, ["task", "template", *(f"{m}: acc / F1 / ECE" for m in METHODS)]))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
