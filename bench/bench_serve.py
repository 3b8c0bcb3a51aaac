"""``peftkit serve`` under load against the server a user would write, and the offline limit.

    .venv/bin/python bench/bench_serve.py            # full run -> bench/results/bench_serve.json
    .venv/bin/python bench/bench_serve.py --quick    # smoke run (2 levels, 2 s each)

Sixteen adapters on MiniLM (2 to 77 labels: SST-2, IMDB, Rotten Tomatoes, AG News, TREC,
Banking77, SMS spam from /work/shared/data, and the packaged BBC News, tweets and SMS corpora;
six of them again with another seed), each a rank-8 LoRA trained for a few steps, are
registered once in ``--work`` (kept between runs). Then, one server process at a time on a
127.0.0.1 port, driven by an aiohttp load generator in this process:

- ``peftkit``: ``peftkit serve`` with the 16 adapters resident (batching rows across
  requests into mixed-adapter forwards, default limits);
- ``naive``: ``bench/naive_server.py``, FastAPI + one peft ``PeftModel``, ``set_adapter`` and
  one forward per request under a lock;
- ``offline``: ``AdaptedModel.predict_mixed`` over the same rows in this process, no HTTP,
  at its best batch size (each size the best of three passes): the limit a server can
  approach.

Workloads: requests of 1 row, and of 1-8 rows; each request's adapter drawn uniformly or
Zipf-skewed (s = 1.1). Closed loop with 1, 8, 32 and 64 concurrent clients (each sends its
next request when the last is answered), then an open loop of one-row requests at fixed
fractions of peftkit's saturation rate (Poisson arrivals) to find where latency turns up.
Every answer is checked against ``AdaptedModel.predict`` for that row alone (label, and
probabilities within 1e-4). Memory: each server's resident set with 16 and with 64 adapters
loaded. Traffic goes to 127.0.0.1 only, each level bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
# (adapter name, data source, training seed): shared/data folders or packaged corpora
ADAPTERS = [
    ("sst2", "sst2", 0),
    ("imdb", "imdb_small", 0),
    ("rotten", "rotten_tomatoes", 0),
    ("agnews", "ag_news", 0),
    ("trec", "trec", 0),
    ("banking77", "banking77", 0),
    ("smsspam", "sms_spam", 0),
    ("bbc", "bbc-news", 0),
    ("tweets", "tweets-sentiment", 0),
    ("spam", "sms-spam", 0),
    ("sst2-b", "sst2", 1),
    ("agnews-b", "ag_news", 1),
    ("trec-b", "trec", 1),
    ("banking77-b", "banking77", 1),
    ("bbc-b", "bbc-news", 1),
    ("tweets-b", "tweets-sentiment", 1),
]
MAX_LENGTH = 64
ZIPF_S = 1.1


# -- setup --------------------------------------------------------------------------------


def source(name: str) -> str | Path:
    return DATA / name if (DATA / name).is_dir() else name


def build_registry(work: Path, steps: int) -> dict[str, Any]:
    """Train and register the adapters once (kept in ``work``); the test texts of each."""
    from peftkit import Registry, TrainConfig, load_base, load_data, load_preset, train

    registry = Registry(work / "registry")
    have = {e.name for e in registry.list()}
    base = None
    texts: dict[str, list[str]] = {}
    info: dict[str, Any] = {}
    for name, data_name, seed in ADAPTERS:
        data = load_data(source(data_name), max_rows=512, seed=seed)
        # at most 4,000 characters (a few long IMDB reviews pass 10,000, peftkit serve's
        # default max_text_chars); the model reads the first 64 tokens either way
        texts[name] = [t[:4000] for t in data.splits["test"].texts if t.strip()][:256]
        info[name] = {"data": data_name, "labels": len(data.labels), "seed": seed}
        if name in have:
            continue
        base = base or load_base("minilm")
        config = TrainConfig(
            max_steps=steps,
            batch_size=16,
            max_length=MAX_LENGTH,
            seed=seed,
            progress=False,
            patience=None,
            checkpoint_every=10_000,
        )
        run = work / "runs" / name
        with train(base, load_preset("lora"), data, config, run) as result:
            folder = result.model.save_pretrained(run / "adapter")
            registry.register(name, folder, metrics=result.test_metrics)
    for name in info:
        entry = registry.get(name)
        info[name].update(ref=entry.ref, test_accuracy=entry.metrics.get("accuracy"))
    return {"texts": texts, "adapters": info}


def workload(texts: dict[str, list[str]], rows: tuple[int, int], skew: str, n: int, seed: int):
    """``n`` requests: (adapter, [texts]); the adapter uniform or Zipf-skewed."""
    rng = random.Random(seed)
    names = list(texts)
    weights = [1.0] * len(names) if skew == "uniform" else [1 / k**ZIPF_S for k in range(1, 17)]
    out = []
    for _ in range(n):
        name = rng.choices(names, weights)[0]
        out.append((name, [rng.choice(texts[name]) for _ in range(rng.randint(*rows))]))
    return out


def expected_answers(registry_dir: Path, texts: dict[str, list[str]]) -> dict[tuple, Any]:
    """Each (adapter, text): AdaptedModel.predict for that row alone."""
    from peftkit import AdaptedModel, Registry, load_base

    base = load_base("minilm")
    out = {}
    with AdaptedModel(base, Registry(registry_dir, read_only=True), max_resident=16) as model:
        for name, rows in texts.items():
            for text in rows:
                p = model.predict([text], adapter=name)[0]
                out[(name, text)] = (p.label, p.probs)
    return out


def offline_limit(
    registry_dir: Path,
    requests: list,
    batch_sizes: list[int],
    forward_ms: dict | None = None,
    repeats: int = 3,
) -> dict:
    """predict_mixed over the workload's rows in this process at each batch size, the best
    of ``repeats`` passes (a limit: a pass slowed by other load on the host would lower
    it); the median milliseconds of one forward at each size, over every pass, go into
    ``forward_ms``."""
    from peftkit import AdaptedModel, Registry, load_base

    texts = [t for _, rows in requests for t in rows]
    names = [n for n, rows in requests for _ in rows]
    base = load_base("minilm")
    out = {}
    with AdaptedModel(base, Registry(registry_dir, read_only=True), max_resident=16) as model:
        for name in dict.fromkeys(names):
            model.load(name)
        for size in batch_sizes:
            model.batch_size = size
            model.predict_mixed(texts[:size], names[:size])  # warm
            times, best = [], 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(0, len(texts), size):
                    t = time.perf_counter()
                    model.predict_mixed(texts[i : i + size], names[i : i + size])
                    times.append(time.perf_counter() - t)
                best = max(best, len(texts) / (time.perf_counter() - t0))
            out[size] = best
            if forward_ms is not None:
                forward_ms[size] = 1e3 * float(np.median(times))
    return out


def ideal_batcher(forward_ms: dict[int, float], rate: float, max_rows: int, n: int = 100_000):
    """p50 and p99 latency (ms) of one-row requests arriving at ``rate`` per second (Poisson,
    seeded) at a batcher with no HTTP, no queueing overhead and no contention: whenever it is
    free it runs one forward over everything waiting (at most ``max_rows``), which takes the
    median time measured offline for that many rows (interpolated between the sizes
    measured). What any batching server on this CPU and model can reach at best."""
    sizes = sorted(forward_ms)

    def cost(k: int) -> float:
        return float(np.interp(k, sizes, [forward_ms[s] for s in sizes]))

    rng = random.Random(11)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += 1e3 * rng.expovariate(rate)
        arrivals.append(t)
    latencies, i, now = [], 0, 0.0
    while i < n:
        now = max(now, arrivals[i])
        k = min(max(bisect.bisect_right(arrivals, now, lo=i) - i, 1), max_rows)
        now += cost(k)
        latencies += [now - a for a in arrivals[i : i + k]]
        i += k
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_ARGS: list[str] = []  # more peftkit serve flags (--server-args)


def start(kind: str, registry: Path, names: list[str], work: Path, resident: int):
    port = free_port()
    if kind == "peftkit":
        command = [sys.executable, "-m", "peftkit.cli", "serve", "--registry", str(registry)]
        command += ["--adapters", ",".join(names), "--max-resident", str(resident)]
        command += SERVER_ARGS
    else:
        command = [sys.executable, str(HERE / "naive_server.py"), "--registry", str(registry)]
        command += ["--adapters", ",".join(names), "--max-length", str(MAX_LENGTH)]
    command += ["--port", str(port)]
    log = open(work / f"{kind}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import urllib.request

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} server exited:\n{(work / f'{kind}.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{kind} server not up in 300 s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def memory(pid: int) -> dict[str, int]:
    keys = {"VmRSS": "rss", "RssAnon": "rss_anon", "VmHWM": "peak_rss"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[keys[key]] = int(rest.split()[0]) * 1024
    return out


# -- load generation ----------------------------------------------------------------------


async def _send(session, url: str, adapter: str, rows: list[str]) -> tuple[int, Any]:
    async with session.post(url, json={"adapter": adapter, "inputs": rows}) as response:
        body = await response.json(content_type=None)
        return response.status, body


async def closed_loop(
    url: str, requests: list, clients: int, seconds: float, warm: float, bounds: dict | None = None
):
    """``clients`` workers, each sending its next request when the last is answered;
    ``bounds`` gets the measured window's start and stop."""
    import aiohttp

    bounds = {} if bounds is None else bounds

    done: list[tuple[float, float, int, int, int, Any]] = []  # start, end, i, rows, status, body
    index = iter(range(len(requests)))
    t_start = time.perf_counter()
    stop_at = t_start + warm + seconds
    bounds.update(start=t_start + warm, stop=stop_at)

    async def worker(session) -> None:
        for i in index:
            if time.perf_counter() >= stop_at:
                return
            adapter, rows = requests[i]
            t0 = time.perf_counter()
            try:
                status, body = await _send(session, url + "/v1/classify", adapter, rows)
            except aiohttp.ClientError as exc:
                status, body = -1, repr(exc)
            done.append((t0, time.perf_counter(), i, len(rows), status, body))

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    window = [d for d in done if d[0] >= t_start + warm]
    elapsed = max(d[1] for d in window) - (t_start + warm) if window else float("nan")
    return window, elapsed, done


