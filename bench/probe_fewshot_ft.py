"""Validation probe (issue 4): which few-shot fine-tuning keeps the prototype head's low spread?

    .venv/bin/python bench/probe_fewshot_ft.py [--settings sst2:8,sst2:16,ag_news:8]
        # -> bench/results/val_fewshot_ft.json

Prototype heads (prior 2.0, the prompt sets' descriptions), then LoRA (lr 3e-3, batch 16,
max_length 64) from them on the k·C support rows, scored on the validation splits (AG News:
first 1,000 rows), seeds 0-4. Variants: ``protos`` (no training), ``lora40`` / ``lora10``
(40 / 10 epochs, the head trained too), ``lora40-frozen`` (the head kept as the prototypes),
``lora40+protos`` (the mean of the two models' probabilities), ``lora40-reproto`` (after
training, the prototypes rebuilt from the fine-tuned body's embeddings of the support rows
and the descriptions).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, seed_summary  # noqa: E402
from bench_fewshot import TASKS, scored_rows  # noqa: E402

from peftkit.adapters.folder import release
from peftkit.config.presets import load_preset
from peftkit.data.load import TextDataset, few_shot
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import load_prompt_set
from peftkit.training.prototypes import prototype_head
from peftkit.training.train import TrainConfig, train

parser = argparse.ArgumentParser()
parser.add_argument("--settings", default="sst2:8,sst2:16,ag_news:8")
parser.add_argument("--prior", type=float, default=2.0)
ns = parser.parse_args()

base = load_base("minilm")
out: dict = {"prior": ns.prior, "split": "validation"}


def fine_tune(support, data, head, seed, epochs):
    config = TrainConfig(
        epochs=epochs, batch_size=16, learning_rate=3e-3, max_length=64, patience=None,
        eval_every=10**6, seed=seed, progress=False, warmup_ratio=0.1,
    )  # fmt: skip
    ds = TextDataset("few-shot", tuple(data.labels), {"train": support, "validation": support})
    with tempfile.TemporaryDirectory() as run_dir:
        return train(base, load_preset("lora"), ds, config, run_dir, head_init=head).model.eval()


def probs_of(model, texts):
    from peftkit.data.batching import collate, encode, pad_id

    enc = encode(base.tokenizer, texts, [0] * len(texts), 64)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(enc.ids), 64):
            t = collate(enc.ids[i : i + 64], pad_id(base.tokenizer))
            chunks.append(torch.softmax(model(t["input_ids"], t["attention_mask"]), -1).numpy())
    return np.concatenate(chunks)


for setting in ns.settings.split(","):
    key, k = setting.split(":")
    k = int(k)
    family = TASKS[key][2]
    data, val = scored_rows(key, "validation")
    gold = np.asarray(val.labels)
    texts = list(val.texts)
    prompts = load_prompt_set(family)
    xv = torch.as_tensor(embed_texts(base.model, base.tokenizer, texts, batch_size=64))
    res: dict[str, list[float]] = {}

    def add(name, p, res=res, gold=gold):
        res.setdefault(name, []).append(float((p.argmax(1) == gold).mean()))

    for seed in range(5):
        support = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
        head = prototype_head(base, support, data.labels, prompts, prior=ns.prior)
        with torch.no_grad():
            p_proto = torch.softmax(head(xv), -1).numpy()
        add("protos", p_proto)
        for epochs in (40, 10):
            model = fine_tune(support, data, head, seed, epochs)
            p = probs_of(model, texts)
            add(f"lora{epochs}", p)
            if epochs == 40:
                add("lora40+protos", (p + p_proto) / 2)
                # the prototypes again, from the fine-tuned body
                reproto = prototype_head(
                    base, support, data.labels, prompts, prior=ns.prior
                )  # base.model is wrapped by the LoRA now: its embeddings are fine-tuned
                xf = torch.as_tensor(embed_texts(base.model, base.tokenizer, texts, batch_size=64))
                with torch.no_grad():
                    add("lora40-reproto", torch.softmax(reproto(xf), -1).numpy())
            release(model)
        frozen = prototype_head(base, support, data.labels, prompts, prior=ns.prior)
        for p_ in frozen.parameters():
            p_.requires_grad_(False)
        model = fine_tune(support, data, frozen, seed, 40)
        add("lora40-frozen", probs_of(model, texts))
        release(model)
        print(setting, seed, {m: round(100 * v[-1], 1) for m, v in res.items()}, flush=True)
    out[setting] = seed_summary(res, f"  {setting} ")
    (RESULTS / "val_fewshot_ft.json").write_text(json.dumps(out, indent=1))
