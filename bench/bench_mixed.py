"""Many adapters in one forward: rank-stacked vs gathered LoRA vs peft's ``adapter_names``.

    .venv/bin/python bench/bench_mixed.py            # full run -> bench/results/bench_mixed.json
    .venv/bin/python bench/bench_mixed.py --quick    # smoke run
    .venv/bin/python bench/bench_mixed.py --preset lora-all-linear --out bench_mixed_all_linear

MiniLM with 64 rank-8 LoRA adapters (the ``lora`` preset's targets, or every linear layer
with ``--preset lora-all-linear``; random weights: only the arithmetic is timed) runs one
forward over a batch of 64 SST-2 validation texts whose rows name n distinct adapters,
n = 1, 2, 4, ..., 64, each way:

- ``stacked``: ``MixedLoRA(strategy="stacked")``, the adapters of the batch stacked along the
  rank (n·r extra columns per layer);
- ``gathered``: ``MixedLoRA(strategy="gathered")``, each row's A and B gathered from a bank
  of every adapter, two batched matmuls per layer (punica / S-LoRA's BGMV);
- ``auto``: what ``MixedLoRA`` picks per forward (``GATHER_FROM``);
- ``peft``: plain peft, ``model(..., adapter_names=rows)`` (a slice per adapter per layer).

Each is reported as rows/s and as a ratio to the single-adapter batch (n = 1, stacked), the
cost a mixed batch is held to; every way's output is checked against peft's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402


def texts(n: int) -> list[str]:
    rows = (DATA / "sst2" / "validation.jsonl").read_text().splitlines()
    return [json.loads(r)["text"] for r in rows[:n]]


def build(preset: str, adapters: int, rank: int):
    import peft
    import torch

    from peftkit.adapters.peft_configs import peft_config
    from peftkit.config.presets import load_preset
    from peftkit.models.base import load_base

    base = load_base("minilm")
    spec = load_preset(preset)
    torch.manual_seed(0)
    config = peft_config(spec, base.model)
    config.r = rank
    config.lora_dropout = 0.0
    model = peft.get_peft_model(base.model, config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero
                p.normal_(0, 0.02)
    return base, model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="lora")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_mixed")
    ns = parser.parse_args()
    import torch

    from peftkit.serving.mixed import GATHER_FROM, MixedLoRA

    counts = [1, 2, 4, 8, 16, 32, 64]
    repeats = ns.repeats
    if ns.quick:
        counts, repeats, ns.rows = [1, 4, 16], 2, 16
    base, model = build(ns.preset, max(counts), ns.rank)
    enc = base.tokenizer(texts(ns.rows), padding=True, truncation=True, max_length=128)
    ids = torch.tensor(enc["input_ids"])
    mask = torch.tensor(enc["attention_mask"])
    ways = {s: MixedLoRA(model, strategy=s) for s in ("stacked", "gathered", "auto")}

    def forward(way: str, rows: list[str]) -> torch.Tensor:
        if way == "peft":
            return model(input_ids=ids, attention_mask=mask, adapter_names=rows).last_hidden_state
        with ways[way].rows(rows):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    results = []
    with torch.inference_mode():
        for n in counts:
            rows = [f"a{i % n}" for i in range(ns.rows)]
            want = forward("peft", rows)
            times: dict[str, list[float]] = {w: [] for w in ("stacked", "gathered", "auto", "peft")}
            diff = {}
            for way in times:
                diff[way] = float((forward(way, rows) - want).abs().max())  # also a warm-up
            for _ in range(repeats):  # interleaved, so drift hits every way alike
                for way in times:
                    t0 = time.perf_counter()
                    forward(way, rows)
                    times[way].append(time.perf_counter() - t0)
            med = {w: statistics.median(t) for w, t in times.items()}
            results.append(
                {
                    "distinct_adapters": n,
                    **{f"{w}_ms_p50": 1e3 * t for w, t in med.items()},
                    **{f"{w}_rows_per_s": ns.rows / t for w, t in med.items()},
                    "auto_picked": ways["auto"].last_strategy,
                    **{f"max_abs_diff_{w}_vs_peft": d for w, d in diff.items() if w != "peft"},
                }
            )
    single = results[0]["stacked_ms_p50"]
    for r in results:
        for w in ("stacked", "gathered", "auto", "peft"):
            r[f"{w}_vs_single_adapter"] = single / r[f"{w}_ms_p50"]
    crossing = next(
        (r["distinct_adapters"] for r in results if r["gathered_ms_p50"] < r["stacked_ms_p50"]),
        None,
    )
    print(
        table(
            [
                [
                    r["distinct_adapters"],
                    f"{r['stacked_ms_p50']:.1f}",
                    f"{r['gathered_ms_p50']:.1f}",
                    f"{r['auto_ms_p50']:.1f}",
                    f"{r['peft_ms_p50']:.1f}",
                    r["auto_picked"],
                    f"{r['auto_vs_single_adapter']:.2f}",
                ]
                for r in results
            ],
            ["adapters", "stacked ms", "gathered ms", "auto ms", "peft ms", "auto", "auto/single"],
        )
    )
    print(f"gathered first beats stacked at {crossing} adapters; auto gathers from {GATHER_FROM}")
    write_results(
        ns.out,
        {
            "environment": environment(),
            "setup": {
                "model": "minilm",
                "preset": ns.preset,
                "rank": ns.rank,
                "rows": ns.rows,
                "tokens_per_row_padded": int(ids.shape[1]),
                "repeats": repeats,
                "gather_from": GATHER_FROM,
            },
            "gathered_first_faster_at": crossing,
            "results": results,
        },
        quick=ns.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