def served_in_window(done: list, t_from: float, t_to: float) -> float:
    """Rows/s answered (200) between ``t_from`` and ``t_to``, whenever their requests were
    sent: counting only requests sent inside the window instead leaves out the rows the
    server answers in the window's first latency's worth of time, which undercounts by
    about latency / (window + latency) (18% for 1-8-row requests at 64 clients)."""
    rows = sum(d[3] for d in done if d[4] == 200 and t_from <= d[1] <= t_to)
    return rows / (t_to - t_from)


async def open_loop(url: str, requests: list, rate: float, seconds: float):
    """Requests sent at Poisson arrival times, ``rate`` per second, whatever the answers;
    latency counted from the scheduled send time."""
    import aiohttp

    rng = random.Random(7)
    times, t = [], 0.0
    while t < seconds and len(times) < len(requests):
        t += rng.expovariate(rate)
        times.append(t)
    done: list = []
    connector = aiohttp.TCPConnector(limit=1024)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t_start = time.perf_counter()

        async def one(i: int, at: float) -> None:
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            adapter, rows = requests[i]
            try:
                status, body = await _send(session, url + "/v1/classify", adapter, rows)
            except aiohttp.ClientError as exc:
                status, body = -1, repr(exc)
            done.append((t_start + at, time.perf_counter(), i, len(rows), status, body))

        await asyncio.gather(*(one(i, at) for i, at in enumerate(times)))
    return done


