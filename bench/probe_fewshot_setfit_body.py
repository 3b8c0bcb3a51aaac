"""Validation probe (issue 4): SetFit's fine-tuned body with a prototype head instead of its
logistic regression.

    .venv/bin/python bench/probe_fewshot_setfit_body.py ag_news 8
        # -> bench/results/val_fewshot_setfit_body.json

Per sample (seeds 0-4, ``bench_fewshot``'s samples): SetFit 1.2 with default settings on the
packaged MiniLM (``setfit``), then on its contrastively fine-tuned body a cosine prototype
head (temperature 0.05) whose rows are each class's normalised support centroid plus
``prior`` times the normalised mean embedding of the label's descriptions (the prompt set's
``descriptions``), prior 0, 1 and 2 (``sf-protos<prior>``), alone and averaged with SetFit's
own probabilities (``+lr``). Scored on the validation split (AG News: first 1,000 rows).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, seed_summary  # noqa: E402
from bench_fewshot import TASKS, scored_rows  # noqa: E402

from peftkit.data.load import few_shot
from peftkit.models.assets import resolve_packaged
from peftkit.prompting.templates import load_prompt_set


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    key, k = sys.argv[1], int(sys.argv[2])
    model_dir = str(resolve_packaged("minilm"))
    family = TASKS[key][2]
    data, val = scored_rows(key, "validation")
    gold = np.asarray(val.labels)
    desc = load_prompt_set(family).describe()
    res: dict[str, list[float]] = {}
    for seed in range(5):
        sup = few_shot(data.split("train"), k, seed=seed, label_names=data.labels)
        model = SetFitModel.from_pretrained(model_dir)
        args = TrainingArguments(seed=seed, report_to="none", show_progress_bar=False)
        rows = Dataset.from_dict({"text": list(sup.texts), "label": list(sup.labels)})
        Trainer(model=model, args=args, train_dataset=rows).train()

        def enc(texts, model=model):
            return unit(np.asarray(model.model_body.encode(list(texts), show_progress_bar=False)))

        xv, xs, ys = enc(val.texts), enc(sup.texts), np.asarray(sup.labels)
        p_lr = np.asarray(model.predict_proba(list(val.texts), show_progress_bar=False))
        d = np.stack([unit(enc(desc.phrases(lab)).mean(0)) for lab in data.labels])
        cent = np.stack([unit(xs[ys == c].mean(0)) for c in range(len(data.labels))])
        out = {"setfit": p_lr}
        for prior in (0.0, 1.0, 2.0):
            logits = xv @ unit(prior * d + cent).T / 0.05
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[f"sf-protos{prior}"] = p
            out[f"sf-protos{prior}+lr"] = (p + p_lr) / 2
        for n, p in out.items():
            res.setdefault(n, []).append(float((p.argmax(1) == gold).mean()))
        print(seed, {n: round(100 * v[-1], 1) for n, v in res.items()}, flush=True)
    summary = seed_summary(res)
    path = RESULTS / "val_fewshot_setfit_body.json"
    path.write_text(json.dumps({"split": "validation", f"{key}:{k}": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
