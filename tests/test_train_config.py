"""Training settings are refused when built, before any model loads or any step runs."""

from __future__ import annotations

import math

import pytest

from peftkit.config.training import FLOAT_FIELDS, TrainConfig
from peftkit.errors import ConfigError
from peftkit.metrics.report import METRICS, compute_metrics


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_setting_must_be_finite(name, bad):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**{name: bad})
    assert str(caught.value) == f"training.{name} must be a finite number, got {bad}"


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"learning_rate": 0.0}, "training.learning_rate must be > 0, got 0.0"),
        ({"learning_rate": -1e-3}, "training.learning_rate must be > 0, got -0.001"),
        ({"weight_decay": -0.1}, "training.weight_decay must be >= 0, got -0.1"),
        ({"warmup_ratio": 1.0}, "training.warmup_ratio must be in [0, 1), got 1.0"),
        ({"warmup_ratio": -0.5}, "training.warmup_ratio must be in [0, 1), got -0.5"),
        ({"max_grad_norm": 0.0}, "training.max_grad_norm must be > 0, got 0.0"),
        ({"epochs": "three"}, "training.epochs must be a number, got 'three'"),
        ({"max_minutes": True}, "training.max_minutes must be a number, got True"),
    ],
)
def test_out_of_range_settings_are_named(setting, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**setting)
    assert str(caught.value) == message


def test_valid_edges_are_accepted():
    config = TrainConfig(weight_decay=0.0, warmup_ratio=0.0, learning_rate=1e-6, epochs=0.5)
    assert config.learning_rate == 1e-6
    assert TrainConfig(learning_rate=None).learning_rate is None  # the preset's rate


def test_metric_must_be_one_the_evaluation_computes():
    computed = compute_metrics([0, 1, 1, 0], [0, 1, 0, 0], labels=["a", "b"])
    assert set(computed) == set(METRICS)  # the list and the computation agree
    for name in METRICS:
        assert TrainConfig(metric=name).metric == name
    with pytest.raises(ConfigError) as caught:
        TrainConfig(metric="macro-f1")
    message = str(caught.value)
    assert message.startswith("training.metric must be one of accuracy, macro_f1")
    assert "got 'macro-f1'" in message and "did you mean 'macro_f1'" in message
    with pytest.raises(ConfigError, match="got 'f1'"):
        TrainConfig(metric="f1")
