"""Validation probe (issue 4): peftkit's own contrastive fine-tuning of the body
(``training.objective: contrastive``, SetFit's pair recipe) under the prototype head.

    .venv/bin/python bench/probe_fewshot_contrastive.py ag_news 8 full:2e-5 lora:1e-3
        # -> bench/results/val_fewshot_contrastive.json

Per sample (seeds 0-4, ``bench_fewshot``'s samples) and per ``preset:learning_rate``:
``train(base, preset, support, TrainConfig(objective="contrastive", epochs=1, batch 16,
max_length 128, warmup 0.1), head_init=Prototypes(support, labels, descriptions))``, then
the prototype head rebuilt on the trained body at prior 0, 1 and 2. Scored on the
validation split (AG News: first 1,000 rows).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, seed_summary  # noqa: E402
from bench_fewshot import TASKS, scored_rows  # noqa: E402

from peftkit.adapters.folder import release
from peftkit.config.presets import load_preset
from peftkit.data.load import TextDataset, few_shot
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import load_prompt_set
from peftkit.training.prototypes import Prototypes
from peftkit.training.train import TrainConfig, train


def main() -> None:
    import torch

    key, k = sys.argv[1], int(sys.argv[2])
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in sys.argv[3:]]
    family = TASKS[key][2]
    data, val = scored_rows(key, "validation")
    gold = np.asarray(val.labels)
    desc = load_prompt_set(family).describe()
    base = load_base("minilm")
    res: dict[str, list[float]] = {}
    for seed in range(5):
        sup = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
        few = TextDataset("few-shot", data.labels, {"train": sup, "validation": sup})
        for preset, lr in variants:
            t0 = time.perf_counter()
            config = TrainConfig(
                objective="contrastive", epochs=1, batch_size=16, learning_rate=lr,
                max_length=128, patience=None, eval_every=10**6, seed=seed, progress=False,
                warmup_ratio=0.1,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as run_dir:
                result = train(
                    base, load_preset(preset), few, config, run_dir,
                    head_init=Prototypes(sup, data.labels, desc),
                )  # fmt: skip
            fit = time.perf_counter() - t0
            model = result.model.eval()
            x = torch.as_tensor(
                embed_texts(model.body, base.tokenizer, list(val.texts), batch_size=64)
            )
            for prior in (0.0, 1.0, 2.0):
                head = Prototypes(sup, data.labels, desc, prior=prior).head(model, base.tokenizer)
                with torch.no_grad():
                    pred = head(x).argmax(-1).numpy()
                res.setdefault(f"{preset}{lr:g}-prior{prior:g}", []).append(
                    float((pred == gold).mean())
                )
            release(result.model)
            print(
                seed,
                preset,
                lr,
                f"fit {fit:.1f}s",
                {
                    n: round(100 * v[-1], 1)
                    for n, v in res.items()
                    if n.startswith(f"{preset}{lr:g}")
                },
                flush=True,
            )
    summary = seed_summary(res)
    path = RESULTS / "val_fewshot_contrastive.json"
    old = json.loads(path.read_text()) if path.exists() else {"split": "validation"}
    old.setdefault(f"{key}:{k}", {}).update(summary)
    path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
