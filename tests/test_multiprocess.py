"""The same recipe under ``accelerate launch --num_processes 2`` on CPU (gloo): both processes
train, only the main one writes the run folder and registers the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_recipes import GOOD, write_data, write_recipe

from peftkit.registry.store import Registry


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["classify", "contrastive"])
def test_two_processes_write_one_run_and_one_entry(tmp_path, tiny_models, objective):
    data = write_data(tmp_path / "data", ["negative", "positive"], n_train=32)
    recipe = write_recipe(tmp_path, GOOD.replace("base: minilm", f"base: {tiny_models['bert']}"))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--multi_gpu",  # torchrun with 2 workers; without CUDA they join a gloo group
        "-m",
        "peftkit.cli",
        "run",
        str(recipe),
        f"data.source={data}",
        "training.max_steps=3",
        "training.batch_size=4",
        *(
            ["training.objective=contrastive", "adapter.head_init=prototypes"]
            if objective == "contrastive"
            else []
        ),
        "--registry",
        str(tmp_path / "reg"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert [e.ref for e in Registry(tmp_path / "reg").list()] == ["r@1"]
    # the report is printed once (main process only); the test metrics cover every test row
    assert proc.stdout.count("macro avg") == 1
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["support"] == 8
