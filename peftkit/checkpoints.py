"""Resumable training checkpoints: the trainable weights, optimizer, scheduler and RNG
state, written to a temporary folder and renamed into place, so a killed run always finds
a whole checkpoint (the new one, or the one before it)."""

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
from safetensors.torch import save_file

from peftkit.errors import TrainingError
from peftkit.paths import atomic_write_text


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
    with _replacing(folder) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
            },
            tmp / "optim.pt",
        )
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))


def save_best(folder: Path, model) -> None:
    """Keep the trainable weights of the best evaluation so far (temp folder, then rename)."""
    with _replacing(folder) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))


def find_checkpoint(folder: Path) -> Path | None:
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "state.json").is_file() and (candidate / "optim.pt").is_file():
            return candidate
    return None
