"""An adapter on disk: what training writes and what the registry and hot-swap read.

A folder holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's own files (peft methods);
- ``head.safetensors``: the task's classification head (``weight``, ``bias``);
- ``task.json``: method, labels, pooling, max length, template, and the base it was trained
  on (fingerprint, source, quantization): what it takes to use the adapter
  (:class:`~peftkit.adapters.task.TaskInfo`);
- for ``full``: ``config.json`` + ``model.safetensors`` of the whole fine-tuned body, so the
  folder also loads with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peftkit.adapters import rewrite as residual
from peftkit.adapters.model import Head, TaskModel, body_of, peft_quiet, unpack_base
from peftkit.adapters.task import TaskInfo
from peftkit.config.presets import method_row
from peftkit.errors import ConfigError, FingerprintMismatch, IntegrityError
from peftkit.paths import atomic_write_text
from peftkit.registry.entries import describe_base

TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"


def save_adapter(
    model: TaskModel,
    folder: str | Path,
    *,
    method: str | None = None,
    labels: Sequence[str] | None = None,
    max_length: int | None = None,
    template: str | None = None,
    verbalizer: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s adapter, head and task description to ``folder`` (replaced whole).

    The task is the model's own (``model.task``); an argument given replaces that field.
    ``model.save_pretrained(folder)`` is the same call with none given.
    """
    given = {
        "method": method,
        "labels": None if labels is None else tuple(labels),
        "max_length": max_length,
        "template": template,
        "verbalizer": dict(verbalizer) if verbalizer else None,
    }
    if model.released:
        raise ConfigError(
            f"cannot save to {folder}: this model's adapter was released from the base; "
            "save it before release() (or before its `with` block ends)"
        )
    info = model.describe(_task_for(model, {k: v for k, v in given.items() if v is not None}))
    folder = Path(folder)
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.saving-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # new and unique: the only folder this call may remove on failure
    try:
        _write_folder(model, info, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made just above
        raise
    if folder.exists():
        shutil.rmtree(folder)  # an adapter folder (checked above), replaced whole
    tmp.rename(folder)
    return folder


def _check_replaceable(folder: Path) -> None:
    """Saving replaces ``folder`` only when it is new, empty, or an adapter folder: never a
    folder holding anything else (a user's files), never a link."""
    from peftkit.registry.files import is_adapter_file

    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"cannot save the adapter to {folder}: it is a file or a link")
    if not folder.is_dir():
        return
    foreign = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_symlink() or not p.is_file() or not is_adapter_file(p.name)
    )
    if foreign:
        raise ConfigError(
            f"cannot save the adapter to {folder}: it holds files that are not an adapter "
            f"folder's ({', '.join(foreign[:8])}); nothing was changed. Give a new or empty folder"
        )


def _write_folder(model: TaskModel, info: TaskInfo, tmp: Path) -> None:
    body: Any = model.body
    saved_as = method_row(info.method).saved_as
    if saved_as == "model":
        body.save_pretrained(tmp, safe_serialization=True)
    elif model.base_rewrite is not None:
        # a PiSSA / OLoRA start: saved as plain LoRA of rank 2r on the original weights
        residual.save_as_lora(body, tmp, model.base_rewrite)
    elif saved_as == "peft":
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
    atomic_write_text(tmp / TASK_FILE, json.dumps(info.to_dict(), indent=1))


def _task_for(model: TaskModel, given: dict[str, Any]) -> TaskInfo:
    """The model's task with ``given``'s fields in its place; a model that does not know
    its task needs method, labels and max_length given."""
    if model.known_task is not None:
        return replace(model.known_task, **given)
    missing = [k for k in ("method", "labels", "max_length") if k not in given]
    if missing:
        raise ConfigError(
            f"save_adapter: this model does not know its task; pass {', '.join(missing)}= "
            "(or build it with build_task_model(base, spec, labels=[...]))"
        )
    head = model.head.linear
    return TaskInfo(pooling=model.pooling, hidden_size=head.in_features, **given)


def read_task(folder: Path) -> TaskInfo:
    """The folder's ``task.json``; IntegrityError when it is missing or not one."""
    path = Path(folder) / TASK_FILE
    try:
        return TaskInfo.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
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
    same base can train or serve the next one. Returns the clean body
    (``model.release()``, which a ``with model:`` block calls at its end)."""
    return model.release()


def load_task_model(base: Any, folder: str | Path) -> TaskModel:
    """The task model saved in ``folder`` on ``base`` (``TaskModel.from_pretrained``): its
    task, head and adapter, the adapter loaded into the base as peft loads it (LoRA-family
    layers wrap the base's until ``release()``), in eval mode.

    When ``base`` is a peftkit Base and the folder records the base it was trained on, the
    two fingerprints must agree (FingerprintMismatch otherwise).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give an adapter folder (save_pretrained)")
    info = read_task(folder)
    _check_base(base, info, folder)
    shared = body_of(unpack_base(base)[0])
    device = next(shared.parameters()).device
    head = load_head(folder, info, device)
    body: Any = shared
    saved_as = method_row(info.method).saved_as
    if saved_as == "model":
        from transformers import AutoModel

        body = AutoModel.from_pretrained(folder).to(device)
    elif saved_as == "peft":
        import peft

        with peft_quiet():
            body = peft.PeftModel.from_pretrained(shared, str(folder), is_trainable=False)
    model = TaskModel(body, head, info.pooling, task=info)
    return model.eval()


def _check_base(base: Any, info: TaskInfo, folder: Path) -> None:
    fingerprint = getattr(base, "fingerprint", None)
    if fingerprint is None or info.base_fingerprint is None:
        return  # a bare model, or a folder saved without its base: nothing to compare
    if fingerprint.id != info.base_fingerprint:
        raise FingerprintMismatch(
            f"adapter {folder} was trained on base "
            f"{describe_base(info.base_fingerprint, info.base or {})}, but the given base is "
            f"{describe_base(fingerprint.id, fingerprint.to_dict())}; load the base it was "
            "trained on, or use an adapter trained on this base"
        )
