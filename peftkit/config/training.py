"""Training settings (``training:`` in a recipe): one frozen, validated dataclass that every
method uses, checked when it is built, so a bad value is refused before any work. No torch
import."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peftkit.errors import ConfigError, did_you_mean
from peftkit.metrics import METRICS

SCHEDULERS = ("linear", "cosine", "constant")
FLOAT_FIELDS = (
    "epochs",
    "max_minutes",
    "learning_rate",
    "weight_decay",
    "loraplus_lr_ratio",
    "warmup_ratio",
    "max_grad_norm",
    "label_smoothing",
)
OBJECTIVES = ("classify", "contrastive")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every method uses the same ones."""

    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set; 0: no training (see untrained)
    # wall-clock budget of the training loop: steps, validation evaluations, checkpoints and
    # room for the final test evaluation (not model loading); epochs/max_steps stay the cap
    max_minutes: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    learning_rate: float | None = None  # None: the preset's learning rate
    weight_decay: float = 0.01
    loraplus_lr_ratio: float | None = None  # LoRA+: lora_B learns this many times faster
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    max_length: int = 128
    eval_every: int | None = None  # steps; None: once per epoch
    patience: int | None = 3  # evaluations without improvement; None: never stop
    metric: str = "accuracy"  # one of evaluation.METRICS: accuracy | macro_f1 | weighted_f1 | ...
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0  # cross-entropy target: 1 - x on the gold label
    objective: str = "classify"  # classify | contrastive (pairs train the body; see contrastive)
    progress: bool | None = None  # None: a bar only on a terminal

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.metric not in METRICS:
            raise ConfigError(
                f"training.metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
                + did_you_mean(str(self.metric), METRICS)
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler={self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"training.objective={self.objective!r}; use one of {', '.join(OBJECTIVES)}"
            )
        for name in (
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "max_length",
            "checkpoint_every",
            "log_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"training.max_steps must be >= 0, got {self.max_steps}")
        if self.epochs < 0 or (self.epochs == 0 and not self.max_steps):
            raise ConfigError("training.epochs must be > 0 (or set training.max_steps)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"training.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"training.max_minutes must be > 0, got {self.max_minutes}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio >= 1:
            raise ConfigError(
                f"training.loraplus_lr_ratio must be >= 1, got {self.loraplus_lr_ratio}"
            )

    def _check_numbers(self) -> None:
        """Every float setting is a finite number within its range (inf and nan are not:
        they fail deep inside the loop, or train forever)."""
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"training.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"training.{name} must be a finite number, got {value}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"training.max_grad_norm must be > 0, got {self.max_grad_norm}")
