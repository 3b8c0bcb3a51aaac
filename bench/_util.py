"""Shared helpers for the bench/ scripts: memory figures, subprocess workers, results.

Every benchmark runs each configuration in a fresh subprocess (``run_worker``) so memory
and caches of one configuration never leak into the next, and writes its numbers to
``bench/results/<name>.json`` plus a readable table on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = Path(os.environ.get("PEFTKIT_BENCH_DATA", "/work/shared/data"))


def proc_status() -> dict[str, int]:
    """Memory figures of this process in bytes, from /proc/self/status.

    rss: resident set (VmRSS: file-backed + anonymous + shmem); rss_anon: anonymous pages
    only (RssAnon: heap, tensors that were copied/allocated, not mmapped weight files);
    peak_rss: high-water mark of VmRSS (VmHWM).
    """
    keys = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                out[keys[key]] = int(rest.split()[0]) * 1024
    except OSError:  # not Linux: fall back to psutil when present
        import psutil

        info = psutil.Process().memory_full_info()
        out = {"rss": info.rss, "rss_anon": info.uss, "peak_rss": info.rss}
    return out


MEMORY_NOTES = {
    "rss": "VmRSS from /proc/self/status: all resident pages (anonymous + file-backed)",
    "rss_anon": "RssAnon from /proc/self/status: anonymous resident pages only (no mmapped "
    "weight files); the memory the process really owns",
    "peak_rss": "VmHWM from /proc/self/status: peak resident set of the process",
    "footprint": "model.get_memory_footprint(): bytes of the model's parameters and buffers "
    "as transformers counts them",
    "*_delta": "the same figure minus its value just before loading (after imports)",
}


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def environment() -> dict[str, Any]:
    """Where and when a benchmark ran: versions, CPU, load, niceness, date and commit."""
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        **_cpu(),
        "load_average_at_start": [round(x, 2) for x in load],
        "niceness": os.nice(0),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's HEAD (short hash, "+dirty" when files differ from it), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu() -> dict[str, Any]:
    """The CPU's model name and the vector / matrix extensions its kernels may use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def run_worker(
    script: Path, args: dict[str, Any], *, env: dict[str, str] | None = None, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh interpreter; return the JSON it prints last."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"worker exited {proc.returncode}", "stderr_tail": tail, **args}
    return json.loads(lines[-1])


def write_results(name: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """Full runs go to bench/results/; ``--quick`` smoke runs to a temp folder (they are
    not results and must not overwrite them). ``name`` may be given as a path
    (``bench/results/x.json``): only its stem counts."""
    folder = Path(tempfile.gettempdir()) / "peftkit-bench" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(name).name.removesuffix('.json')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if n and i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