def summarize(window: list, elapsed: float, requests: list, expected: dict) -> dict:
    latencies = [d[1] - d[0] for d in window]
    ok = [d for d in window if d[4] == 200]
    wrong = 0
    for _, _, i, _, _, body in ok:
        adapter, rows = requests[i]
        for text, got in zip(rows, body["results"], strict=True):
            label, probs = expected[(adapter, text)]
            close = all(abs(got["probs"][k] - v) <= 1e-4 for k, v in probs.items())
            wrong += int(got["label"] != label or not close)
    rows = sum(d[3] for d in ok)
    return {
        "requests": len(window),
        "rows": rows,
        "rows_per_s": rows / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)) if latencies else None,
        "errors": len(window) - len(ok),
        "error_examples": sorted({f"{d[4]}: {str(d[5])[:160]}" for d in window if d[4] != 200})[:3],
        "wrong_answers": wrong,
    }


# -- the run ------------------------------------------------------------------------------


def run_server(kind, args, registry, names, work, scenarios, expected) -> dict:
    process, url = start(kind, registry, names, work, resident=16)
    results: dict[str, Any] = {"memory_16_resident": memory(process.pid)}
    try:
        for key, (requests, clients) in scenarios.items():
            bounds: dict[str, float] = {}
            window, elapsed, done = asyncio.run(
                closed_loop(url, requests, clients, args.seconds, args.warmup, bounds)
            )
            results[key] = summarize(window, elapsed, requests, expected)
            # throughput: rows answered inside the window (latency: requests sent in it)
            results[key]["rows_per_s"] = served_in_window(done, bounds["start"], bounds["stop"])
            print(f"  {kind:8s} {key:28s} {_line(results[key])}", flush=True)
        results["memory_after_load"] = memory(process.pid)
    finally:
        stop(process)
    return results


