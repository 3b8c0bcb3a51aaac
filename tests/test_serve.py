"""``peftkit serve`` for real: a server process on a loopback port over a registry of
adapters trained for a few steps on the tiny BERT, called with httpx. Every row answered
under concurrency equals ``AdaptedModel.predict`` for that row alone; each error status,
auth, the admin routes and /metrics; SIGTERM stops it cleanly (the last test). The
startup checks that refuse before the base loads run in-process."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import synthetic
from prometheus_client.parser import text_string_to_metric_families

from peftkit import AdaptedModel, Registry, TrainConfig, load_base, load_preset, train
from peftkit.config.serve import ServeConfig, load_serve_config
from peftkit.errors import ConfigError, IntegrityError
from peftkit.serving.http import status_of
from peftkit.serving.scheduler import Overloaded, RequestTimeout
from peftkit.serving.serve import add_arguments, main

ADAPTERS = {"sentiment": "lora", "topic": "lora", "spam": "probe"}
USER_KEY, ADMIN_KEY = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"
TEXTS = [
    "the movie was great",
    "stock market price",
    "free prize now",
    "bad film",
    "the election vote",
    "hello ok",
    "a boring game about the team",
    "call now to win cash",
]
LIMITS = {"max_request_rows": 16, "max_text_chars": 300, "max_body_bytes": 20_000}


def _register(base, registry, root: Path) -> None:
    config = TrainConfig(
        max_steps=3, batch_size=8, learning_rate=5e-2, progress=False, patience=None
    )
    for name, preset in ADAPTERS.items():
        with train(base, load_preset(preset), synthetic(name), config, root / name) as result:
            registry.register(name, result.model.save_pretrained(root / name / "adapter"))
    # a fourth adapter whose files are then damaged: it must fail alone
    registry.register("broken", root / "topic" / "adapter")
    weights = registry.get("broken").path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, registry: Path, port: int) -> subprocess.Popen:
    keys = root / "keys.txt"
    keys.write_text(f"# keys\n{USER_KEY}\n{ADMIN_KEY} admin\n")
    limits = [a for k, v in LIMITS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    command = [sys.executable, "-m", "peftkit.cli", "serve", "--registry", str(registry)]
    command += ["--port", str(port), "--adapters", "sentiment,spam@1", "--api-key-file"]
    command += [str(keys), "--max-wait-ms", "5", "--max-batch-rows", "8", *limits]
    command += ["--threads", "1"]  # one torch thread (not OMP_NUM_THREADS: the flag is tested)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONUNBUFFERED"] = "1"
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed by the fixture)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """(client, offline model, process, log path): one server for the whole module."""
    root = tmp_path_factory.mktemp("serve")
    base = load_base(tiny_models["bert"])
    registry = Registry(root / "registry")
    _register(base, registry, root)
    port = _free_port()
    process = _start(root, root / "registry", port)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=30,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the server did not get ready:\n{(root / 'server.log').read_text()}")
        time.sleep(0.2)
    offline = AdaptedModel(base, Registry(root / "registry", read_only=True))
    yield client, offline, process, root / "server.log"
    client.close()
    offline.close()
    if process.poll() is None:
        process.kill()
        process.wait()


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    assert "\n" not in body["error"]
    return body["error"]


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- classify -----------------------------------------------------------------------------


def test_the_server_runs_forwards_on_the_threads_it_was_given(server):
    log = server[3].read_text()
    assert "(API docs at /docs; 1 torch threads)" in log, log[-2000:]


def test_health_ready_and_metrics_are_open_but_v1_needs_a_key(server):
    client, _, _, _ = server
    bare = httpx.Client(base_url=client.base_url, timeout=10)
    assert bare.get("/health").json() == {"status": "alive"}
    ready = bare.get("/ready").json()
    assert ready["ready"] is True and {"sentiment@1", "spam@1"} <= set(ready["resident"])
    assert bare.get("/metrics").status_code == 200
    assert "authorization" in _error(bare.get("/v1/adapters"), 401).lower()
    wrong = {"Authorization": "Bearer not-a-key-0123456789"}
    assert "not valid" in _error(bare.get("/v1/adapters", headers=wrong), 401)
    payload = {"adapter": "sentiment", "inputs": ["good"]}
    assert bare.post("/v1/classify", json=payload).status_code == 401
    assert bare.get("/docs").status_code == 200 and "paths" in bare.get("/openapi.json").json()


def test_one_adapter_answers_label_score_probs_and_the_version(server):
    client, offline, _, _ = server
    response = client.post("/v1/classify", json={"adapter": "sentiment", "inputs": TEXTS[:3]})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = offline.predict(TEXTS[:3], adapter="sentiment@1")
    for got, want in zip(results, expected, strict=True):
        assert got["ref"] == "sentiment@1" and got["adapter"] == "sentiment"  # as asked
        assert got["label"] == want.label and abs(got["score"] - want.score) < 1e-5
        assert set(got["probs"]) == {"negative", "positive"}
    short = client.post(
        "/v1/classify",
        json={"adapter": "topic", "inputs": TEXTS[:2], "top_k": 2, "return_probs": True},
    ).json()["results"]
    assert all(len(r["probs"]) == 2 and r["label"] == next(iter(r["probs"])) for r in short)
    bare = client.post(
        "/v1/classify", json={"adapter": "topic", "inputs": ["x"], "return_probs": False}
    )
    assert "probs" not in bare.json()["results"][0]


def test_concurrent_mixed_requests_each_row_equals_the_offline_prediction(server):
    client, offline, _, _ = server
    names = list(ADAPTERS)
    rng = random.Random(0)
    requests = []
    for _ in range(8 * 5):
        rows = []
        for _ in range(rng.randint(1, 4)):
            row = {"text": rng.choice(TEXTS), "adapter": rng.choice(names)}
            if rng.random() < 0.3:
                row["text_pair"] = rng.choice(TEXTS)
            rows.append(row)
        requests.append(rows)
    answers: dict[int, list] = {}

    def worker(index: int) -> None:
        for i in range(index, len(requests), 8):
            response = client.post("/v1/classify", json={"inputs": requests[i], "top_k": None})
            assert response.status_code == 200, response.text
            answers[i] = response.json()["results"]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == len(requests)
    for i, rows in enumerate(requests):
        for row, got in zip(rows, answers[i], strict=True):
            pair = [row["text_pair"]] if "text_pair" in row else None
            want = offline.predict([row["text"]], adapter=row["adapter"], text_pairs=pair)[0]
            assert got["ref"] == f"{row['adapter']}@1" and got["label"] == want.label
            np.testing.assert_allclose(
                [got["probs"][k] for k in want.probs], list(want.probs.values()), atol=1e-5
            )
    assert _metric(client, "peftkit_forward_rows_count") < sum(len(r) for r in requests)


# -- errors -------------------------------------------------------------------------------


def test_an_unknown_adapter_is_404_naming_the_closest(server):
    client, _, _, _ = server
    message = _error(client.post("/v1/classify", json={"adapter": "topik", "inputs": ["x"]}), 404)
    assert "'topik'" in message and "did you mean 'topic'" in message
    missing = client.post("/v1/classify", json={"adapter": "topic@7", "inputs": ["x"]})
    assert "no version '7'" in _error(missing, 404) and "1" in _error(missing, 404)
    assert "did you mean" in _error(client.get("/v1/adapters/sentimnt"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"adapter": "topic", "inputs": [3]}, "inputs.0"),
        ({"adapter": "topic", "inputs": [{"txt": "a"}]}, "inputs.0.txt"),
        ({"adapter": "topic", "inputs": ["a"], "top_k": "many"}, "top_k"),
        ({"adapter": "topic", "input": ["a"]}, "did you mean 'inputs'"),
        ({"adapter": "topic", "inputs": []}, "inputs is empty"),
        ({"inputs": ["a"]}, "inputs.0: no adapter"),
        ({"adapter": "../etc", "inputs": ["a"]}, "adapter: invalid adapter name '../etc'"),
        ({"inputs": [{"text": "a", "adapter": "/abs/path"}]}, "inputs.0.adapter"),
    ],
)
def test_malformed_requests_are_422_naming_the_field(server, body, field):
    client, _, _, _ = server
    assert field in _error(client.post("/v1/classify", json=body), 422)


def test_adapter_names_in_paths_never_reach_the_file_system(server):
    client, _, _, _ = server
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "topic@..%2F1"):
        for method, path in (("GET", ""), ("POST", "/load"), ("DELETE", "")):
            response = client.request(method, f"/v1/adapters/{name}{path}", headers=admin)
            assert response.status_code in (404, 422), (name, method, response.text)
            assert "Traceback" not in response.text and "passwd" not in response.text.lower()
    for name in ("...", "~root", "a%5C..%5Cb", "topic@..."):  # these reach the route
        for method, path in (("GET", ""), ("POST", "/load"), ("DELETE", "")):
            response = client.request(method, f"/v1/adapters/{name}{path}", headers=admin)
            assert "invalid adapter name" in _error(response, 422) or "topic@" in name


def test_bad_json_is_422(server):
    client, _, _, _ = server
    response = client.post(
        "/v1/classify", content=b'{"inputs": [', headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in _error(response, 422)


def test_too_many_rows_too_long_a_text_or_too_big_a_body_is_413_naming_the_limit(server):
    client, _, _, _ = server
    many = {"adapter": "topic", "inputs": ["a"] * 17}
    assert "max_request_rows=16" in _error(client.post("/v1/classify", json=many), 413)
    long = {"adapter": "topic", "inputs": ["ok", "a " * 200]}
    assert "inputs.1.text" in _error(client.post("/v1/classify", json=long), 413)
    big = {"adapter": "topic", "inputs": ["a"], "pad": "x" * 30_000}
    assert "max_body_bytes=20000" in _error(client.post("/v1/classify", json=big), 413)

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"adapter": "topic", "inputs": ["'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"]}'

    streamed = client.post(
        "/v1/classify", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "max_body_bytes" in _error(streamed, 413)


def test_a_corrupt_adapter_fails_alone_while_the_others_keep_serving(server):
    client, _, _, _ = server
    failures = _metric(client, "peftkit_adapter_loads_total", status="error")
    bad = client.post("/v1/classify", json={"adapter": "broken", "inputs": ["x"]})
    message = _error(bad, 409)
    assert "broken@1" in message and "does not match" in message
    assert str(server[1].registry.root) not in message  # no server paths to clients
    good = client.post("/v1/classify", json={"adapter": "topic", "inputs": ["x"]})
    assert good.status_code == 200
    assert _metric(client, "peftkit_adapter_loads_total", status="error") == failures + 1


# -- adapters, admin, metrics -------------------------------------------------------------


def test_adapters_are_listed_with_labels_method_and_residency(server):
    client, _, _, _ = server
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {*ADAPTERS, "broken"}
    assert listed["topic"]["labels"] == ["sport", "business", "politics", "tech"]
    assert listed["spam"]["method"] == "probe" and listed["sentiment"]["resident"]
    one = client.get("/v1/adapters/sentiment").json()
    assert one["latest"] == "sentiment@1" and one["versions"][0]["resident"] is True


def test_admin_routes_need_an_admin_key_and_load_and_unload(server):
    client, _, _, _ = server
    assert "admin" in _error(client.post("/v1/adapters/topic/load"), 403)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loaded = client.post("/v1/adapters/topic@1/load", headers=admin).json()
    assert loaded["loaded"] == "topic@1" and "topic@1" in loaded["resident"]
    gone = client.delete("/v1/adapters/topic", headers=admin).json()
    assert gone["unloaded"] == ["topic@1"] and "topic@1" not in gone["resident"]
    assert "did you mean" in _error(client.delete("/v1/adapters/topik", headers=admin), 404)
    reloaded = client.post("/v1/reload", headers=admin).json()
    assert "sentiment@1" in reloaded["resident"]
    assert "broken@1" in _error(client.post("/v1/adapters/broken/load", headers=admin), 409)


def test_metrics_parse_and_count_the_rows_sent(server):
    client, _, _, _ = server
    before = _metric(client, "peftkit_rows_total", adapter="spam", status="200")
    forwards = _metric(client, "peftkit_forward_seconds_count")
    for n in (1, 3, 5):
        client.post("/v1/classify", json={"adapter": "spam", "inputs": TEXTS[:n]})
    assert _metric(client, "peftkit_rows_total", adapter="spam", status="200") == before + 9
    assert _metric(client, "peftkit_forward_seconds_count") >= forwards + 3
    assert _metric(client, "peftkit_requests_total", adapter="topik", status="404") == 0
    names = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {
        "peftkit_queue_wait_seconds",
        "peftkit_request_seconds",
        "peftkit_forward_adapters",
        "peftkit_queue_rows",
        "peftkit_resident_adapters",
        "peftkit_adapter_load_seconds",
    } <= names


def test_a_version_registered_while_serving_answers_from_the_next_request_on(server):
    client, _, _, log = server
    asked = {"adapter": "spam", "inputs": ["free prize now"]}
    assert client.post("/v1/classify", json=asked).json()["results"][0]["ref"] == "spam@1"
    Registry(log.parent / "registry").register("spam", log.parent / "spam" / "adapter")
    assert client.post("/v1/classify", json=asked).json()["results"][0]["ref"] == "spam@2"
    pinned = {"adapter": "spam@1", "inputs": ["free prize now"]}
    assert client.post("/v1/classify", json=pinned).json()["results"][0]["ref"] == "spam@1"
    assert client.get("/v1/adapters/spam").json()["versions"][-1]["ref"] == "spam@2"
    # an alias moved while serving: the next request answers with the version it points at
    registry = Registry(log.parent / "registry")
    registry.alias("spam@1", "production")
    aliased = {"adapter": "spam@production", "inputs": ["free prize now"]}
    assert client.post("/v1/classify", json=aliased).json()["results"][0]["ref"] == "spam@1"
    registry.alias("spam@2", "production")
    answer = client.post("/v1/classify", json=aliased).json()["results"][0]
    assert answer["ref"] == "spam@2" and answer["adapter"] == "spam@production"
    missing = client.post("/v1/classify", json={**aliased, "adapter": "spam@staging"})
    assert missing.status_code == 404 and "no alias 'staging'" in missing.json()["error"]
    listed = client.get("/v1/adapters/spam").json()
    assert listed["aliases"] == {"production": "spam@2"}


# -- stopping (keep last: it stops the module's server) -----------------------------------


def test_sigterm_answers_requests_in_flight_then_exits_0(server):
    client, _, process, log = server
    statuses: list[int] = []

    def send() -> None:
        try:
            rows = {"adapter": "topic", "inputs": TEXTS * 2}
            statuses.append(client.post("/v1/classify", json=rows).status_code)
        except httpx.TransportError:  # sent after the server stopped listening
            statuses.append(-1)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert process.wait(timeout=30) == 0
    assert 200 in statuses and all(s in (200, -1) for s in statuses), statuses
    text = log.read_text()
    assert "Traceback" not in text and "stopped" in text


# -- startup checks (in-process: they refuse before the base loads) -------------------------


def _run_main(capsys, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = main(parser.parse_args(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_adapters_on_two_bases_are_refused_naming_both(tmp_path, capsys, server):
    registry = Registry(tmp_path / "registry")
    folder = server[1].registry.get("topic").path
    registry.register("one", folder)
    other = tmp_path / "other"  # the same adapter, as if trained on another base
    other.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors"):
        (other / name).write_bytes((folder / name).read_bytes())
    task = json.loads((folder / "task.json").read_text())
    task.update(base_fingerprint="f" * 24, base={**task["base"], "source": "other-model"})
    (other / "task.json").write_text(json.dumps(task))
    registry.register("two", other)
    code, err = _run_main(capsys, "--registry", str(tmp_path / "registry"))
    assert code == 1 and err.count("\n") == 0
    assert "2 different bases" in err and "other-model" in err and "--base" in err


def test_bad_settings_are_one_line_before_the_base_loads(tmp_path, capsys):
    settings = tmp_path / "serve.yaml"
    settings.write_text("serve:\n  registry: r\n  max_bach_rows: 3\n")
    code, err = _run_main(capsys, "--config", str(settings))
    assert code == 1 and "line 3" in err and "did you mean 'max_batch_rows'" in err
    Registry(tmp_path / "empty")
    code, err = _run_main(capsys, "--registry", str(tmp_path / "empty"))
    assert code == 1 and "holds no adapters" in err
    settings.write_text("serve:\n  registry: r\n  max_batch_rows: 3\n")
    code, err = _run_main(capsys, "--config", str(settings), "--max-batch-rows", "0")
    assert code == 1 and "--max-batch-rows 0" in err
    code, err = _run_main(capsys, "--config", str(settings), "--threads", "0")
    assert code == 1 and "--threads 0" in err and "must be >= 1" in err
    settings.write_text("serve:\n  registry: r\n  threads: two\n")
    code, err = _run_main(capsys, "--config", str(settings))
    assert code == 1 and "line 3" in err and "threads" in err


def test_a_weak_or_malformed_key_file_is_refused(tmp_path, capsys, server):
    registry = str(server[1].registry.root)
    keys = tmp_path / "keys"
    for text, expected in [
        ("short\n", "at least 16"),
        ("k" * 20 + " root\n", "KEY admin"),
        ("", "no key"),
    ]:
        keys.write_text(text)
        code, err = _run_main(capsys, "--registry", registry, "--api-key-file", str(keys))
        assert code == 1 and expected in err


def test_without_the_serve_extra_main_says_which_extra_to_install(tmp_path):
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "import argparse; from peftkit.serving.serve import add_arguments, main\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(main(p.parse_args(['--registry', 'r'])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "pip install 'peftkit[serve]'" in out.stderr and "fastapi" in out.stderr
    assert out.stdout == ""


def test_settings_come_from_the_file_and_flags_override_them(tmp_path):
    settings = tmp_path / "serve.yaml"
    settings.write_text("serve:\n  registry: r\n  port: 9001\n  adapters: [a, b@2]\n")
    config = load_serve_config(settings, {"port": 9002, "max_wait_ms": None})
    assert (config.registry, config.port, config.adapters) == ("r", 9002, ("a", "b@2"))
    assert config.host == "127.0.0.1" and config.max_wait_ms == ServeConfig("r").max_wait_ms
    with pytest.raises(ConfigError, match="max_request_rows"):
        load_serve_config(settings, {"max_request_rows": 10, "max_queue_rows": 5})


def test_overload_and_timeout_map_to_503_with_retry_after_and_504():
    busy = status_of(Overloaded("the queue is full", retry_after=2))
    assert busy.status == 503 and busy.headers == {"Retry-After": "2"}
    assert status_of(RequestTimeout("late")).status == 504
    assert status_of(IntegrityError("adapter x@1 at /srv/reg/x differs"), "/srv/reg").status == 409
    assert "/srv/reg" not in str(status_of(IntegrityError("x@1 at /srv/reg/x"), "/srv/reg"))
    assert status_of(KeyError("boom")).status == 500


def test_token_counts_equal_the_tokenizers_with_special_tokens_and_no_truncation(tiny_models):
    from peftkit.serving.serve import token_counter

    tokenizer = load_base(tiny_models["bert"]).tokenizer
    texts = ["the movie was great", "word " * 900, "déjà vu", "", "stock market price"]
    pairs = [None, "a pair", None, "p", None]
    want = [
        len(tokenizer(t, *([p] if p else []), truncation=False, verbose=False)["input_ids"])
        for t, p in zip(texts, pairs, strict=True)
    ]
    assert want[1] > 900  # beyond any max length: counted whole
    assert token_counter(tokenizer)(texts, pairs) == want
