"""Validation probe (issue 4): does centering the prototype head's logits cut the seed spread?

    .venv/bin/python bench/probe_fewshot_centering.py   # -> bench/results/val_fewshot_centering.json

Prototype heads (prior 1.0, as bench_fewshot) for SST-2 and AG News, k = 8 and 16, seeds 0-4,
scored on the validation splits (AG News: first 1,000 rows). Each head's logits are shifted by
minus a class-bias estimate: ``unl1000`` / ``unl200`` the mean logits over 1,000 / 200
unlabeled train rows, ``unl1000_prob`` the log of their mean probabilities (batch
calibration), ``transductive`` the mean logits over the scored rows themselves, ``loo`` the
mean leave-one-out logits of the support rows (labeled rows only, as SetFit has). ``raw`` is
no shift. None narrowed the spread (bench/README.md).
"""

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS  # noqa: E402
from bench_fewshot import TASKS, scored_rows  # noqa: E402

from peftkit.data.load import few_shot
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import load_prompt
from peftkit.training.prototypes import label_embeddings, prototype_head

base = load_base("minilm")
out = {}
for key in ("sst2", "ag_news"):
    family, template = TASKS[key][2:]
    data, val = scored_rows(key, "validation")
    gold = np.asarray(val.labels)
    verb = load_prompt(family, template).verbalizer
    le = label_embeddings(base, data.labels, verb)  # the label prior, the same for every seed
    xv = torch.as_tensor(embed_texts(base.model, base.tokenizer, list(val.texts), batch_size=64))
    train = data.split("train")
    rng = np.random.default_rng(1234)
    unl_idx = rng.choice(len(train), 1000, replace=False)
    xu = torch.as_tensor(
        embed_texts(base.model, base.tokenizer, [train.texts[i] for i in unl_idx], batch_size=64)
    )
    for k in (8, 16):
        res = {m: [] for m in ("raw", "unl1000", "unl1000_prob", "unl200", "transductive", "loo")}
        for seed in range(5):
            sup = few_shot(train, k, seed=seed, label_names=data.labels)
            head = prototype_head(base, sup, data.labels, verb, prior=1.0)
            with torch.no_grad():
                lv = head(xv).numpy()
                lu = head(xu).numpy()
            res["raw"].append((lv.argmax(1) == gold).mean())
            res["unl1000"].append(((lv - lu.mean(0)).argmax(1) == gold).mean())
            pu = torch.softmax(torch.as_tensor(lu), -1).numpy().mean(0)
            res["unl1000_prob"].append(((lv - np.log(pu)).argmax(1) == gold).mean())
            res["unl200"].append(((lv - lu[:200].mean(0)).argmax(1) == gold).mean())
            res["transductive"].append(((lv - lv.mean(0)).argmax(1) == gold).mean())
            # leave-one-out on the support set: each row scored by a head built without it
            ys = np.asarray(sup.labels)
            fs = embed_texts(base.model, base.tokenizer, list(sup.texts))
            ls = []
            for i in range(len(ys)):
                keep = np.arange(len(ys)) != i
                P = le.copy()
                for c in range(len(data.labels)):
                    rows = fs[keep & (ys == c)]
                    cen = rows.mean(0)
                    P[c] += cen / np.linalg.norm(cen)
                P /= np.linalg.norm(P, axis=1, keepdims=True)
                x = fs[i] / np.linalg.norm(fs[i])
                ls.append(P @ x / 0.05)
            res["loo"].append(((lv - np.mean(ls, 0)).argmax(1) == gold).mean())
        for m, v in res.items():
            print(
                f"{key} k={k} {m:13s} {100 * np.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}  {[round(100 * a, 1) for a in v]}",
                flush=True,
            )
        out[f"{key}:{k}"] = {m: [float(a) for a in v] for m, v in res.items()}
(RESULTS / "val_fewshot_centering.json").write_text(json.dumps(out, indent=1) + "\n")