def open_loop_runs(kind, args, registry, names, work, requests, rates, expected) -> list:
    """``rates``: {fraction of saturation: requests per second}."""
    process, url = start(kind, registry, names, work, resident=16)
    out = []
    try:
        for fraction, rate in rates.items():
            done = asyncio.run(open_loop(url, requests, rate, args.seconds))
            t_first = min(d[0] for d in done)
            elapsed = max(d[1] for d in done) - t_first
            row = {
                "fraction_of_saturation": fraction,
                "offered_requests_per_s": rate,
                **summarize(done, elapsed, requests, expected),
            }
            out.append(row)
            print(f"  {kind:8s} open loop {rate:7.1f} req/s   {_line(row)}", flush=True)
    finally:
        stop(process)
    return out


def memory_with(kind: str, registry: Path, names: list[str], work: Path) -> dict:
    process, url = start(kind, registry, names, work, resident=len(names))
    try:
        import urllib.request

        payload = json.dumps({"adapter": names[0], "inputs": ["warm up"]}).encode()
        request = urllib.request.Request(
            url + "/v1/classify", payload, {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=60).read()
        return memory(process.pid)
    finally:
        stop(process)


def _line(r: dict) -> str:
    return (
        f"{r['rows_per_s']:8.1f} rows/s  p50 {r['p50_ms'] or 0:8.1f} ms  "
        f"p99 {r['p99_ms'] or 0:8.1f} ms  errors {r['errors']}  wrong {r['wrong_answers']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peftkit-bench-serve")
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--rates", default="0.25,0.5,0.75,0.9,1.0,1.2", help="x saturation")
    parser.add_argument("--out", default="bench_serve")
    parser.add_argument(
        "--server-args", default="", help="more peftkit serve flags, e.g. '--max-wait-ms 5'"
    )
    args = parser.parse_args()
    SERVER_ARGS[:] = args.server_args.split()
    clients = [int(c) for c in args.clients.split(",")]
    fractions = [float(r) for r in args.rates.split(",")]
    if args.quick:
        clients, fractions, args.seconds, args.warmup, args.steps = [1, 8], [0.5], 2.0, 0.5, 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    registry = work / "registry"
    env = environment()
    print(f"adapters: training or reusing {len(ADAPTERS)} in {registry}", flush=True)
    setup = build_registry(work, args.steps)
    texts = setup["texts"]
    names = list(texts)
    expected = expected_answers(registry, texts)
    n = 200_000  # more than any level can send: the clock bounds each level
    loads = {
        f"{rows}/{skew}": workload(texts, span, skew, n, seed=1)
        for rows, span in (("1-row", (1, 1)), ("1-8-rows", (1, 8)))
        for skew in ("uniform", "zipf")
    }
    scenarios = {f"{w}/{c}-clients": (loads[w], c) for w in loads for c in clients}
    print("offline limit (predict_mixed, no HTTP)", flush=True)
    forward_ms: dict[int, float] = {}
    offline = {
        "1-row/uniform": offline_limit(
            registry, loads["1-row/uniform"][:512], [1, 2, 4, 8, 16, 32, 64], forward_ms
        ),
        "1-8-rows/uniform": offline_limit(
            registry, loads["1-8-rows/uniform"][:512], [8, 16, 32, 64]
        ),
    }
    print("  one forward, one row per adapter: " + ", ".join(
        f"{k} rows {v:.1f} ms" for k, v in forward_ms.items()))  # fmt: skip
    for w, by_size in offline.items():
        print(f"  {w}: " + ", ".join(f"{s}: {v:.1f} rows/s" for s, v in by_size.items()))
    servers = {}
    for kind in ("peftkit", "naive"):
        print(f"closed loop: {kind}", flush=True)
        servers[kind] = run_server(kind, args, registry, names, work, scenarios, expected)
    top = f"1-row/uniform/{max(clients)}-clients"
    saturation_rows = servers["peftkit"][top]["rows_per_s"]
    rates = {f: round(f * saturation_rows, 1) for f in fractions}
    open_loops = {}
    for kind in ("peftkit", "naive"):
        print(f"open loop: {kind} (one-row requests)", flush=True)
        open_loops[kind] = open_loop_runs(
            kind, args, registry, names, work, loads["1-row/uniform"], rates, expected
        )
    mem = {}
    if not args.quick:
        from peftkit import Registry

        reg = Registry(registry)
        extra = []
        for k in range(48):  # 48 more names: copies of the 16 adapters' folders
            name = f"copy{k:02d}-{names[k % 16]}"
            if not reg.list(name):
                reg.register(name, reg.get(names[k % 16]).path)
            extra.append(name)
        for kind in ("peftkit", "naive"):
            mem[kind] = {
                "16": memory_with(kind, registry, names, work),
                "64": memory_with(kind, registry, names + extra, work),
            }
    from peftkit.config.serve import ServeConfig

    max_rows = int(ServeConfig("registry").max_batch_rows)
    for flag, value in zip(SERVER_ARGS, SERVER_ARGS[1:], strict=False):
        if flag == "--max-batch-rows":
            max_rows = int(value)
    bound = {"forward_ms": forward_ms, "max_batch_rows": max_rows, "rows": []}
    for fraction, rate in rates.items():
        p50, p99 = ideal_batcher(forward_ms, rate, max_rows)
        bound["rows"].append({"fraction_of_saturation": fraction, "offered_requests_per_s": rate,
                              "p50_ms": p50, "p99_ms": p99})  # fmt: skip
        print(f"  ideal batcher {rate:7.1f} req/s   p50 {p50:8.1f} ms  p99 {p99:8.1f} ms")
    payload = report(args, env, setup, offline, servers, open_loops, mem, clients, bound)
    path = write_results(args.out, payload, quick=args.quick)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def report(args, env, setup, offline, servers, open_loops, mem, clients, bound) -> dict:
    rows = []
    for key in servers["peftkit"]:
        if key.count("/") != 2:
            continue
        p, q = servers["peftkit"][key], servers["naive"][key]
        w = key.rsplit("/", 1)[0]
        limit = max(offline.get(w, offline.get(w.replace("zipf", "uniform"), {0: 0})).values())
        rows.append(
            {
                "scenario": key,
                "peftkit": p,
                "naive": q,
                "peftkit_vs_naive_rows_per_s": p["rows_per_s"] / (q["rows_per_s"] or float("nan")),
                "peftkit_vs_offline_limit": p["rows_per_s"] / limit if limit else None,
            }
        )
    print(
        table(
            [
                [
                    r["scenario"],
                    f"{r['peftkit']['rows_per_s']:.1f}",
                    f"{r['naive']['rows_per_s']:.1f}",
                    f"{r['peftkit_vs_naive_rows_per_s']:.2f}",
                    f"{r['peftkit_vs_offline_limit']:.2f}",
                    _ms(r["peftkit"]),
                    _ms(r["naive"]),
                ]
                for r in rows
            ],
            [
                "scenario",
                "peftkit r/s",
                "naive r/s",
                "x naive",
                "x offline",
                "peftkit p50/p99 ms",
                "naive p50/p99 ms",
            ],
        )  # fmt: skip
    )
    lone = servers["peftkit"]["1-row/uniform/1-clients"]["p50_ms"]
    half = min(open_loops["peftkit"], key=lambda r: abs(r["fraction_of_saturation"] - 0.5))
    top = max(clients)
    goals = {
        "one_row_at_top_clients_vs_naive": _ratio(rows, f"1-row/uniform/{top}-clients"),
        "one_to_eight_rows_at_top_clients_vs_naive": _ratio(
            rows, f"1-8-rows/uniform/{top}-clients"
        ),
        "p99_at_half_saturation_over_lone_p50": (half["p99_ms"] / lone) if lone else None,
        "half_saturation_offered_requests_per_s": half["offered_requests_per_s"],
        # the same ratio for the ideal batcher (its lone request: one one-row forward)
        "ideal_batcher_p99_at_half_saturation_over_its_lone_latency": next(
            r["p99_ms"]
            for r in bound["rows"]
            if r["fraction_of_saturation"] == half["fraction_of_saturation"]
        )
        / bound["forward_ms"][1],  # fmt: skip
        "errors": sum(r[k]["errors"] for r in rows for k in ("peftkit", "naive")),
        "wrong_answers": sum(r[k]["wrong_answers"] for r in rows for k in ("peftkit", "naive")),
    }
    return {
        "environment": env,
        "setup": {
            "model": "minilm",
            "adapters": setup["adapters"],
            "steps": args.steps,
            "seconds_per_level": args.seconds,
            "warmup_s": args.warmup,
            "zipf_s": ZIPF_S,
            "server_settings": f"peftkit serve defaults ({_defaults()}) "
            + (f"with {' '.join(SERVER_ARGS)}, " if SERVER_ARGS else "")
            + "max_resident 16, every adapter preloaded; naive: bench/naive_server.py",
            "load_generator": "aiohttp in the benchmark's process (shares the 2 cores)",
            "closed_loop_rows_per_s": "rows answered inside each level's measured window, "
            "whenever sent; latency percentiles over the requests sent inside it",
        },
        "offline_limit_rows_per_s": offline,
        "closed_loop": rows,
        "open_loop": open_loops,
        "ideal_batcher": {
            **bound,
            "what": "the open loop's one-row Poisson arrivals at a batcher with no HTTP and no "
            "contention that runs, whenever free, one forward over all that waits (up to "
            "max_batch_rows) taking the median offline time of a forward that size: a lower "
            "bound on any batching server's latency with this model on this CPU",
        },
        "memory": mem,
        "goals": goals,
    }


def _ms(r: dict) -> str:
    """``p50 / p99`` in ms; ``-`` for a level that answered nothing in its window."""
    if r["p50_ms"] is None:
        return "-"
    return f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}"


