"""Validation probe (issue 4): can the few-shot prototype-LoRA's spread across samples shrink?

    .venv/bin/python bench/probe_fewshot_spread.py [--settings ag_news:8] [--variants ...]
        # -> bench/results/val_fewshot_spread.json

Per sample (seeds 0-4, the samples of ``bench_fewshot``), the prototype head (prior 2.0, the
prompt set's descriptions), then LoRA from it as ``bench_fewshot``'s
``peftkit-prototypes-lora`` (40 epochs, lr 3e-3, batch 16, max_length 64), in variants:

- ``lora``: as the benchmark (training seed = the sample's seed);
- ``bag5``: five such runs with training seeds s + 1000·t (t = 0 is ``lora``), their
  probabilities averaged (``bag<n>``: the first n); ``lora-t<t>`` is run t alone;
- ``ls0.1``, ``ls0.3``: label smoothing 0.1 / 0.3 (``training.label_smoothing``);
- ``desc-rows``: each label's description sentences added to the training rows.

Each is also averaged with the prototype head (``+protos``). Scored on the validation split
(AG News: first 1,000 rows). ``probe_fewshot_ensemble.py`` asked the bagging question with
the prior of earlier sessions (one template's label words, weight 1) and three runs.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, seed_summary  # noqa: E402
from bench_fewshot import TASKS, scored_rows  # noqa: E402
from probe_fewshot_ensemble import probs_of  # noqa: E402

from peftkit.adapters.folder import release
from peftkit.config.presets import load_preset
from peftkit.data.load import Split, TextDataset, few_shot
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import load_prompt_set
from peftkit.training.prototypes import prototype_head
from peftkit.training.train import TrainConfig, train

SMOOTHING = {"ls0.1": 0.1, "ls0.3": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="ag_news:8")
    parser.add_argument("--variants", default="lora,bag5,ls0.1,ls0.3,desc-rows")
    parser.add_argument("--prior", type=float, default=2.0)
    ns = parser.parse_args()
    base = load_base("minilm")
    out: dict = {"prior": ns.prior, "variants": ns.variants, "split": "validation"}

    def fine_tune(rows, labels, head, seed, smoothing=0.0):
        config = TrainConfig(
            epochs=40, batch_size=16, learning_rate=3e-3, max_length=64, patience=None,
            eval_every=10**6, seed=seed, progress=False, warmup_ratio=0.1,
            label_smoothing=smoothing,
        )  # fmt: skip
        ds = TextDataset("few-shot", tuple(labels), {"train": rows, "validation": rows})
        with tempfile.TemporaryDirectory() as run_dir:
            model = train(base, load_preset("lora"), ds, config, run_dir, head_init=head).model
        p = probs_of(model.eval(), base.tokenizer, texts)
        release(model)
        return p

    for setting in ns.settings.split(","):
        key, k = setting.split(":")[0], int(setting.split(":")[1])
        family = TASKS[key][2]
        data, val = scored_rows(key, "validation")
        gold, texts = np.asarray(val.labels), list(val.texts)
        prompts = load_prompt_set(family)
        described = prompts.describe()
        xv = torch.as_tensor(embed_texts(base.model, base.tokenizer, texts, batch_size=64))
        acc: dict[str, list[float]] = {}

        def add(name, p, p_proto=None, acc=acc, gold=gold):
            acc.setdefault(name, []).append(float((p.argmax(1) == gold).mean()))
            if p_proto is not None:
                add(f"{name}+protos", (p + p_proto) / 2)

        for seed in range(5):
            t0 = time.perf_counter()
            sup = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
            head = prototype_head(base, sup, data.labels, prompts, prior=ns.prior)
            with torch.no_grad():
                p_proto = torch.softmax(head(xv), -1).numpy()
            add("protos", p_proto)
            runs: list[np.ndarray] = []
            for name in ns.variants.split(","):
                if name == "lora" or name.startswith("bag"):
                    for t in range(len(runs), 1 if name == "lora" else int(name[3:])):
                        runs.append(fine_tune(sup, data.labels, head, seed + 1000 * t))
                        if t:
                            add(f"lora-t{t}", runs[-1])
                            add(f"bag{t + 1}", np.mean(runs, 0), p_proto)
                    if name == "lora":
                        add("lora", runs[0], p_proto)
                elif name in SMOOTHING:
                    add(name, fine_tune(sup, data.labels, head, seed, SMOOTHING[name]), p_proto)
                elif name == "desc-rows":
                    extra = [
                        (s, i) for i, lab in enumerate(data.labels) for s in described.phrases(lab)
                    ]
                    rows = Split(sup.texts + tuple(s for s, _ in extra),
                                 sup.labels + tuple(i for _, i in extra))  # fmt: skip
                    add(name, fine_tune(rows, data.labels, head, seed), p_proto)
                else:
                    raise SystemExit(f"unknown variant {name!r}")
            print(setting, seed, f"{time.perf_counter() - t0:.0f}s",
                  {m: round(100 * v[-1], 1) for m, v in acc.items()}, flush=True)  # fmt: skip
        out[setting] = seed_summary(acc, f"  {setting} ")
        (RESULTS / "val_fewshot_spread.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
