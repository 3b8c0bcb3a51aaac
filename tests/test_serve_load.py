"""``peftkit serve`` under load (issue 25): one server process on a loopback port over a
registry of 8 adapters on the tiny BERT (LoRA and probes, three label sets), started with
``--max-resident 4`` so that adapters are loaded (hash and fingerprint checked) and evicted
while 16 clients send mixed requests. Every row answered equals ``AdaptedModel.predict``
for that row alone; an alias moved under load answers from the old version, then only the
new one; an adapter corrupted under load fails alone (409) while the others keep serving;
SIGTERM with requests in flight answers them in full and exits 0 (the last test)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import synthetic
from test_serve import TEXTS as SERVE_TEXTS
from test_serve import _error, _free_port, _metric

from peftkit import AdaptedModel, Registry, TrainConfig, load_base, load_preset, train

# name: (synthetic task, preset, seed): same-task adapters differ by seed, so an answer
# from the wrong adapter of the same label set would not match
ADAPTERS = {
    "sentiment": ("sentiment", "lora", 0),
    "sentiment-b": ("sentiment", "lora", 1),
    "sentiment-probe": ("sentiment", "probe", 0),
    "topic": ("topic", "lora", 0),
    "topic-b": ("topic", "lora", 1),
    "topic-probe": ("topic", "probe", 0),
    "spam": ("spam", "lora", 0),
    "spam-probe": ("spam", "probe", 0),
}
ALIASED = "release"  # @1 registered at start; @2, trained apart, registered by its test
VICTIM = "victim"  # registered at start, corrupted under load by its test
CLIENTS, PER_CLIENT = 16, 50
SERVER_FLAGS = {
    "max_resident": 4,
    "max_batch_rows": 8,
    "max_wait_ms": 5,
    "max_queue_rows": 512,
    "max_request_rows": 16,
    "request_timeout_s": 30,
}
TEXTS = [*SERVE_TEXTS, "this phone software is fun", "it was about the company"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    registry: Path
    folders: dict[str, Path]  # adapter folders as trained (release-v2 not yet registered)
    offline: AdaptedModel
    cache: dict = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def expected(self, ref: str, text: str, pair: str | None) -> Any:
        """The offline prediction for this one row alone (cached)."""
        key = (ref, text, pair)
        if key not in self.cache:
            pairs = None if pair is None else [pair]
            self.cache[key] = self.offline.predict([text], adapter=ref, text_pairs=pairs)[0]
        return self.cache[key]


def _train(base, root: Path, name: str, task: str, preset: str, seed: int) -> Path:
    config = TrainConfig(
        max_steps=2,
        batch_size=8,
        learning_rate=5e-2,
        progress=False,
        patience=None,
        seed=seed,
    )
    data = synthetic(task, n=48, seed=seed)
    with train(base, load_preset(preset), data, config, root / name) as result:
        return result.model.save_pretrained(root / name / "adapter")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-load")
    base = load_base(tiny_models["bert"])
    registry = Registry(root / "registry")
    folders = {}
    for name, (task, preset, seed) in ADAPTERS.items():
        folders[name] = _train(base, root / "runs", name, task, preset, seed)
        registry.register(name, folders[name])
    folders[f"{ALIASED}-v1"] = _train(base, root / "runs", "release-v1", "topic", "lora", 2)
    folders[f"{ALIASED}-v2"] = _train(base, root / "runs", "release-v2", "topic", "lora", 3)
    registry.register(ALIASED, folders[f"{ALIASED}-v1"])
    registry.register(VICTIM, folders["spam"])
    registry.close()

    port = _free_port()
    command = [sys.executable, "-m", "peftkit.cli", "serve", "--registry", str(root / "registry")]
    command += ["--port", str(port), "--adapters", "sentiment,topic-probe"]
    for key, value in SERVER_FLAGS.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=10) as probe:
        while True:
            try:
                if probe.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not get ready:\n{log_path.read_text()}")
            time.sleep(0.2)
    offline = AdaptedModel(base, Registry(root / "registry", read_only=True), max_resident=16)
    yield Server(url, process, log_path, root / "registry", folders, offline)
    offline.close()
    if process.poll() is None:
        process.kill()
        process.wait()


# -- clients ------------------------------------------------------------------------------


@dataclass
class Call:
    """One request as sent and what came back (status -1: a transport error)."""

    client: int
    body: dict
    sent: float
    done: float = 0.0
    status: int = 0
    answer: Any = None
    error: str = ""


def _rows(rng: random.Random, names: list[str], pinned: float = 0.2) -> dict:
    """A request of 1-4 rows over ``names`` (some pinned to @1, some with a text_pair);
    one adapter for the whole request, or one per row."""
    n = rng.randint(1, 4)
    if rng.random() < 0.3:  # the request's adapter for every row
        name = rng.choice(names)
        ref = f"{name}@1" if rng.random() < pinned else name
        return {"adapter": ref, "inputs": [rng.choice(TEXTS) for _ in range(n)]}
    inputs = []
    for _ in range(n):
        name = rng.choice(names)
        row = {"text": rng.choice(TEXTS), "adapter": f"{name}@1" if rng.random() < pinned else name}
        if rng.random() < 0.3:
            row["text_pair"] = rng.choice(TEXTS)
        inputs.append(row)
    return {"inputs": inputs}


def _hammer(
    url: str,
    make: Any,
    *,
    clients: int = CLIENTS,
    per_client: int = PER_CLIENT,
    stop: threading.Event | None = None,
    seconds: float = 60,
    until_error: bool = False,
) -> tuple[list[threading.Thread], list[Call]]:
    """Start ``clients`` threads, each sending up to ``per_client`` requests made by
    ``make(rng)`` one after another, until ``stop`` is set or ``seconds`` pass (or its
    first transport error, with ``until_error``). Returns the threads and the calls list
    they fill (join the threads before reading it as final)."""
    calls: list[Call] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(per_client):
                if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
                    return
                call = Call(index, make(rng), time.monotonic())
                try:
                    response = http.post("/v1/classify", json=call.body)
                    call.status = response.status_code
                    call.answer = response.json()
                except httpx.TransportError as exc:
                    call.status, call.error = -1, f"{type(exc).__name__}: {exc}"
                except ValueError as exc:  # a body that is not JSON (cut short?)
                    call.status, call.error = -2, f"{type(exc).__name__}: {exc}"
                call.done = time.monotonic()
                with lock:
                    calls.append(call)
                if until_error and call.status < 0:
                    return

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    return threads, calls


def _await_sent_after(calls: list, moment: float, count: int, deadline: float) -> None:
    """Wait (until ``deadline``) for ``count`` requests sent after ``moment`` to be answered."""
    while time.monotonic() < deadline:
        if sum(1 for c in list(calls) if c.sent > moment) >= count:
            return
        time.sleep(0.01)


def _join(threads: list[threading.Thread], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads did not finish in time"


def _asked(body: dict) -> list[tuple[str, str, str | None]]:
    """Each row of a request as (adapter as asked, text, text_pair)."""
    rows = []
    for item in body["inputs"]:
        if isinstance(item, str):
            rows.append((body["adapter"], item, None))
        else:
            rows.append(
                (item.get("adapter") or body["adapter"], item["text"], item.get("text_pair"))
            )
    return rows


def _check_answer(server: Server, call: Call, refs: dict[str, set[str]] | None = None) -> list[str]:
    """Assert a 200 answer: one result per row, each equal to the offline prediction of the
    version it reports (from ``refs[asked]``, default ``{name@1}``). The refs answered."""
    assert call.status == 200, (call.status, call.answer, call.error)
    results = call.answer["results"]
    rows = _asked(call.body)
    assert len(results) == len(rows), call.answer
    answered = []
    for (asked, text, pair), got in zip(rows, results, strict=True):
        name = asked.partition("@")[0]
        allowed = {f"{name}@1"} if refs is None else refs[asked]
        assert got["ref"] in allowed and got["adapter"] == asked, (got, asked)
        want = server.expected(got["ref"], text, pair)
        assert got["label"] == want.label, (got, want, text, pair)
        assert set(got["probs"]) == set(want.probs), (got, want)
        np.testing.assert_allclose(
            [got["probs"][k] for k in want.probs], list(want.probs.values()), atol=1e-5
        )
        assert abs(got["score"] - want.score) < 1e-5
        answered.append(got["ref"])
    return answered


def _resident(server: Server) -> list[str]:
    with server.client() as http:
        return http.get("/ready").json()["resident"]


def _metrics(server: Server, *names: str, **labels: str) -> list[float]:
    with server.client() as http:
        return [_metric(http, name, **labels) for name in names]


# -- 1. mixed load over 8 adapters ----------------------------------------------------------


def test_16_clients_x_50_requests_over_8_adapters_each_row_equals_offline(server):
    # the check below is only worth something if same-label adapters answer differently
    for a, b in [("sentiment", "sentiment-b"), ("topic", "topic-b"), ("spam", "spam-probe")]:
        pa = [list(server.expected(f"{a}@1", t, None).probs.values()) for t in TEXTS]
        pb = [list(server.expected(f"{b}@1", t, None).probs.values()) for t in TEXTS]
        assert np.abs(np.array(pa) - np.array(pb)).max() > 1e-3, (a, b)
    forwards, rows_forwarded, loads, adapters_sum = _metrics(
        server,
        "peftkit_forward_rows_count",
        "peftkit_forward_rows_sum",
        "peftkit_adapter_loads_total",
        "peftkit_forward_adapters_sum",
    )
    names = list(ADAPTERS)
    start = time.monotonic()
    threads, calls = _hammer(server.url, lambda rng: _rows(rng, names), seconds=90)
    _join(threads)
    elapsed = time.monotonic() - start
    assert len(calls) == CLIENTS * PER_CLIENT, f"{len(calls)} requests in {elapsed:.0f} s"
    assert [c for c in calls if c.status != 200] == []
    seen = set()
    for call in calls:
        seen.update(_check_answer(server, call))
    assert seen == {f"{n}@1" for n in names}
    sent_rows = sum(len(c.body["inputs"]) for c in calls)
    after = _metrics(
        server,
        "peftkit_forward_rows_count",
        "peftkit_forward_rows_sum",
        "peftkit_adapter_loads_total",
        "peftkit_forward_adapters_sum",
    )
    n_forwards = after[0] - forwards
    assert after[1] - rows_forwarded == sent_rows
    # rows of several requests shared forwards: fewer forwards than requests
    assert n_forwards < len(calls), (n_forwards, len(calls))
    assert after[3] - adapters_sum > n_forwards  # some forwards mixed adapters
    # 8 adapters through 4 resident places: some were evicted and loaded again
    assert after[2] - loads > len(names), after[2] - loads
    assert _metrics(server, "peftkit_adapter_loads_total", status="error") == [0]
    resident = _resident(server)
    assert 0 < len(resident) <= SERVER_FLAGS["max_resident"], resident


# -- 2. an alias moved under load -----------------------------------------------------------


def test_an_alias_moved_under_load_answers_v1_then_only_v2(server):
    registry = Registry(server.registry)
    v2 = registry.register(ALIASED, server.folders[f"{ALIASED}-v2"])
    assert v2.ref == f"{ALIASED}@2"
    registry.alias(f"{ALIASED}@1", "production")
    # every text tells v1 from v2: an answer matches the version it names, and only it
    for text in TEXTS:
        p1 = list(server.expected(f"{ALIASED}@1", text, None).probs.values())
        p2 = list(server.expected(f"{ALIASED}@2", text, None).probs.values())
        assert np.abs(np.array(p1) - np.array(p2)).max() > 1e-3, text
    aliased = f"{ALIASED}@production"
    others = ["spam", "topic-b", "sentiment-probe"]

    def make(rng: random.Random) -> dict:
        inputs: list[Any] = [
            {"text": rng.choice(TEXTS), "adapter": aliased} for _ in range(rng.randint(1, 3))
        ]
        if rng.random() < 0.3:  # other adapters in the same forwards
            inputs.append({"text": rng.choice(TEXTS), "adapter": rng.choice(others)})
        return {"inputs": inputs}

    stop = threading.Event()
    threads, calls = _hammer(server.url, make, per_client=60, stop=stop, seconds=60)
    try:
        deadline = time.monotonic() + 30
        while len(calls) < 4 * CLIENTS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 4 * CLIENTS, "too few requests answered before the move"
        assert registry.alias(f"{ALIASED}@2", "production") == (f"{ALIASED}@1", f"{ALIASED}@2")
        moved = time.monotonic()
        _await_sent_after(calls, moved, 4 * CLIENTS, deadline)
    finally:
        stop.set()
        _join(threads)
    assert [c for c in calls if c.status != 200] == []
    refs = {aliased: {f"{ALIASED}@1", f"{ALIASED}@2"}, **{o: {f"{o}@1"} for o in others}}
    before, after = set(), set()
    for call in calls:
        answered = _check_answer(server, call, refs)
        ours = {r for r in answered if r.startswith(f"{ALIASED}@")}
        (after if call.sent > moved else before).update(ours)
        if call.sent > moved:  # sent once the move had returned: only v2
            assert ours == {f"{ALIASED}@2"}, (call.body, call.answer)
    assert sum(1 for c in calls if c.sent > moved) >= 4 * CLIENTS
    assert f"{ALIASED}@1" in before and after == {f"{ALIASED}@2"}
    with server.client() as http:
        listed = http.get(f"/v1/adapters/{ALIASED}").json()
    assert listed["aliases"] == {"production": f"{ALIASED}@2"}
    registry.close()


# -- 3. an adapter corrupted under load -----------------------------------------------------


def test_an_adapter_corrupted_under_load_fails_alone_with_409(server):
    with server.client() as http:  # served once, then evicted by the load below
        first = Call(0, {"adapter": VICTIM, "inputs": ["free prize now"]}, 0.0)
        response = http.post("/v1/classify", json=first.body)
        first.status, first.answer = response.status_code, response.json()
    assert _check_answer(server, first) == [f"{VICTIM}@1"]
    names = list(ADAPTERS)
    stop = threading.Event()
    threads, calls = _hammer(
        server.url, lambda rng: _rows(rng, names), per_client=60, stop=stop, seconds=60
    )
    errors_before = _metrics(server, "peftkit_adapter_loads_total", status="error")[0]
    refused: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while f"{VICTIM}@1" in _resident(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"{VICTIM}@1" not in _resident(server), "the load never evicted it"
        weights = Registry(server.registry, read_only=True).get(VICTIM).path
        weights = weights / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        corrupted = time.monotonic()
        with server.client() as http:
            for i in range(12):
                if i % 3 == 2:  # one row of it among others: the request fails as a whole
                    body = {"inputs": [{"text": "hello ok", "adapter": "spam"}, "bad film"]}
                    body["adapter"] = VICTIM
                else:
                    body = {"adapter": VICTIM, "inputs": ["free prize now", "hello ok"]}
                refused.append(_error(http.post("/v1/classify", json=body), 409))
                time.sleep(0.02)
        # the load goes on after the refusals
        _await_sent_after(calls, corrupted, 4 * CLIENTS, deadline)
    finally:
        stop.set()
        _join(threads)
    for message in refused:
        assert f"{VICTIM}@1" in message and "does not match" in message, message
        assert str(server.registry) not in message and str(server.registry.parent) not in message
    assert [c for c in calls if c.status != 200] == []
    for call in calls:
        _check_answer(server, call)
    assert sum(1 for c in calls if c.sent > corrupted) >= 4 * CLIENTS
    errors = _metrics(server, "peftkit_adapter_loads_total", status="error")[0] - errors_before
    assert errors == len(refused), errors  # each refusal tried the load (and only those)
    assert f"{VICTIM}@1" not in _resident(server)
    with server.client() as http:
        assert _metric(http, "peftkit_requests_total", adapter=VICTIM, status="409") == 8
        assert _metric(http, "peftkit_requests_total", adapter="(mixed)", status="409") == 4


# -- 4. SIGTERM with requests in flight (keep last: it stops the server) --------------------


def test_sigterm_with_16_clients_mid_request_answers_in_full_and_exits_0(server):
    names = list(ADAPTERS)
    threads, calls = _hammer(
        server.url, lambda rng: _rows(rng, names), per_client=200, seconds=60, until_error=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every client has had answers: all are mid-stream
        if len({c.client for c in list(calls)}) == CLIENTS and len(calls) >= 3 * CLIENTS:
            break
        time.sleep(0.01)
    assert len({c.client for c in list(calls)}) == CLIENTS
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(timeout=60) == 0
    finally:
        _join(threads)
    statuses = {c.status for c in calls}
    assert statuses <= {200, -1}, [(c.status, c.answer, c.error) for c in calls if c.status != 200]
    for call in calls:
        if call.status == 200:
            _check_answer(server, call)
        else:  # refused or closed before an answer began; never a body cut short
            assert "complete message body" not in call.error, call.error
    # requests in flight when the signal came were answered in full after it
    assert sum(1 for c in calls if c.status == 200 and c.done > signalled) >= 1
    assert sum(1 for c in calls if c.status == -1) >= 1  # and it did stop taking new ones
    assert all(c.status == -1 for c in calls if c.sent > signalled + 5)
    text = server.log.read_text()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    assert "stopped" in text
