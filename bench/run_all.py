"""Run every benchmark in bench/ (``make bench``), one after another.

    .venv/bin/python bench/run_all.py            # full runs -> bench/results/*.json
    .venv/bin/python bench/run_all.py --quick    # smoke runs of each (results to a temp dir)
    .venv/bin/python bench/run_all.py --only bench_load,bench_swap

Each script runs in its own process at the current priority; prefix with ``nice -n 10``
on a shared machine. The exit status is non-zero when any benchmark failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_load",
    "bench_swap",
    "bench_train",
    "bench_zeroshot",
    "bench_calibration",
    "bench_fewshot",
    "bench_mixed",
    "bench_serve",
    "bench_confidence",
    "bench_continual",
    "bench_intervals",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    ns = parser.parse_args()
    names = [n.strip() for n in ns.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if ns.quick else [])
        print(f"== {name} ({' '.join(cmd[1:])})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
