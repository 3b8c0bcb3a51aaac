"""Probe (issue 4): would int8 weights make zero-shot scoring faster at the same accuracy?

    .venv/bin/python bench/probe_int8_scoring.py   # -> bench/results/probe_int8_scoring.json

smollm2-135m scores the first 128 SST-2 test rows with bench_zeroshot's lm-eval template
(label words " negative" / " positive", the last position's logits only, batch 16, left
padding) in fp32 and after PyTorch's dynamic int8 quantization (``quantize_dynamic``, the
x86 fbgemm kernels) of every linear layer, and of the MLP layers only. Each variant runs
twice; the second run is timed. The speed goals need the same accuracy (within 0.5
points), so int8 counts only if its predictions match fp32's.
"""

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, write_results  # noqa: E402

from peftkit.data.load import load_data
from peftkit.models.base import load_base

ROWS = 128
TEMPLATE = "{text}\nQuestion: Is this sentence positive or negative?\nAnswer:"


def main() -> None:
    base = load_base("smollm2-135m")
    model, tok = base.model.eval(), base.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    test = load_data(DATA / "sst2").split("test")
    texts = [TEMPLATE.format(text=t) for t in test.texts[:ROWS]]
    gold = list(test.labels[:ROWS])
    neg, pos = tok(" negative").input_ids[0], tok(" positive").input_ids[0]

    def score(m) -> tuple[list[int], float]:
        preds, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(texts), 16):
                batch = tok(texts[i : i + 16], return_tensors="pt", padding=True)
                last = m(**batch, logits_to_keep=1).logits[:, -1]
                preds += (last[:, pos] > last[:, neg]).long().tolist()
        return preds, time.perf_counter() - t0

    linear = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    variants = {
        "fp32": model,
        "int8-all-linear": torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), linear, dtype=torch.qint8
        ),
        "int8-mlp-only": torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {n for n in linear if ".mlp." in n}, dtype=torch.qint8
        ),
    }
    rows, ref, ref_s = [], None, None
    for name, m in variants.items():
        score(m)  # warm-up
        preds, seconds = score(m)
        ref, ref_s = (preds, seconds) if ref is None else (ref, ref_s)
        row = {
            "variant": name,
            "rows": ROWS,
            "accuracy": sum(int(p == g) for p, g in zip(preds, gold, strict=True)) / ROWS,
            "seconds": seconds,
            "speedup_vs_fp32": ref_s / seconds,
            "agree_with_fp32": sum(int(p == r) for p, r in zip(preds, ref, strict=True)),
        }
        rows.append(row)
        print(row, flush=True)
    path = write_results(
        "probe_int8_scoring",
        {"benchmark": "probe_int8_scoring", "issue": 4, "environment": environment(), "rows": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
