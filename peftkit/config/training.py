"""Training settings (``training:`` in a recipe): one frozen, validated dataclass that every
method uses, checked when it is built, so a bad value is refused before any work. No torch
import."""

from __future__ import annotations

import math
import re
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
# experiment trackers (Accelerate's); each one's library comes with the extra of its name
TRACKERS = ("tensorboard", "mlflow", "wandb")
PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder's name (TensorBoard)
SEED_MAX = 2**32 - 1  # torch.manual_seed and numpy take an unsigned 32-bit seed
REPLAY_PREVIOUS = "previous"  # replay.source: every earlier task's training rows in the recipe


@dataclass(frozen=True)
class ReplaySpec:
    """``training.replay``: mix rows of earlier data into the training split, so that
    ``share`` of the final training rows are replayed ones (seeded by ``training.seed``).
    ``source`` is a data source (as ``data.source``; its training split) or ``previous``
    (the training rows of every earlier task of the recipe). Its labels, matched by name,
    must be among the new data's."""

    source: str
    share: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)):
            raise ConfigError(f"training.replay.share must be a number, got {self.share!r}")
        if not 0 < self.share < 1:
            raise ConfigError(
                "training.replay.share is the fraction of the training rows that are replayed: "
                f"it must be in (0, 1), e.g. 0.2; got {self.share}"
            )
        if not str(self.source).strip():
            raise ConfigError("training.replay.source must name a data source or 'previous'")


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
    log_with: str | None = None  # an experiment tracker: tensorboard | mlflow | wandb
    tracker_project: str | None = None  # None: the recipe's name ("peftkit" outside a recipe)
    tracker_run: str | None = None  # None: the run folder's name
    replay: ReplaySpec | None = None  # earlier rows mixed into the training split

    def __post_init__(self) -> None:
        if isinstance(self.replay, dict):  # a `then:` task's override, merged as a mapping
            object.__setattr__(self, "replay", ReplaySpec(**self.replay))
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
        self._check_counts()
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
        self._check_tracker()

    def _check_counts(self) -> None:
        """The seed fits torch's and numpy's (an unsigned 32-bit integer); evaluations come
        every N >= 1 steps; patience counts evaluations (>= 0)."""
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"training.seed must be in [0, {SEED_MAX}], got {self.seed}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(
                f"training.eval_every must be >= 1 (steps; null: once per epoch), "
                f"got {self.eval_every}"
            )
        if self.patience is not None and self.patience < 0:
            raise ConfigError(
                f"training.patience must be >= 0 (evaluations; null: never stop early), "
                f"got {self.patience}"
            )

    def _check_tracker(self) -> None:
        """A known tracker, and names it can use (whether its library is installed is
        checked with the recipe: ``peftkit.training.trackers.check_installed``)."""
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ConfigError(
                f"training.log_with must be one of {', '.join(TRACKERS)}, got {self.log_with!r}"
                + did_you_mean(str(self.log_with), TRACKERS)
            )
        for name in ("tracker_project", "tracker_run"):
            if getattr(self, name) is not None and self.log_with is None:
                raise ConfigError(
                    f"training.{name} names the tracker's run; set training.log_with too "
                    f"({', '.join(TRACKERS)})"
                )
        project = self.tracker_project
        if project is not None and not PROJECT_NAME.fullmatch(str(project)):
            raise ConfigError(
                "training.tracker_project must be a name of letters, digits, '.', '_' and '-', "
                f"starting with a letter or digit, at most 128 characters, got {project!r}"
            )
        run = self.tracker_run
        if run is not None and (
            not isinstance(run, str) or not run.strip() or len(run) > 250 or not run.isprintable()
        ):
            raise ConfigError(
                f"training.tracker_run must be a printable name of 1 to 250 characters, got {run!r}"
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
