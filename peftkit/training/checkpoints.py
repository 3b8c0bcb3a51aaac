"""Resumable training checkpoints: the trainable weights, optimizer, scheduler and RNG
state, written to a temporary folder and renamed into place, so a killed run always finds
a whole checkpoint (the new one, or the one before it).

Nothing in a checkpoint is a pickle: tensors go into safetensors files, everything else
(step counts, param groups, the schedule's fields, numpy's RNG state) into JSON. A run
resumes from whatever checkpoint its folder holds, and ``peftkit run`` picks that folder by
itself, so loading must not be able to run code: a folder holding anything else (an older
``optim.pt``, a planted file, a symlink) is refused, never read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit.errors import TrainingError
from peftkit.paths import atomic_write_text

WEIGHTS, TENSORS, EXTRA, STATE = (
    "trainable.safetensors",
    "optim.safetensors",
    "optim.json",
    "state.json",
)
CHECKPOINT_FILES = (WEIGHTS, TENSORS, EXTRA, STATE)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu").contiguous().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainingError(f"checkpoint does not fit this model; unknown weights: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# -- writing --------------------------------------------------------------------------------


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _replacing(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder to fill; on success it takes ``folder``'s place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    _swap_in(tmp, folder)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (temp folder, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    extra = {
        "optimizer": to_json(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": to_json(scheduler.state_dict(), "scheduler", tensors),
        "torch_rng": to_json(torch.get_rng_state(), "torch_rng", tensors),
        "numpy_rng": to_json(np.random.get_state(), "numpy_rng", tensors),
    }
    with _replacing(folder) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        save_file(tensors, str(tmp / TENSORS))
        atomic_write_text(tmp / EXTRA, json.dumps(extra))
        atomic_write_text(tmp / STATE, json.dumps(state, indent=1))


def save_best(folder: Path, model) -> None:
    """Keep the trainable weights of the best evaluation so far (temp folder, then rename)."""
    with _replacing(folder) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))


# -- plain containers <-> JSON + tensors -----------------------------------------------------


def to_json(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under dotted keys (``key.…``).

    Tuples, arrays, tensors and dicts with non-string keys are tagged (``{"@tuple": …}``) so
    that :func:`from_json` gives back the same containers; anything else is a TypeError.
    """
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise TypeError(f"{key}: two tensors would share this checkpoint key")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"@tensor": key}
    if isinstance(value, np.ndarray):
        return {"@ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"@tuple": [to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = [[k, to_json(v, f"{key}.{k}", tensors)] for k, v in value.items()]
        if all(isinstance(k, str) and not k.startswith("@") for k in value):
            return dict(items)
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{key}: a checkpoint keeps str or int keys, not {list(value)[:3]}")
        return {"@items": items}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: a checkpoint keeps no {type(value).__name__} (only plain data)")


def from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`to_json`; a tag it does not know raises ValueError."""
    if isinstance(value, list):
        return [from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("@")]
    if not tags:
        return {k: from_json(v, tensors) for k, v in value.items()}
    if tags == ["@tensor"]:
        return tensors[value["@tensor"]]
    if tags == ["@ndarray"]:
        return np.asarray(value["@ndarray"], dtype=np.dtype(value["dtype"]))
    if tags == ["@tuple"]:
        return tuple(from_json(v, tensors) for v in value["@tuple"])
    if tags == ["@items"]:
        return {k: from_json(v, tensors) for k, v in value["@items"]}
    raise ValueError(f"unknown entry {tags}")


# -- reading --------------------------------------------------------------------------------


def find_checkpoint(folder: Path) -> Path | None:
    """The newest whole checkpoint: ``folder``, else the ``.old`` one a kill left behind.

    Raises TrainingError when either holds anything but :data:`CHECKPOINT_FILES` as
    regular files: such a folder is not read at all.
    """
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if candidate.is_symlink() or (candidate.exists() and not candidate.is_dir()):
            _refuse(candidate, candidate.name, folder.parent)
        if candidate.is_dir():
            for entry in sorted(candidate.iterdir()):
                if entry.name not in CHECKPOINT_FILES or not _regular(entry):
                    _refuse(candidate, entry.name, folder.parent)
            if all((candidate / name).is_file() for name in CHECKPOINT_FILES):
                return candidate
    return None


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _refuse(candidate: Path, name: str, root: Path) -> None:
    why = (
        "an older, pickled checkpoint format that peftkit no longer loads, since loading it "
        "could run code"
        if name.endswith((".pt", ".pth", ".bin", ".pkl"))
        else f"not part of a checkpoint ({', '.join(CHECKPOINT_FILES)}, regular files)"
    )
    raise TrainingError(
        f"refusing to resume from {candidate}: it holds {name!r}, {why}; delete {root} to "
        "train this run again from the start, or start a new run (another --run-dir)"
    )


def damaged(found: Path, why: str) -> TrainingError:
    """The one error for a checkpoint that cannot be read back as written."""
    return TrainingError(
        f"checkpoint {found} is damaged ({why}); delete {found.parent} to train this run "
        "again from the start"
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; one that is not whole is a damaged checkpoint."""
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise damaged(path.parent, f"{path.name}: {type(exc).__name__}: {exc}") from None


def restore_checkpoint(
    found: Path, model, optimizer, scheduler, total_steps: int | None = None
) -> dict[str, Any]:
    """Load checkpoint ``found`` (from :func:`find_checkpoint`) into ``model``, ``optimizer``,
    ``scheduler`` and the torch / numpy RNGs; returns the loop's saved ``state`` (checked:
    its step within ``total_steps``, the run's, when given)."""
    try:
        state = json.loads((found / STATE).read_text())
        extra = json.loads((found / EXTRA).read_text())
    except (OSError, ValueError) as exc:  # JSON errors
        raise damaged(found, f"{type(exc).__name__}: {exc}") from None
    check_state(state, found, total_steps)
    tensors = read_weights(found / TENSORS)
    weights = read_weights(found / WEIGHTS)
    try:
        parts = {key: from_json(extra[key], tensors) for key in _PARTS}
    except (ValueError, KeyError, TypeError) as exc:
        raise damaged(found, f"{EXTRA}: {type(exc).__name__}: {exc}") from None
    load_trainable(model, weights)
    _check_schedule(parts["scheduler"], scheduler, found)
    try:
        optimizer.load_state_dict(parts["optimizer"])
        scheduler.load_state_dict(parts["scheduler"])
        torch.set_rng_state(parts["torch_rng"])
        np.random.set_state(parts["numpy_rng"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise TrainingError(
            f"checkpoint {found} does not fit this run ({exc}); was the adapter or optimizer "
            f"setting changed? Delete {found.parent} to train again from the start, or start "
            "a new run"
        ) from None
    return state


_PARTS = ("optimizer", "scheduler", "torch_rng", "numpy_rng")
# the training loop's state: counters (whole numbers >= 0) and the rest, by type
_COUNTERS = ("step", "epoch", "batch", "best_step", "bad_evals")


def check_state(state: Any, found: Path, total_steps: int | None = None) -> None:
    """``state.json`` as the loop wrote it: counters whole numbers >= 0, the step within the
    run's ``total_steps``, the history a list, the best metric and elapsed time numbers."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(state, dict):
        raise damaged(found, f"{STATE} is not a mapping")
    for key in _COUNTERS:
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise damaged(found, f"{STATE}: {key} must be a whole number >= 0, got {value!r}")
    step = state["step"]
    if total_steps is not None and step > total_steps:
        raise damaged(found, f"{STATE}: step {step} is past this run's {total_steps} steps")
    if not isinstance(state.get("history"), list) or not all(
        isinstance(row, dict) for row in state["history"]
    ):
        raise damaged(found, f"{STATE}: history must be a list of evaluations")
    if state.get("best_metric") is not None and not number(state["best_metric"]):
        raise damaged(found, f"{STATE}: best_metric must be a number, got {state['best_metric']!r}")
    elapsed = state.get("elapsed_s", 0.0)
    if not number(elapsed) or not 0 <= elapsed < float("inf"):
        raise damaged(found, f"{STATE}: elapsed_s must be a number >= 0, got {elapsed!r}")


def _check_schedule(saved: Any, scheduler, found: Path) -> None:
    """A schedule comes back as its fields only (LambdaLR sets them on the live object)."""
    live = [vars(fn) for fn in scheduler.lr_lambdas]
    lambdas = saved.get("lr_lambdas") if isinstance(saved, dict) else None
    if not isinstance(lambdas, list) or len(lambdas) != len(live):
        raise TrainingError(f"checkpoint {found}: its schedule does not fit this run")
    for fields, now in zip(lambdas, live, strict=True):
        if not isinstance(fields, dict) or set(fields) != set(now):
            raise TrainingError(
                f"checkpoint {found}: its schedule has fields {sorted(fields or {})}, this "
                f"run's has {sorted(now)}; delete {found.parent} or start a new run"
            )
