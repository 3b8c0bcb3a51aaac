"""A resumed run continues its experiment tracker's run: the run id recorded in the run
folder's tracker.json at the first start is passed back on resume (MLflow's run_id, W&B's id
with resume="allow"), and TensorBoard writes on in the same log dir at the global step.
Read back offline with MLflow's MlflowClient on the local file store and TensorBoard's
EventAccumulator; W&B (not installed) through the kwargs it would be started with."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import synthetic

from peftkit.config.training import TrainConfig
from peftkit.errors import ConfigError
from peftkit.models.base import load_base
from peftkit.training.trackers import TRACKER_FILE, init_kwargs, read_record
from peftkit.training.train import train

# checkpoints at steps 3 and 6; the loss logged at 2, 4, 6; evaluations at 3 and 6
QUICK = dict(batch_size=8, progress=False, patience=None, max_steps=6, log_every=2,
             eval_every=3, checkpoint_every=3)  # fmt: skip


@pytest.fixture()
def clean_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


def _train(tiny_models, run_dir, **config):
    from peftkit.config.presets import load_preset

    base = load_base(tiny_models["bert"], kind="encoder")
    data = synthetic("topic", n=32)
    return train(base, load_preset("lora"), data, TrainConfig(**QUICK, **config), run_dir)


def _interrupted(tiny_models, run_dir, monkeypatch, at_step, **config):
    """Train until the loss of step ``at_step`` is computed, then Ctrl-C (as the
    checkpoint tests do); the training after it is left for a resume."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_models, run_dir, **config)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)


def _history(result, key):
    return [(row["step"], row[key]) for row in result.history if key in row]


def _mlflow_client(run_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as a reader of the store must
    return MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())


def test_a_resumed_run_continues_its_mlflow_run(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch
):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    config = dict(log_with="mlflow", tracker_project="proj", tracker_run="tries")
    _interrupted(tiny_models, run_dir, monkeypatch, at_step=4, **config)  # after checkpoint 3
    first = json.loads((run_dir / TRACKER_FILE).read_text())
    assert first["log_with"] == "mlflow" and first["project"] == "proj" and first["run_id"]
    assert first["tracking_uri"] == (run_dir / "mlruns").absolute().as_uri()

    with _train(tiny_models, run_dir, **config) as res:
        assert res.resumed_from == 3 and res.steps == 6
        client = _mlflow_client(run_dir, monkeypatch)
        experiment = client.get_experiment_by_name("proj")
        (run,) = client.search_runs([experiment.experiment_id])  # one run, not two
        assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
        assert run.info.run_name == "tries" and run.data.params["max_steps"] == "6"
        assert json.loads((run_dir / TRACKER_FILE).read_text()) == first

        def history(key):
            return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

        # step 2 and the evaluation at 3 from the first half, 4 and 6 from the resumed one
        loss = sorted(history("train/loss"))
        assert [s for s, _ in loss] == [2, 4, 6]
        assert [v for _, v in loss] == pytest.approx([v for _, v in _history(res, "loss")])
        assert sorted(s for s, _ in history("eval/accuracy")) == [3, 6]
        assert history("test/accuracy") == [(6, pytest.approx(res.test_metrics["accuracy"]))]


def test_a_recorded_mlflow_run_missing_from_the_store_starts_a_new_one(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch, caplog
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    config = dict(log_with="mlflow", tracker_project="proj")
    _interrupted(tiny_models, run_dir, monkeypatch, at_step=4, **config)
    old = json.loads((run_dir / TRACKER_FILE).read_text())["run_id"]
    elsewhere = (tmp_path / "store").as_uri()  # the resume runs with another store in force
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    with caplog.at_level("WARNING", logger="peftkit"), _train(tiny_models, run_dir, **config):
        pass
    assert f"run {old} (recorded in" in caplog.text and "starting a new MLflow run" in caplog.text
    record = json.loads((run_dir / TRACKER_FILE).read_text())
    assert record["tracking_uri"] == elsewhere and record["run_id"] != old
    client = MlflowClient(tracking_uri=elsewhere)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4, 6]


def test_a_resumed_run_writes_on_in_the_same_tensorboard_log_dir(
    tiny_models, tmp_path, reset_accelerate, monkeypatch
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    config = dict(log_with="tensorboard", tracker_project="p")
    # stopped in step 5: the loss of step 4 was logged after the checkpoint at 3, and is
    # logged again by the resumed run
    _interrupted(tiny_models, run_dir, monkeypatch, at_step=5, **config)
    assert json.loads((run_dir / TRACKER_FILE).read_text())["log_with"] == "tensorboard"
    with _train(tiny_models, run_dir, **config) as res:
        assert res.resumed_from == 3
        logdir = run_dir / "tensorboard" / "p"
        assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one per start, one dir
        events = EventAccumulator(str(logdir))
        events.Reload()
        loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
        # the global step, on from the checkpoint; step 4 once, with the resumed value
        assert [s for s, _ in loss] == [2, 4, 6]
        assert [v for _, v in loss] == pytest.approx([v for _, v in _history(res, "loss")])
        assert [e.step for e in events.Scalars("eval/accuracy")] == [3, 6]
        assert [e.step for e in events.Scalars("test/accuracy")] == [6]


def test_init_kwargs_continue_the_recorded_run_only_on_a_resume(tmp_path):
    record = {"log_with": "wandb", "project": "proj", "run": "r", "run_id": "abc123"}
    resumed = init_kwargs("wandb", "proj", "r", tmp_path, record, resumed_from=50)
    assert resumed == {"name": "r", "dir": str(tmp_path), "id": "abc123", "resume": "allow"}
    fresh = init_kwargs("wandb", "proj", "r", tmp_path, None, resumed_from=0)
    assert fresh["resume"] == "allow" and fresh["id"] != "abc123"
    assert len(fresh["id"]) == 12 and fresh["id"].isalnum()
    # no checkpoint to resume from, another project or another tracker: a new run
    for args in ((record, 0), ({**record, "project": "other"}, 50),
                 ({**record, "log_with": "mlflow"}, 50)):  # fmt: skip
        assert init_kwargs("wandb", "proj", "r", tmp_path, *args)["id"] != "abc123"
    mlflow_record = {**record, "log_with": "mlflow", "run_id": "f" * 32}
    assert init_kwargs("mlflow", "proj", "r", tmp_path, mlflow_record, 50) == {
        "run_name": "r",
        "run_id": "f" * 32,
    }
    assert init_kwargs("mlflow", "proj", "r", tmp_path, mlflow_record, 0) == {"run_name": "r"}
    assert init_kwargs("tensorboard", "proj", "r", tmp_path, None, 50) == {"purge_step": 51}
    assert init_kwargs("tensorboard", "proj", "r", tmp_path, None, 0) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "unreadable tracker record"),
        ('["mlflow"]', "not a tracker record"),
        ('{"log_with": "neptune", "project": "p", "run_id": "x"}', "not a tracker record"),
        ('{"log_with": "mlflow", "project": "p", "run_id": "../../x"}', "not a tracker record"),
    ],
)
def test_a_damaged_tracker_record_is_one_line_naming_the_file(tmp_path, text, expected):
    assert read_record(tmp_path) is None
    (tmp_path / TRACKER_FILE).write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_record(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / TRACKER_FILE) in message
    assert expected in message and "delete it to start a new tracker run" in message
