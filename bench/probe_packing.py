"""Probe (issue 4): prompts packed into rows against left-padded batches, same run.

    .venv/bin/python bench/probe_packing.py   # -> bench/results/probe_packing.json

Where the attention takes a 4-D mask, the causal scorer packs prompts end to end into the
rows of a forward (each prompt and its label tree a segment the mask keeps to itself), so
no token fed is padding but a row's end. The way it replaced, left-padded batches of
prompts sorted by length, stays for attentions that take no custom mask, and is timed here
by switching the mask off. With at most one multi-token label (these tasks: AG News has
" Sci/Tech" only) that way is the scorer as it was before packing, to the line.
smollm2-135m, float32; 125 test rows per task (the size of one of ``bench_zeroshot.py``'s
timed chunks), batch sizes 8-64, three rounds alternating the two ways; the median counts.
Both ways must give the same predictions. The speedup that matters is best against best:
each way at its own fastest batch size.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

from peftkit.data.load import load_data
from peftkit.models.base import load_base
from peftkit.prompting.scorers import causal, score_causal
from peftkit.prompting.templates import load_prompt

CASES = {  # name: data folder, prompt set, template
    "ag_news_instruct": ("ag_news", "news_ag", "classify-article"),
    "ag_news": ("ag_news", "news_ag", "topic-question"),
    "sst2": ("sst2", "sentiment", "lm-eval-sst2"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=125)
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 rows, batch 8, one round")
    ns = parser.parse_args()
    rows, batches, rounds = ns.rows, [int(b) for b in ns.batches.split(",")], ns.rounds
    if ns.quick:
        rows, batches, rounds = 32, [8], 1
    env = environment()
    base = load_base("smollm2-135m")
    packed = causal._takes_custom_masks
    out = []
    for name, (folder, prompts, template) in CASES.items():
        data = load_data(DATA / folder)
        texts = data.split("test").texts[:rows]
        prompt = load_prompt(prompts, template)
        times: dict[tuple[str, int], list[float]] = {}
        scores = {}
        for _ in range(rounds):
            for b in batches:
                for way in ("packed", "padded"):
                    causal._takes_custom_masks = packed if way == "packed" else (lambda m: False)
                    t0 = time.perf_counter()
                    got = score_causal(
                        base.model, base.tokenizer, prompt, texts, labels=data.labels, batch_size=b
                    )
                    times.setdefault((way, b), []).append(time.perf_counter() - t0)
                    scores[way] = got.logprobs
        causal._takes_custom_masks = packed
        speed = {k: rows / statistics.median(v) for k, v in times.items()}
        best = {w: max(batches, key=lambda b, w=w: speed[(w, b)]) for w in ("packed", "padded")}
        row = {
            "task": name,
            "template": template,
            "rows": rows,
            "examples_per_s": {f"{w} b{b}": round(speed[(w, b)], 3) for w, b in speed},
            "best": {
                w: {"batch_size": b, "examples_per_s": speed[(w, b)]} for w, b in best.items()
            },
            "speedup_best_vs_best": speed[("packed", best["packed"])]
            / speed[("padded", best["padded"])],
            "speedup_per_batch": {b: speed[("packed", b)] / speed[("padded", b)] for b in batches},
            "same_predictions": bool(
                (scores["packed"].argmax(1) == scores["padded"].argmax(1)).all()
            ),
            "max_abs_logprob_diff": float(np.abs(scores["packed"] - scores["padded"]).max()),
        }
        out.append(row)
        print(f"[{name}] best packed b{best['packed']} / padded b{best['padded']}: "
              f"{row['speedup_best_vs_best']:.3f}x", flush=True)  # fmt: skip
    print(
        table(
            [
                [
                    r["task"],
                    *(f"{r['speedup_per_batch'][b]:.2f}x" for b in batches),
                    f"{r['speedup_best_vs_best']:.2f}x",
                    r["same_predictions"],
                ]
                for r in out
            ],
            ["task", *(f"b{b}" for b in batches), "best vs best", "same preds"],
        )
    )
    payload = {
        "probe": "probe_packing",
        "issue": 4,
        "model": "smollm2-135m (float32)",
        "environment": env,
        "rounds": rounds,
        "batch_sizes": batches,
        "rows": out,
    }
    print("results:", write_results("probe_packing", payload, quick=ns.quick))


if __name__ == "__main__":
    main()
