"""Validation probe (issue 4): how much of the few-shot seed spread is training noise?

    .venv/bin/python bench/probe_fewshot_ensemble.py   # -> bench/results/val_fewshot_ensemble.json

For each setting and sample seed 0-4 (the same samples as bench_fewshot), the prototype head
(prior 1.0) is fine-tuned with the ``lora`` preset as ``peftkit-prototypes-lora`` (40
epochs, lr 3e-3) three times, with training seeds ``seed``, ``seed + 1000`` and
``seed + 2000`` (member 0 is bench_fewshot's run). Scored on the validation splits (AG News:
first 1,000 rows): the prototypes alone, each member, the mean of the three members'
probabilities, that mean with the prototypes' probabilities as a fourth member, and the
members' "soup": one model whose weight update is the mean of the members' LoRA updates
(B·A·scale) and whose head is the mean of their heads (one adapter of rank 3·r). If the
members of one sample disagree a lot, averaging them narrows the spread across samples.
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS  # noqa: E402
from bench_fewshot import FINETUNE, TASKS, scored_rows  # noqa: E402

from peftkit.adapters.folder import release
from peftkit.adapters.model import TaskModel, body_of
from peftkit.config.presets import load_preset
from peftkit.data.batching import collate, encode, pad_id
from peftkit.data.load import TextDataset, few_shot
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import load_prompt
from peftkit.training.prototypes import prototype_head
from peftkit.training.train import TrainConfig, train

MEMBERS = 3


def probs_of(model, tokenizer, texts) -> np.ndarray:
    enc = encode(tokenizer, texts, [0] * len(texts), 64)
    out = []
    with torch.no_grad():
        for i in range(0, len(enc.ids), 64):
            t = collate(enc.ids[i : i + 64], pad_id(tokenizer))
            out.append(torch.softmax(model(t["input_ids"], t["attention_mask"]), -1).numpy())
    return np.concatenate(out)


def lora_deltas(peft_body) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight update (scale·B·A), by the layer's name in the bare body."""
    out = {}
    for name, module in peft_body.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = module.get_delta_weight("default").detach().clone()
    return out


def soup_probs(base, deltas, heads, texts) -> np.ndarray:
    body = copy.deepcopy(body_of(base.model))
    with torch.no_grad():
        for key in deltas[0]:
            body.get_submodule(key).weight += torch.stack([d[key] for d in deltas]).mean(0)
        head = copy.deepcopy(heads[0])
        head.linear.weight.copy_(torch.stack([h.linear.weight for h in heads]).mean(0))
        head.linear.bias.copy_(torch.stack([h.linear.bias for h in heads]).mean(0))
    return probs_of(TaskModel(body, head, "mean").eval(), base.tokenizer, texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="sst2:8,sst2:16,ag_news:8")
    parser.add_argument("--ft-epochs", type=float, default=40)
    ns = parser.parse_args()
    base = load_base("minilm")
    preset, lr = FINETUNE["peftkit-prototypes-lora"]
    out: dict = {"settings": ns.settings, "ft_epochs": ns.ft_epochs, "members": MEMBERS}
    for item in ns.settings.split(","):
        key, k = item.split(":")[0], int(item.split(":")[1])
        family, template = TASKS[key][2:]
        data, val = scored_rows(key, "validation")
        gold = np.asarray(val.labels)
        verb = load_prompt(family, template).verbalizer
        xv = torch.as_tensor(
            embed_texts(base.model, base.tokenizer, list(val.texts), batch_size=64)
        )
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for seed in range(5):
            sup = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
            head = prototype_head(base, sup, data.labels, verb, prior=1.0)
            with torch.no_grad():
                p_proto = torch.softmax(head(xv), -1).numpy()
            members, deltas, heads = [], [], []
            ds = TextDataset("few-shot", tuple(data.labels), {"train": sup, "validation": sup})
            for j in range(MEMBERS):
                config = TrainConfig(
                    epochs=ns.ft_epochs, batch_size=16, learning_rate=lr, max_length=64,
                    patience=None, eval_every=10**6, seed=seed + 1000 * j, progress=False,
                    warmup_ratio=0.1,
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as run_dir:
                    result = train(
                        base, load_preset(preset), ds, config, run_dir, head_init=head
                    )  # copied by train()
                members.append(probs_of(result.model.eval(), base.tokenizer, list(val.texts)))
                deltas.append(lora_deltas(result.model.body))
                heads.append(copy.deepcopy(result.model.head))
                release(result.model)
            ens = np.mean(members, 0)
            rows = {
                "prototypes": p_proto,
                **{f"member{j}": m for j, m in enumerate(members)},
                "ensemble3": ens,
                "ensemble3+prototypes": (ens * MEMBERS + p_proto) / (MEMBERS + 1),
                "soup3": soup_probs(base, deltas, heads, list(val.texts)),
            }
            for name, p in rows.items():
                acc.setdefault(name, []).append(float((p.argmax(1) == gold).mean()))
            print(
                f"[{key} k={k} seed={seed}] "
                + " ".join(f"{n}={100 * v[-1]:.1f}" for n, v in acc.items()),
                flush=True,
            )
        summary = {
            n: {"mean": 100 * statistics.mean(v), "std": 100 * statistics.stdev(v), "runs": v}
            for n, v in acc.items()
        }
        out[f"{key}:{k}"] = {"seconds": time.perf_counter() - t0, "summary": summary}
        (RESULTS / "val_fewshot_ensemble.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
