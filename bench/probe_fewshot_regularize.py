"""Validation probe (issue 4): does regularising the few-shot LoRA narrow its spread?

    .venv/bin/python bench/probe_fewshot_regularize.py [--settings ag_news:8]
        # -> bench/results/val_fewshot_regularize.json

Per sample (seeds 0-4), the prototype head (prior 2.0, descriptions), then LoRA from it (40
epochs, lr 3e-3, batch 16, max_length 64, training seed = sample seed) as
``bench_fewshot``'s ``peftkit-prototypes-lora``, with:

- ``lora``: as the benchmark (cross-entropy on the k·C rows);
- ``ls0.1``, ``ls0.3``: label smoothing 0.1 / 0.3 (``TrainConfig.label_smoothing``);
- ``desc-rows``: each label's description sentences added to the training rows.

Each also averaged with the prototype head (``+protos``). Validation split (AG News: first
1,000 rows).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, RESULTS  # noqa: E402
from bench_fewshot import TASKS  # noqa: E402
from probe_fewshot_ensemble import probs_of  # noqa: E402

from peftkit.adapters import load_preset
from peftkit.artifacts import release
from peftkit.base import load_base
from peftkit.data import Split, TextDataset, few_shot, load_data
from peftkit.fewshot import prototype_head
from peftkit.prompts import load_prompt_set
from peftkit.scorers import embed_texts
from peftkit.train import TrainConfig, train

VARIANTS = {"lora": 0.0, "ls0.1": 0.1, "ls0.3": 0.3, "desc-rows": 0.0}

parser = argparse.ArgumentParser()
parser.add_argument("--settings", default="ag_news:8")
parser.add_argument("--variants", default=",".join(VARIANTS))
parser.add_argument("--prior", type=float, default=2.0)
ns = parser.parse_args()

base = load_base("minilm")
out: dict = {"prior": ns.prior, "split": "validation"}


def fine_tune(support, labels, head, seed, smoothing):
    config = TrainConfig(
        epochs=40, batch_size=16, learning_rate=3e-3, max_length=64, patience=None,
        eval_every=10**6, seed=seed, progress=False, warmup_ratio=0.1,
        label_smoothing=smoothing,
    )  # fmt: skip
    ds = TextDataset("few-shot", tuple(labels), {"train": support, "validation": support})
    with tempfile.TemporaryDirectory() as run_dir:
        return train(base, load_preset("lora"), ds, config, run_dir, head_init=head).model.eval()


for setting in ns.settings.split(","):
    key, k = setting.split(":")
    k = int(k)
    folder, limit, family, _ = TASKS[key]
    data = load_data(DATA / folder)
    val = data.split("validation")
    val = val.subset(range(len(val) if limit is None else min(limit, len(val))))
    gold = np.asarray(val.labels)
    texts = list(val.texts)
    prompts = load_prompt_set(family)
    described = prompts.describe()
    xv = torch.as_tensor(embed_texts(base.model, base.tokenizer, texts, batch_size=64))
    res: dict[str, list[float]] = {}

    def add(name, p, res=res, gold=gold):
        res.setdefault(name, []).append(float((p.argmax(1) == gold).mean()))

    for seed in range(5):
        t0 = time.perf_counter()
        support = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
        head = prototype_head(base, support, data.labels, prompts, prior=ns.prior)
        with torch.no_grad():
            p_proto = torch.softmax(head(xv), -1).numpy()
        add("protos", p_proto)
        for name in ns.variants.split(","):
            rows = support
            if name == "desc-rows":
                extra = [
                    (p, i) for i, lab in enumerate(data.labels) for p in described.phrases(lab)
                ]
                rows = Split(support.texts + tuple(t for t, _ in extra),
                             support.labels + tuple(i for _, i in extra))  # fmt: skip
            model = fine_tune(rows, data.labels, head, seed, VARIANTS[name])
            p = probs_of(model, base.tokenizer, texts)
            release(model)
            add(name, p)
            add(f"{name}+protos", (p + p_proto) / 2)
        print(setting, seed, f"{time.perf_counter() - t0:.0f}s",
              {m: round(100 * v[-1], 1) for m, v in res.items()}, flush=True)  # fmt: skip
    out[setting] = {
        m: {"mean": 100 * statistics.fmean(v), "std": 100 * statistics.stdev(v), "runs": v}
        for m, v in res.items()
    }
    for m, s in out[setting].items():
        print(f"  {setting} {m}: {s['mean']:.1f} ± {s['std']:.1f}", flush=True)
    (RESULTS / "val_fewshot_regularize.json").write_text(json.dumps(out, indent=1))
