"""Probe: a 4-bit base computing in float32 or in bfloat16 on this CPU, same run.

    .venv/bin/python bench/probe_qlora_dtype.py   # -> bench/results/probe_qlora_dtype.json

``load_base(..., quantization="4bit", dtype="bfloat16")`` (a recipe's ``base.dtype``) makes
the NF4 layers compute in bfloat16; unset, a CPU computes in float32. On a CPU with
AVX512-BF16 / AMX bfloat16 is native. For MiniLM and SmolLM2-135M: a QLoRA training step
(batch 16 x 64 tokens, AdamW) and, for the causal LM, an inference forward (8 x 64 tokens),
each dtype in turn, three rounds alternating; the median counts.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import environment, write_results  # noqa: E402

from peftkit.adapters.model import build_task_model
from peftkit.config.presets import AdapterSpec
from peftkit.models.base import load_base

DTYPES = ("float32", "bfloat16")


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def setup(name: str, dtype: str):
    base = load_base(name, quantization="4bit", dtype=dtype)
    torch.manual_seed(0)
    model = build_task_model(base.model, AdapterSpec(method="qlora", source="probe"), 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(100, 10000, (16, 64))
    mask, y = torch.ones_like(x), torch.randint(0, 2, (16,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x, mask).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    if base.kind != "causal-lm":
        return step, None
    # its own copy: preparing a k-bit model for training casts its norms to float32
    scorer = load_base(name, quantization="4bit", dtype=dtype).model

    def forward() -> None:
        with torch.inference_mode():
            scorer(input_ids=x[:8])

    return step, forward


def main() -> None:
    rows = []
    for name in ("minilm", "smollm2-135m"):
        ways = {dtype: setup(name, dtype) for dtype in DTYPES}
        seconds: dict[str, dict[str, list[float]]] = {
            d: {"step": [], "forward": []} for d in DTYPES
        }
        for rnd in range(3):
            for dtype in DTYPES if rnd % 2 == 0 else DTYPES[::-1]:
                step, forward = ways[dtype]
                seconds[dtype]["step"].append(timed(step, 4))
                if forward is not None:
                    seconds[dtype]["forward"].append(timed(forward, 4))
        median = {
            d: {k: statistics.median(v) for k, v in s.items() if v} for d, s in seconds.items()
        }
        row = {
            "model": name,
            "seconds": seconds,
            "median_seconds": median,
            "train_step_speedup_bf16": median["float32"]["step"] / median["bfloat16"]["step"],
        }
        if "forward" in median["float32"]:
            row["forward_speedup_bf16"] = (
                median["float32"]["forward"] / median["bfloat16"]["forward"]
            )
        print(row, flush=True)
        rows.append(row)
    path = write_results(
        "probe_qlora_dtype",
        {"probe": "probe_qlora_dtype", "environment": environment(), "rows": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
