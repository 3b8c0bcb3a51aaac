"""Load time and memory of the packaged bases (issue 2), each configuration in a fresh process.

    .venv/bin/python bench/bench_load.py            # full run -> bench/results/bench_load.json
    .venv/bin/python bench/bench_load.py --quick    # smoke run (minilm fp32 + GGUF, 1 repeat)

Rows: ``minilm`` and ``smollm2-135m`` through ``peftkit.load_base`` in fp32, 8-bit and 4-bit
on CPU: wall time, RSS, anonymous RSS, peak RSS and ``get_memory_footprint()``. Then the
GGUF model three ways: peftkit's first load (empty ``PEFTKIT_CACHE``: converts the GGUF to
a safetensors cache), peftkit's cached load (second process, same cache), and the anchor a
user has without peftkit: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    MEMORY_NOTES,
    environment,
    mib,
    proc_status,
    run_worker,
    table,
    write_results,
)

SCRIPT = Path(__file__).resolve()
QUANTS = [None, "8bit", "4bit"]


def worker(args: dict) -> dict:
    """One load in this (fresh) process; prints the figures as JSON."""
    import torch  # noqa: F401  (imports are not part of the load time)
    import transformers  # noqa: F401

    import peftkit.models.base  # noqa: F401

    before = proc_status()
    t0 = time.perf_counter()
    if args["route"] == "peftkit":
        from peftkit.models.base import load_base

        base = load_base(args["model"], quantization=args["quant"])
        model = base.model
    else:  # plain transformers reading the GGUF file directly
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peftkit.models.assets import PACKAGED_MODELS, package_folder

        spec = PACKAGED_MODELS[args["model"]]
        folder = package_folder(spec)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=spec.gguf_file, dtype=torch.float32
        )
        AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    seconds = time.perf_counter() - t0
    after = proc_status()
    return {
        **args,
        "seconds": seconds,
        "rss": after["rss"],
        "rss_anon": after["rss_anon"],
        "peak_rss": after["peak_rss"],
        "rss_delta": after["rss"] - before["rss"],
        "rss_anon_delta": after["rss_anon"] - before["rss_anon"],
        "footprint": int(model.get_memory_footprint()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure(args: dict, repeats: int, env: dict | None = None) -> dict:
    """``repeats`` fresh-process loads of one configuration; the median time is reported."""
    runs = [run_worker(SCRIPT, args, env=env) for _ in range(repeats)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    out = dict(runs[0])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["seconds_all"] = [round(r["seconds"], 3) for r in runs]
    for key in ("rss", "rss_anon", "peak_rss", "rss_delta", "rss_anon_delta"):
        out[key] = int(statistics.median(r[key] for r in runs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per config")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return

    repeats = 1 if ns.quick else ns.repeats
    cache = Path(tempfile.mkdtemp(prefix="peftkit-bench-cache-"))
    env = {"PEFTKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[dict] = []
    try:
        # GGUF first: first load (empty cache, converts), cached load, transformers anchor.
        rows.append(
            {
                "case": "gguf first load (empty cache)",
                **measure({"route": "peftkit", "model": "smollm2-135m", "quant": None}, 1, env),
            }
        )
        rows.append(
            {
                "case": "gguf cached load",
                **measure(
                    {"route": "peftkit", "model": "smollm2-135m", "quant": None}, repeats, env
                ),
            }
        )
        rows.append(
            {
                "case": "gguf transformers from_pretrained(gguf_file=)",
                **measure(
                    {"route": "transformers-gguf", "model": "smollm2-135m", "quant": None},
                    repeats,
                    env,
                ),
            }
        )
        models = ["minilm"] if ns.quick else ["minilm", "smollm2-135m"]
        quants = [None] if ns.quick else QUANTS
        for model in models:
            for quant in quants:
                rows.append(
                    {
                        "case": f"{model} {quant or 'fp32'}",
                        **measure(
                            {"route": "peftkit", "model": model, "quant": quant}, repeats, env
                        ),
                    }
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    by_case = {r["case"]: r for r in rows}
    first = by_case["gguf first load (empty cache)"].get("seconds")
    cached = by_case["gguf cached load"].get("seconds")
    anchor = by_case["gguf transformers from_pretrained(gguf_file=)"].get("seconds")
    ratios = {}
    if first and cached and anchor:
        ratios = {
            "cached_vs_transformers_gguf_time": cached / anchor,
            "first_vs_transformers_gguf_time": first / anchor,
            "transformers_gguf_over_cached_speedup": anchor / cached,
        }
    payload = {
        "benchmark": "bench_load",
        "issue": 2,
        "what": "load time and memory of packaged bases via peftkit.load_base on CPU, each "
        "config in a fresh subprocess; seconds = median over repeats",
        "repeats": repeats,
        "memory_figures": MEMORY_NOTES,
        "environment": environment(),
        "rows": rows,
        "ratios": ratios,
    }
    path = write_results("bench_load", payload, quick=ns.quick)
    header = ["case", "s", "RSS MiB", "anon MiB", "peak MiB", "dRSS", "dAnon", "footprint MiB"]
    print(
        table(
            [
                [
                    r["case"],
                    f"{r['seconds']:.2f}" if "seconds" in r else "ERROR",
                    mib(r.get("rss")),
                    mib(r.get("rss_anon")),
                    mib(r.get("peak_rss")),
                    mib(r.get("rss_delta")),
                    mib(r.get("rss_anon_delta")),
                    mib(r.get("footprint")),
                ]
                for r in rows
            ],
            header,
        )
    )
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    for r in rows:
        if "error" in r:
            print(f"ERROR in {r['case']}: {r['error']}\n{r['stderr_tail']}", file=sys.stderr)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
