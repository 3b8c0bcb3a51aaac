"""``peftkit serve --ray`` for real: a subprocess starts a local Ray instance (loopback only)
and two replicas of the service on a free 127.0.0.1 port; httpx calls it. Two adapters answer
as ``AdaptedModel.predict`` offline; requests carrying ``serve_multiplexed_model_id`` land on
the one replica that holds their adapter (without the header they spread over both); SIGTERM
stops it with exit 0. The settings and the missing-extra message are checked in-process,
also where ray is not installed (the Ray tests are skipped there)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import synthetic

from peftkit import AdaptedModel, Registry, TrainConfig, load_base, load_preset, train
from peftkit.config.serve import load_serve_config
from peftkit.errors import ConfigError
from peftkit.serving.serve import add_arguments

ADAPTERS = ("sentiment", "topic")
TEXTS = ["the movie was great", "stock market price", "bad film", "the election vote"]
HEADER, REPLICA = "serve_multiplexed_model_id", "x-peftkit-replica"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tiny_models, tmp_path_factory):
    """A registry of two LoRA adapters trained for a few steps on the tiny BERT."""
    pytest.importorskip("ray.serve")
    root = tmp_path_factory.mktemp("serve-ray")
    base = load_base(tiny_models["bert"])
    registry = Registry(root / "registry")
    config = TrainConfig(
        max_steps=3, batch_size=8, learning_rate=5e-2, progress=False, patience=None
    )
    for name in ADAPTERS:
        with train(base, load_preset("lora"), synthetic(name), config, root / name) as result:
            registry.register(name, result.model.save_pretrained(root / name / "adapter"))
    return root / "registry"


def _start(registry: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    """``peftkit serve --ray`` in a subprocess on a local Ray instance bound to the loopback
    address (no usage report), whose session folder (replica logs, sockets) is a short
    temporary folder of the test's own; the output goes to server.log in it."""
    command = [sys.executable, "-m", "peftkit.cli", "serve", "--registry", str(registry)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_tmp = Path(tempfile.mkdtemp(prefix="pkray"))
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.update(RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(ray_tmp / "server.log", "w") as out:
        process = subprocess.Popen(
            [*command, "--ray", *flags], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return process, ray_tmp


@pytest.fixture(scope="module")
def ray_server(registry, tiny_models):
    """(client, offline model, process, Ray's folder): two replicas for the whole module."""
    port = _free_port()
    process, ray_tmp = _start(registry, "--replicas", "2", "--port", str(port))
    log = ray_tmp / "server.log"
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 240
    while "serving 2 registered adapters" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            output = log.read_text()[-5000:]
            shutil.rmtree(ray_tmp, ignore_errors=True)
            pytest.fail(f"the Ray server did not start:\n{output}")
        time.sleep(0.5)
    offline = AdaptedModel(load_base(tiny_models["bert"]), Registry(registry, read_only=True))
    yield client, offline, process, ray_tmp
    client.close()
    offline.close()
    if process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _classify(client: httpx.Client, adapter: str, texts: list[str]) -> httpx.Response:
    body = {"adapter": adapter, "inputs": texts}
    response = client.post("/v1/classify", json=body, headers={HEADER: adapter})
    assert response.status_code == 200, response.text
    return response


@pytest.mark.slow
def test_two_adapters_answer_as_the_offline_model(ray_server):
    client, offline, _, _ = ray_server
    for adapter in ADAPTERS:
        results = _classify(client, adapter, TEXTS).json()["results"]
        expected = offline.predict(TEXTS, adapter=adapter)
        assert [r["ref"] for r in results] == [f"{adapter}@1"] * len(TEXTS)
        for got, want in zip(results, expected, strict=True):
            assert got["label"] == want.label
            np.testing.assert_allclose(
                [got["probs"][k] for k in want.probs], list(want.probs.values()), atol=1e-5
            )


@pytest.mark.slow
def test_an_adapters_requests_land_on_the_replica_that_holds_it(ray_server):
    client, _, _, _ = ray_server
    # without the header a request goes to either replica: both serve
    spread = Counter(client.get("/ready").headers[REPLICA] for _ in range(24))
    assert len(spread) == 2, spread
    holder = {}  # adapter -> the replica its requests land on
    for adapter in ADAPTERS:
        _classify(client, adapter, TEXTS[:1])  # the replica that answers holds it from now on
        time.sleep(1.5)  # Ray pushes each replica's held adapters every 0.1 s
        landed = Counter(_classify(client, a, TEXTS[:1]).headers[REPLICA] for a in [adapter] * 12)
        assert len(landed) == 1, landed
        holder[adapter] = next(iter(landed))
        listed = client.get("/v1/adapters", headers={HEADER: adapter}).json()["adapters"]
        resident = {a["name"]: a["resident"] for a in listed}
        assert resident[adapter] == [f"{adapter}@1"]
    assert set(holder.values()) <= set(spread)


@pytest.mark.slow
def test_sigterm_stops_every_replica_and_exits_0(ray_server):
    client, _, process, ray_tmp = ray_server
    replicas = {client.get("/ready").headers[REPLICA] for _ in range(24)}
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # twice, as a supervisor and a wrapper both may
    log = ray_tmp / "server.log"
    assert process.wait(timeout=90) == 0, log.read_text()[-5000:]
    text = log.read_text()
    assert "Traceback" not in text and "peftkit.serving.ray_serve: stopped" in text
    # each replica's scheduler drained and its model closed (the app's shutdown ran)
    logs = list(ray_tmp.glob("ray/session_latest/logs/serve/replica_*.log"))
    assert len(logs) == 2 == len(replicas), logs
    stopped = {r for r in replicas for p in logs if f"peftkit replica {r} stopped" in p.read_text()}
    assert stopped == replicas
    with pytest.raises(httpx.TransportError):
        client.get("/health", timeout=5)


@pytest.mark.slow
def test_more_replicas_than_the_local_instance_has_cpus_is_one_line(registry):
    process, ray_tmp = _start(registry, "--replicas", "1000", "--port", str(_free_port()))
    try:
        assert process.wait(timeout=120) == 1
        last = (ray_tmp / "server.log").read_text().strip().splitlines()[-1]
        assert last.startswith("peftkit: error: --replicas 1000 needs a CPU per replica")
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- settings (in-process, no Ray needed) ---------------------------------------------------


def test_replicas_need_ray_and_must_be_positive():
    assert load_serve_config(None, {"registry": "r", "ray": True}).replicas is None
    config = load_serve_config(None, {"registry": "r", "ray": True, "replicas": 3})
    assert (config.ray, config.replicas) == (True, 3)
    with pytest.raises(ConfigError, match=r"--replicas 2.*--ray"):
        load_serve_config(None, {"registry": "r", "replicas": 2})
    with pytest.raises(ConfigError, match=r"--replicas 0.*>= 1"):
        load_serve_config(None, {"registry": "r", "ray": True, "replicas": 0})


def test_each_replica_reserves_a_cpu_per_torch_thread():
    from peftkit.serving.ray_serve import deployment_options

    plain = deployment_options(load_serve_config(None, {"registry": "r", "ray": True}))
    assert plain["ray_actor_options"] == {"num_cpus": 1} and plain["num_replicas"] == 1
    config = load_serve_config(None, {"registry": "r", "ray": True, "replicas": 2, "threads": 3})
    options = deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 3} and options["num_replicas"] == 2


def test_the_flags_reach_the_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--registry", "r", "--ray", "--replicas", "4"])
    assert (args.ray, args.replicas) == (True, 4)
    assert parser.parse_args(["--registry", "r"]).ray is None  # the file's setting stays


def test_without_ray_serve_ray_says_which_extra_to_install(tmp_path):
    settings = tmp_path / "serve.yaml"
    settings.write_text("serve:\n  registry: r\n  ray: true\n")
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import peftkit.serving.ray_serve\n"  # importable without ray
        "import argparse; from peftkit.serving.serve import add_arguments, main\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(main(p.parse_args(sys.argv[1:])))\n"
    )
    for argv in (["--registry", "r", "--ray"], ["--config", str(settings)]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "pip install 'peftkit[ray]'" in out.stderr and out.stdout == ""
