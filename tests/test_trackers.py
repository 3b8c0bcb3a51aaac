"""Experiment trackers (``training.log_with``): a tiny training run's loss, learning rate,
evaluations and test metrics and report, read back offline by each library's own reader
(TensorBoard's EventAccumulator, MLflow's MlflowClient on the run folder's local store)."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from helpers import synthetic
from test_recipes import GOOD, write_data, write_recipe

from peftkit.config.recipes import load_recipe, recipe_to_dict
from peftkit.config.training import TRACKERS, TrainConfig
from peftkit.errors import ConfigError, TrainingError
from peftkit.models.base import load_base
from peftkit.run.folders import check_run_dir
from peftkit.run.pipeline import plan_run, run_recipe
from peftkit.training.trackers import check_installed
from peftkit.training.train import train

QUICK = dict(batch_size=8, progress=False, patience=None, max_steps=6, log_every=2, eval_every=3)


@pytest.fixture()
def clean_mlflow(monkeypatch):
    """No tracking URI or file-store opt-in from the environment: the run picks its own."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def _train(tiny_models, run_dir, **config):
    from peftkit.config.presets import load_preset

    base = load_base(tiny_models["bert"], kind="encoder")
    return train(
        base, load_preset("lora"), synthetic("topic", n=32), TrainConfig(**QUICK, **config), run_dir
    )


def _history(result, key):
    return [(row["step"], row[key]) for row in result.history if key in row]


def test_tensorboard_events_hold_loss_lr_evaluations_and_the_report(
    tiny_models, tmp_path, reset_accelerate
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _train(tiny_models, tmp_path / "run", log_with="tensorboard", tracker_project="p") as res:
        logdir = tmp_path / "run" / "tensorboard" / "p"
        events = EventAccumulator(str(logdir))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert {"train/loss", "train/learning_rate", "eval/accuracy", "test/accuracy"} <= set(
            scalars
        )

        def read(tag):
            return [(e.step, e.value) for e in events.Scalars(tag)]

        loss = read("train/loss")
        assert [s for s, _ in loss] == [2, 4, 6]  # every log_every steps
        assert [v for _, v in loss] == pytest.approx([v for _, v in _history(res, "loss")])
        lr = read("train/learning_rate")
        assert [v for _, v in lr] == pytest.approx([v for _, v in _history(res, "lr")])
        assert [s for s, _ in read("eval/accuracy")] == [3, 6]  # every eval_every steps
        assert read("eval/macro_f1")[-1][1] == pytest.approx(_history(res, "eval_macro_f1")[-1][1])
        assert read("test/accuracy") == [(6, pytest.approx(res.test_metrics["accuracy"]))]
        text = events.Tensors("test/report/text_summary")[0].tensor_proto.string_val[0].decode()
        assert "macro avg" in text and all(label in text for label in res.report.labels)


def test_mlflow_local_store_holds_params_metric_history_and_the_report(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch
):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    config = dict(log_with="mlflow", tracker_project="proj", tracker_run="first try")
    with _train(tiny_models, run_dir, **config) as res:
        # the run gave MLflow's settings back: a later run picks its own store again
        assert not mlflow.is_tracking_uri_set()
        assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as a reader of the store must
        client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("proj")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.run_name == "first try" and run.info.status == "FINISHED"
        assert run.data.params["method"] == "lora" and run.data.params["max_steps"] == "6"
        assert run.data.params["log_with"] == "mlflow" and run.data.params["train_rows"] == "32"

        def history(key):
            return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

        loss = history("train/loss")
        assert [s for s, _ in loss] == [2, 4, 6]
        assert [v for _, v in loss] == pytest.approx([v for _, v in _history(res, "loss")])
        assert [s for s, _ in history("train/learning_rate")] == [2, 4, 6]
        assert [s for s, _ in history("eval/accuracy")] == [3, 6]
        assert history("test/accuracy") == [(6, pytest.approx(res.test_metrics["accuracy"]))]
        report = client.download_artifacts(run.info.run_id, "report.txt", str(tmp_path))
        with open(report) as fh:
            assert fh.read() == res.report.to_text()


def test_mlflow_uses_the_tracking_uri_in_force(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    elsewhere = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    with _train(tiny_models, tmp_path / "run", log_with="mlflow"):
        pass
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=elsewhere)
    experiment = client.get_experiment_by_name("peftkit")  # no recipe: the default project
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run"  # the run folder's name


def test_a_run_that_fails_marks_its_mlflow_run_failed(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", flaky)
    with pytest.raises(TrainingError, match="loss became nan at step 5"):
        _train(tiny_models, tmp_path / "run", log_with="mlflow", tracker_project="proj")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [2, 4]  # what it logged before the failure is kept


def test_a_recipe_tracks_under_its_name_and_its_run_folder(
    tiny_models, tmp_path, reset_accelerate, clean_mlflow, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    data = write_data(tmp_path / "data", ["negative", "positive"])
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    text = text.replace("source: bbc-news", f"source: {data}")
    overrides = ["training.max_steps=2", "training.batch_size=8", "training.log_with=mlflow"]
    recipe = load_recipe(write_recipe(tmp_path, text, "tracked.yaml"), overrides)
    outcome = run_recipe(recipe, run_dir=tmp_path / "my-run", registry=tmp_path / "reg")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(outcome.run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")  # the recipe's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "my-run"  # the run folder's name
    assert run.data.metrics["test/accuracy"] == pytest.approx(outcome.metrics["accuracy"])
    # a tracked run folder is still one a run wrote: --overwrite may replace it, store and all
    assert check_run_dir(outcome.run_dir, recipe_to_dict(recipe), overwrite=True) is False
    (outcome.run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not one \\(it holds notes.txt"):
        check_run_dir(outcome.run_dir, recipe_to_dict(recipe), overwrite=True)


@pytest.mark.parametrize("name", TRACKERS)
def test_a_missing_tracker_library_names_its_extra_before_any_model_loads(
    tmp_path, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    text = GOOD.replace("source: bbc-news", f"source: {write_data(tmp_path / 'd', ['a', 'b'])}")
    recipe = load_recipe(write_recipe(tmp_path, text), [f"training.log_with={name}"])
    with pytest.raises(ConfigError) as caught:
        plan_run(recipe)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"pip install 'peftkit[{name}]'" in message and "r.yaml" in message
    with pytest.raises(ConfigError, match=rf"peftkit\[{name}\]"):
        check_installed(name)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"log_with": "tensorbord"}, "got 'tensorbord' (did you mean 'tensorboard'?)"),
        ({"log_with": "neptune"}, "log_with must be one of tensorboard, mlflow, wandb, got 'nep"),
        ({"tracker_project": "p"}, "set training.log_with too"),
        (
            {"log_with": "mlflow", "tracker_project": "../up"},
            "tracker_project must be a name of letters",
        ),
        ({"log_with": "mlflow", "tracker_run": ""}, "tracker_run must be a printable name"),
    ],
)
def test_bad_tracker_settings_are_refused(settings, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        TrainConfig(**settings)


def test_train_refuses_an_accelerator_made_without_the_tracker(
    tiny_models, tmp_path, reset_accelerate
):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    from peftkit.config.presets import load_preset

    base = load_base(tiny_models["bert"], kind="encoder")
    config = TrainConfig(**QUICK, log_with="tensorboard")
    with pytest.raises(ConfigError, match="made without it: make it with log_with='tensorboard'"):
        train(base, load_preset("lora"), synthetic("topic", n=32), config, tmp_path / "run",
              accelerator=Accelerator(cpu=True))  # fmt: skip
    assert not (tmp_path / "run" / "tensorboard").exists()
