"""An adapter on disk: what training writes and what the registry and hot-swap read.

A folder holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's own files (peft methods);
- ``head.safetensors``: the task's classification head (``weight``, ``bias``);
- ``task.json``: method, labels, pooling, max length: what it takes to use the adapter;
- for ``full``: ``config.json`` + ``model.safetensors`` of the whole fine-tuned body, so the
  folder also loads with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peftkit.adapters import rewrite as residual
from peftkit.adapters.model import Head, TaskModel
from peftkit.errors import IntegrityError
from peftkit.paths import atomic_write_text

TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"


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

    def to_dict(self) -> dict[str, Any]:
        return {
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


def save_adapter(
    model: TaskModel,
    folder: str | Path,
    *,
    method: str,
    labels: tuple[str, ...],
    max_length: int,
    template: str | None = None,
    verbalizer: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s adapter, head and task description to ``folder`` (replaced whole)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    body: Any = model.body
    if method == "full":
        body.save_pretrained(tmp, safe_serialization=True)
    elif model.base_rewrite is not None:
        # a PiSSA / OLoRA start: saved as plain LoRA of rank 2r on the original weights
        residual.save_as_lora(body, tmp, model.base_rewrite)
    elif method != "probe":
        residual.refuse_unrecorded(body)
        body.save_pretrained(tmp)  # peft: adapter_config.json + adapter_model.safetensors
    head = model.head.linear
    save_file(
        {
            "weight": head.weight.detach().cpu().contiguous(),
            "bias": head.bias.detach().cpu().contiguous(),
        },
        str(tmp / HEAD_FILE),
    )
    info = TaskInfo(
        method=method,
        labels=tuple(labels),
        pooling=model.pooling,
        max_length=max_length,
        hidden_size=head.in_features,
        template=template,
        verbalizer=dict(verbalizer) if verbalizer else None,
        head_normalize=bool(getattr(model.head, "normalize", False)),
        start=None if model.base_rewrite is None else model.base_rewrite.start,
    )
    atomic_write_text(tmp / TASK_FILE, json.dumps(info.to_dict(), indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_task(folder: Path) -> TaskInfo:
    path = Path(folder) / TASK_FILE
    try:
        data = json.loads(path.read_text())
        return TaskInfo(
            method=data["method"],
            labels=tuple(data["labels"]),
            pooling=data["pooling"],
            max_length=int(data["max_length"]),
            hidden_size=int(data["hidden_size"]),
            template=data.get("template"),
            verbalizer=data.get("verbalizer"),
            head_normalize=bool(data.get("head_normalize", False)),
            start=data.get("start"),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise IntegrityError(
            f"{path} is missing or unreadable ({exc}); this folder is not a "
            "peftkit adapter (re-export it from the registry)"
        ) from exc


def load_head(folder: Path, info: TaskInfo, device: torch.device | str = "cpu") -> Head:
    try:
        state = load_file(str(Path(folder) / HEAD_FILE))
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise IntegrityError(f"{Path(folder) / HEAD_FILE} cannot be read: {exc}") from exc
    weight = state.get("weight")
    if weight is None or tuple(weight.shape) != (len(info.labels), info.hidden_size):
        raise IntegrityError(
            f"{Path(folder) / HEAD_FILE}: head shape "
            f"{None if weight is None else tuple(weight.shape)} does not match "
            f"{len(info.labels)} labels x hidden {info.hidden_size}"
        )
    head = Head(info.hidden_size, len(info.labels), dropout=0.0, normalize=info.head_normalize)
    head.linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    return head.to(device).eval()


def release(model: TaskModel) -> Any:
    """Take a trained peft adapter back out of the shared base (after saving it), so the
    same base can train or serve the next one. Returns the clean body."""
    body: Any = model.body
    if hasattr(body, "peft_config") and hasattr(body, "unload"):
        try:
            clean = body.unload()
        except (AttributeError, ValueError):  # prompt learning injects nothing
            clean = body.get_base_model()
        if model.base_rewrite is not None:
            residual.restore(clean, model.base_rewrite)
            model.base_rewrite = None
        return clean
    return body
