"""Prediction over encoded rows: logits in order (sharded over processes when distributed),
a split's metrics, and the warning for a run collapsed to one label."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from peftkit.adapters.model import TaskModel, eval_mode
from peftkit.data.batching import Encoded, collate, length_batches
from peftkit.metrics.report import compute_metrics

log = logging.getLogger(__name__)


def predict_logits(
    model: TaskModel, enc: Encoded, pad: int, batch_size: int, accelerator: Any = None
) -> np.ndarray:
    """Logits for every row of ``enc`` in order; sharded over processes when distributed.
    Dropout is off while scoring; the model comes back in the mode it came in."""
    batches = length_batches([len(r) for r in enc.ids], batch_size, seed=0, epoch=0, shuffle=False)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = next(model.parameters()).device
    mine = batches[rank::world]
    out_idx, out_logits = [], []
    with eval_mode(model), torch.no_grad():
        for batch in mine:
            tensors = collate([enc.ids[i] for i in batch], pad)
            logits = model(tensors["input_ids"].to(device), tensors["attention_mask"].to(device))
            out_idx.extend(batch)
            out_logits.append(logits.float().cpu())
    n_labels = model.head.linear.out_features
    logits = torch.cat(out_logits) if out_logits else torch.zeros(0, n_labels)
    idx = torch.tensor(out_idx, dtype=torch.long)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(idx, logits)])
        idx = torch.cat([p[0] for p in parts])
        logits = torch.cat([p[1] for p in parts])
    result = torch.zeros(len(enc), n_labels)
    result[idx] = logits
    return result.numpy()


def evaluate_split(
    model, enc: Encoded, labels: tuple[str, ...], pad: int, batch_size: int, accelerator: Any = None
) -> tuple[dict[str, float], np.ndarray]:
    logits = predict_logits(model, enc, pad, batch_size, accelerator)
    preds = logits.argmax(-1)
    return compute_metrics(list(enc.labels), preds.tolist(), labels), logits


def warn_if_collapsed(preds: np.ndarray, labels: tuple[str, ...], step: int, main: bool) -> None:
    """A run whose every validation row gets one label has collapsed (no NaN to catch it):
    say so while it can still be stopped, instead of letting it end at the majority rate."""
    if main and len(preds) >= 2 * len(labels) and bool((preds == preds[0]).all()):
        log.warning(
            "step %d: all %d validation rows are predicted %r; the model has collapsed to one "
            "label (or has not learned anything yet). If this persists, lower "
            "training.learning_rate (or check the training labels)",
            step,
            len(preds),
            labels[int(preds[0])],
        )
