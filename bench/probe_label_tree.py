"""Probe (issue 4): the label tree against continuing the prompt's cache, same run.

    .venv/bin/python bench/probe_label_tree.py   # -> bench/results/probe_label_tree.json

With several multi-token labels the causal scorer feeds their words after each prompt as a
prefix tree in the prompt's one forward (a 4-D attention mask). Before, the longest label
rode along and the others continued the prompt's cache in a second, batched forward; that
way stays for attentions that take no custom mask, and is timed here by switching the tree
off. smollm2-135m, batch 8: Banking77 (77 intents, all several tokens, template
``customer-intent``, every 32nd test row) and SST-2 ``did-they-like-it`` (two labels of
several tokens, the first 192 test rows). Three runs each way, alternating; the median
counts. Both ways must give the same predictions. Memory: each way once more in a fresh
process, its peak resident set after scoring less its peak after loading the model.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, proc_status, write_results  # noqa: E402

from peftkit.data.load import load_data
from peftkit.models.base import load_base
from peftkit.prompting.scorers import causal, score_causal
from peftkit.prompting.templates import load_prompt

CASES = [  # data folder, prompt set, template, rows (every `stride`-th test row)
    ("banking77", "intent_banking", "customer-intent", 32),
    ("sst2", "sentiment", "did-they-like-it", 1),
]


def texts_of(data, stride: int) -> list[str]:
    test = data.split("test")
    texts = [test.texts[i] for i in range(0, len(test), stride)]
    return texts[:192] if stride == 1 else texts


def peak_mb() -> float:
    """VmHWM: unlike ``ru_maxrss``, which a child inherits from its parent, it starts anew."""
    return proc_status()["peak_rss"] / 2**20


def memory_one(case: int, way: str) -> None:
    """In a fresh process: score one case one way, print the peak resident growth (MB)."""
    folder, prompts, template, stride = CASES[case]
    base = load_base("smollm2-135m")
    data = load_data(DATA / folder)
    if way == "cache":
        causal._takes_custom_masks = lambda model: False
    prompt, texts = load_prompt(prompts, template), texts_of(data, stride)
    before = peak_mb()
    score_causal(base.model, base.tokenizer, prompt, texts, labels=data.labels, batch_size=8)
    print(peak_mb() - before)


def memory(case: int, way: str) -> float:
    command = [sys.executable, __file__, "--memory", str(case), way]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    base = load_base("smollm2-135m")
    tree_on = causal._takes_custom_masks
    rows = []
    for case, (folder, prompts, template, stride) in enumerate(CASES):
        data = load_data(DATA / folder)
        texts = texts_of(data, stride)
        prompt = load_prompt(prompts, template)
        seconds: dict[str, list[float]] = {"tree": [], "cache": []}
        scores = {}
        for rep in range(3):
            for way in ("tree", "cache") if rep % 2 == 0 else ("cache", "tree"):
                causal._takes_custom_masks = tree_on if way == "tree" else (lambda model: False)
                t0 = time.perf_counter()
                out = score_causal(
                    base.model, base.tokenizer, prompt, texts, labels=data.labels, batch_size=8
                )
                seconds[way].append(time.perf_counter() - t0)
                scores[way] = out.logprobs
        causal._takes_custom_masks = tree_on
        tree_s, cache_s = (statistics.median(seconds[w]) for w in ("tree", "cache"))
        row = {
            "task": f"{folder}/{template}",
            "rows": len(texts),
            "seconds": seconds,
            "tree_examples_per_s": len(texts) / tree_s,
            "cache_examples_per_s": len(texts) / cache_s,
            "speedup": cache_s / tree_s,
            "max_abs_logprob_diff": float(np.abs(scores["tree"] - scores["cache"]).max()),
            "same_predictions": float(
                (scores["tree"].argmax(1) == scores["cache"].argmax(1)).mean()
            ),
            "peak_rss_growth_mb": {way: memory(case, way) for way in ("tree", "cache")},
        }
        print(row, flush=True)
        rows.append(row)
    path = write_results(
        "probe_label_tree",
        {"probe": "probe_label_tree", "issue": 4, "environment": environment(), "rows": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        memory_one(int(sys.argv[2]), sys.argv[3])
    else:
        main()
