"""The optimizer and learning-rate schedule of the training loop, and the arithmetic of a
wall-clock budget: AdamW (LoRA+ through peft when asked), warmup then linear / cosine decay
to a horizon that a time budget can move."""

from __future__ import annotations

import math

import torch


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
):
    if loraplus_lr_ratio is not None:
        # LoRA+ (Hayou et al. 2024): peft's own parameter grouping; lora_B (and 1-d
        # parameters) at lr * ratio, lora_A and the head's weight at lr. train() refuses
        # the ratio for non-LoRA methods before it builds the model.
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,  # type: ignore[arg-type]  # any Module with lora_A/lora_B weights
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
        )
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class Schedule:
    """Warmup, then linear / cosine decay to ``total`` (or constant): the factor
    transformers' schedulers compute, with a horizon that a time budget can move. It is a
    callable object, so ``LambdaLR.state_dict`` saves the horizon with the checkpoint."""

    def __init__(self, kind: str, total: int, warmup: int) -> None:
        self.kind, self.total, self.warmup = kind, int(total), int(warmup)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        return max(0.0, 1.0 - progress)


def make_scheduler(optimizer, kind: str, total: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(kind, total, warmup))


def budget_horizon(
    step: int,
    cap: int,
    left_s: float,
    step_s: float,
    eval_s: float,
    eval_every: int,
) -> int:
    """The last step a run at ``step`` can reach with ``left_s`` seconds left, when a step
    costs ``step_s`` and an evaluation (every ``eval_every`` steps) ``eval_s``; at most
    ``cap``, at least ``step`` (nothing left: stop here)."""
    per_step = step_s + eval_s / max(1, eval_every)
    if per_step <= 0:
        return cap
    fit = int((left_s - eval_s) / per_step)  # keep room for the final evaluation
    return max(step, min(cap, step + max(0, fit)))