def _defaults() -> str:
    from peftkit.config.serve import ServeConfig

    config = ServeConfig("registry")
    return ", ".join(f"{key} {getattr(config, key):g}" for key in ("max_batch_rows", "max_wait_ms"))


def _ratio(rows: list, key: str) -> float | None:
    match = [r for r in rows if r["scenario"] == key]
    return match[0]["peftkit_vs_naive_rows_per_s"] if match else None


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, colour in (("peftkit", "tab:blue"), ("naive", "tab:orange")):
        for w, marker in (("1-row/uniform", "o"), ("1-8-rows/uniform", "s")):
            pts = [r[kind] for r in payload["closed_loop"] if r["scenario"].startswith(w + "/")]
            xs = [p["rows_per_s"] for p in pts]
            left.plot(xs, [p["p50_ms"] for p in pts], marker=marker, color=colour,
                      label=f"{kind} {w} p50")  # fmt: skip
            left.plot(xs, [p["p99_ms"] for p in pts], marker=marker, color=colour, ls="--",
                      label=f"{kind} {w} p99")  # fmt: skip
        pts = payload["open_loop"].get(kind, [])
        xs = [p["offered_requests_per_s"] for p in pts]
        right.plot(xs, [p["p50_ms"] for p in pts], marker="o", color=colour, label=f"{kind} p50")
        right.plot(xs, [p["p99_ms"] for p in pts], marker="o", color=colour, ls="--",
                   label=f"{kind} p99")  # fmt: skip
    ideal = payload.get("ideal_batcher", {}).get("rows", [])
    if ideal:
        xs = [p["offered_requests_per_s"] for p in ideal]
        right.plot(xs, [p["p50_ms"] for p in ideal], color="grey", label="ideal batcher p50")
        right.plot(xs, [p["p99_ms"] for p in ideal], color="grey", ls="--",
                   label="ideal batcher p99")  # fmt: skip
    left.set(xlabel="rows/s (closed loop: 1, 8, 32, 64 clients)", ylabel="latency ms",
             yscale="log", title="throughput vs latency")  # fmt: skip
    right.set(xlabel="offered one-row requests/s (open loop)", ylabel="latency ms",
              yscale="log", title="where latency turns up")  # fmt: skip
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(
        f"peftkit serve vs FastAPI + peft, 16 MiniLM adapters ({payload['environment']['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
