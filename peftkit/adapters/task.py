"""What a task model is for: its labels, method, max length, template and the base it was
trained on, as a transformers config carries ``id2label``; and, after calibration, how
far its confidence can be trusted (``calibration``: temperature, reject threshold).

A :class:`TaskInfo` is set on every :class:`~peftkit.adapters.model.TaskModel` when it is
built (``model.task``), written to an adapter folder's ``task.json`` by ``save_pretrained``
and read back by ``from_pretrained``, the registry and hot-swap. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peftkit.errors import ConfigError


@dataclass(frozen=True)
class TaskInfo:
    method: str
    labels: tuple[str, ...]
    pooling: str
    max_length: int
    hidden_size: int
    template: str | None = None  # inputs are formatted with it when set
    verbalizer: dict[str, str] | None = None  # label words the head started from
    head_normalize: bool = False  # a cosine head (see adapters.Head)
    start: str | None = None  # a rewriting start trained from ("pissa"), saved as rank-2r LoRA
    # the base it was trained on, when it was built on a peftkit Base (load_base)
    base_fingerprint: str | None = None  # Fingerprint.id, what loading checks
    base: dict[str, Any] | None = None  # Fingerprint.to_dict(): architecture, source...
    quantization: str | None = None
    # {"temperature": T, "threshold": t | None, "target": {...} | None, "out_of_scope":
    # label | None, "ece_before": e, "ece_after": e, ...}; None: temperature 1, no threshold
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            check_calibration(self.calibration, self.labels)

    @property
    def temperature(self) -> float:
        """What the head's logits are divided by before the softmax (1: as trained)."""
        return float((self.calibration or {}).get("temperature") or 1.0)

    @property
    def threshold(self) -> float | None:
        """The reject threshold: a row whose top probability is below it abstains."""
        value = (self.calibration or {}).get("threshold")
        return None if value is None else float(value)

    @property
    def out_of_scope(self) -> str | None:
        """The label that means "none of these": predicting it is an abstention."""
        return (self.calibration or {}).get("out_of_scope")

    def abstains(self, label: str, score: float) -> bool:
        """Whether a row predicted ``label`` with top probability ``score`` (temperature
        applied) abstains: below the threshold, or the out-of-scope label."""
        threshold = self.threshold
        return (threshold is not None and score < threshold) or label == self.out_of_scope

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        """The ``task.json`` form; the base's keys only when it is known (folders saved
        without one read as they always did)."""
        out: dict[str, Any] = {
            "method": self.method,
            "labels": list(self.labels),
            "pooling": self.pooling,
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "template": self.template,
            "verbalizer": self.verbalizer,
            "head_normalize": self.head_normalize,
            "start": self.start,
        }
        if self.base_fingerprint is not None:
            out["base_fingerprint"] = self.base_fingerprint
            out["base"] = self.base
            out["quantization"] = self.quantization
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskInfo:
        """Read ``task.json``'s object; KeyError / ValueError / TypeError when it is not one."""
        return cls(
            method=data["method"],
            labels=tuple(data["labels"]),
            pooling=data["pooling"],
            max_length=int(data["max_length"]),
            hidden_size=int(data["hidden_size"]),
            template=data.get("template"),
            verbalizer=data.get("verbalizer"),
            head_normalize=bool(data.get("head_normalize", False)),
            start=data.get("start"),
            base_fingerprint=data.get("base_fingerprint"),
            base=data.get("base"),
            quantization=data.get("quantization"),
            calibration=data.get("calibration"),
        )


def check_calibration(value: Any, labels: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` is a calibration record: a positive finite temperature,
    a threshold in [0, 1] or null, an out-of-scope label among ``labels`` or null."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"task calibration must be a mapping, got {type(value).__name__}")
    temperature = value.get("temperature", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ConfigError(f"task calibration: temperature must be > 0, got {temperature!r}")
    threshold = value.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 <= threshold <= 1
    ):
        raise ConfigError(f"task calibration: threshold must be in [0, 1], got {threshold!r}")
    oos = value.get("out_of_scope")
    if oos is not None and oos not in labels:
        raise ConfigError(
            f"task calibration: out_of_scope {oos!r} is not one of the labels {list(labels)}"
        )


def default_labels(num_labels: int) -> tuple[str, ...]:
    """Names for a head built without any (transformers' own habit)."""
    return tuple(f"LABEL_{i}" for i in range(num_labels))


def check_labels(labels: Any, num_labels: int | None) -> tuple[str, ...]:
    """``labels`` as a tuple of distinct non-empty strings (agreeing with ``num_labels``
    when both are given); ConfigError naming what is wrong."""
    if labels is None:
        if num_labels is None:
            raise ConfigError("build_task_model needs labels=[...] (or num_labels=N)")
        return default_labels(num_labels)
    if isinstance(labels, (str, bytes)):
        raise ConfigError(f"labels must be a list of strings, e.g. ['neg', 'pos'], got {labels!r}")
    names = tuple(labels)
    bad = [x for x in names if not isinstance(x, str) or not x]
    if bad:
        raise ConfigError(f"labels must be non-empty strings; got {bad!r} in {list(names)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"labels must be distinct; got {list(names)}")
    if num_labels is not None and num_labels != len(names):
        raise ConfigError(f"num_labels={num_labels} but {len(names)} labels {list(names)} given")
    return names
