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
    transformers' schedulers compute, with a horizon that a time budget can move.

    :meth:`replan` moves the horizon. Once the decay has begun, it never raises the factor:
    the decay is re-based to run from its value at the re-plan (``anchor_step``,
    ``anchor_factor``) down to 0 at the new horizon, so a budgeted run still ends annealed.
    Its fields are plain data: ``LambdaLR.state_dict`` saves them with the checkpoint.

    >>> s = Schedule("linear", 10, 0); s.replan(5, 20); [round(s(t), 2) for t in (5, 10, 20)]
    [0.5, 0.33, 0.0]
    """

    def __init__(self, kind: str, total: int, warmup: int) -> None:
        self.kind, self.total, self.warmup = kind, int(total), int(warmup)
        self.anchor_step: int | None = None  # None: the decay starts at warmup's end, at 1.0
        self.anchor_factor = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        start, top = (self.warmup, 1.0)
        if self.anchor_step is not None:
            start, top = self.anchor_step, self.anchor_factor
        progress = min(1.0, max(0.0, (step - start) / max(1, self.total - start)))
        if self.kind == "cosine":
            return top * 0.5 * (1.0 + math.cos(math.pi * progress))
        return top * (1.0 - progress)

    def replan(self, step: int, total: int, warmup: int | None = None) -> None:
        """End the schedule at ``total``, seen from ``step``; ``warmup`` shortens a warmup
        still running (a warmup is planned afresh, as the decay has not begun)."""
        total = int(total)
        if step < self.warmup:
            if warmup is not None:
                self.warmup = min(self.warmup, int(warmup))
            self.total = total
            return
        if total != self.total:
            # continue from the factor in use now: moving the horizon later must not raise it
            self.anchor_step, self.anchor_factor = int(step), self(step)
            self.total = total


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


def final_eval_reserve(eval_s: float, val_rows: int, test_rows: int) -> float:
    """Seconds a budget keeps for the final test evaluation: the validation evaluation's
    time per row (``eval_s`` over ``val_rows``) times ``test_rows``; 0 before it is known.

    >>> final_eval_reserve(4.0, 200, 500)
    10.0
    """
    if eval_s <= 0 or val_rows <= 0 or test_rows <= 0:
        return 0.0
    return eval_s / val_rows * test_rows
