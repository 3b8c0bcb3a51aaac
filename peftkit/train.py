"""One training loop for every method, on Accelerate.

    result = train(base, load_preset("lora"), data, TrainConfig(epochs=2), run_dir)

Seeded, length-bucketed batches; gradient accumulation; AdamW with warmup then linear or
cosine decay; evaluation every ``eval_every`` steps with early stopping on a validation
metric and the best weights kept; a checkpoint of the trainable weights, optimizer,
scheduler and RNG every ``checkpoint_every`` steps (written to a temporary folder, then
renamed), from which a killed run resumes to the same steps; a NaN loss stops the run with
the last good checkpoint intact. Under ``accelerate launch`` each process takes its share of
every batch list; only the main process writes.

``max_minutes`` gives the run a wall-clock budget (training steps, evaluations and
checkpoints; carried over a resume): after the first steps and after every evaluation the
loop re-estimates how many steps fit in what is left, and the learning-rate schedule decays
to that horizon, so a budgeted run ends annealed rather than cut off mid-schedule.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from peftkit.adapters import (
    AdapterSpec,
    TaskModel,
    build_task_model,
    trainable_parameters,
    verbalizer_token_ids,
)
from peftkit.artifacts import release
from peftkit.batching import (
    Encoded,
    apply_template,
    collate,
    encode,
    length_batches,
    pad_id,
)
from peftkit.checkpoints import find_checkpoint, load_trainable, save_best, save_checkpoint
from peftkit.data import Split, TextDataset
from peftkit.errors import ConfigError, TrainingError
from peftkit.evaluation import classification_report, compute_metrics
from peftkit.paths import atomic_write_text
from peftkit.schedule import budget_horizon, make_optimizer, make_scheduler

log = logging.getLogger(__name__)
SCHEDULERS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every method uses the same ones."""

    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    max_minutes: float | None = None  # wall-clock budget; epochs/max_steps stay the cap
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
    metric: str = "accuracy"  # accuracy | macro_f1 | weighted_f1 | ...
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    max_grad_norm: float = 1.0
    progress: bool | None = None  # None: a bar only on a terminal

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler={self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
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
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError("training.epochs must be > 0 (or set training.max_steps)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"training.max_minutes must be > 0, got {self.max_minutes}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio >= 1:
            raise ConfigError(
                f"training.loraplus_lr_ratio must be >= 1, got {self.loraplus_lr_ratio}"
            )


@dataclass
class TrainResult:
    model: TaskModel
    steps: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    test_metrics: dict[str, float] = field(default_factory=dict)
    report: Any = None
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    resumed_from: int = 0


# -- the loop -----------------------------------------------------------------------------


def _now() -> float:  # the training clock (tests replace it)
    return time.perf_counter()


def predict_logits(
    model: TaskModel, enc: Encoded, pad: int, batch_size: int, accelerator: Any = None
) -> np.ndarray:
    """Logits for every row of ``enc`` in order; sharded over processes when distributed."""
    model.eval()
    batches = length_batches([len(r) for r in enc.ids], batch_size, seed=0, epoch=0, shuffle=False)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = next(model.parameters()).device
    mine = batches[rank::world]
    out_idx, out_logits = [], []
    with torch.no_grad():
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
    model.train()
    return result.numpy()


def evaluate_split(
    model, enc: Encoded, labels: tuple[str, ...], pad: int, batch_size: int, accelerator: Any = None
) -> tuple[dict[str, float], np.ndarray]:
    logits = predict_logits(model, enc, pad, batch_size, accelerator)
    preds = logits.argmax(-1)
    return compute_metrics(list(enc.labels), preds.tolist(), labels), logits


def train(
    base: Any,
    spec: AdapterSpec,
    data: TextDataset,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    accelerator: Any = None,
    train_split: Split | None = None,
    template: str | None = None,
    verbalizer: dict[str, str] | None = None,
    head_init: Any = None,
) -> TrainResult:
    """Train ``spec`` on ``data`` and return the best model, its history and test report.

    ``run_dir`` holds ``checkpoints/`` (resumable state, best weights) and ``history.json``.
    Starting again on the same ``run_dir`` resumes from the last checkpoint.

    ``template`` (``"{text} Sentiment:"``) formats every input; ``verbalizer`` (label ->
    word) starts the head from a causal LM's own rows for the label words' first tokens,
    so training fine-tunes the LM's label-word scores (pattern-based fine-tuning).
    ``head_init`` (an ``adapters.Head`` of the task's labels, e.g. ``fewshot.prototype_head``)
    is the head training starts from instead of a fresh one; it is copied, not changed.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    acc = accelerator or Accelerator(
        gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available()
    )
    main = acc.is_main_process
    tokenizer = base.tokenizer
    pad = pad_id(tokenizer)
    train_rows = train_split or data.split("train")
    val_name = "validation" if "validation" in data.splits else "test"

    def enc(split: Split) -> Encoded:
        if template is None:
            return encode(tokenizer, split.texts, split.labels, config.max_length, split.text_pairs)
        texts = apply_template(template, split.texts, split.text_pairs)
        return encode(tokenizer, texts, split.labels, config.max_length, keep_end=True)

    enc_train = enc(train_rows)
    enc_val = enc(data.split(val_name))
    if enc_train.truncated:
        log.info(
            "%d of %d training rows cut to %d tokens",
            enc_train.truncated,
            len(enc_train),
            config.max_length,
        )
    if config.loraplus_lr_ratio is not None and spec.method not in ("lora", "qlora"):
        raise ConfigError(
            f"training.loraplus_lr_ratio needs a LoRA adapter (lora or qlora), not {spec.method}"
        )
    token_ids = None
    if verbalizer is not None:
        missing = [lab for lab in data.labels if lab not in verbalizer]
        if missing:
            raise ConfigError(
                f"verbalizer has no word for labels {missing}; it covers {sorted(verbalizer)}"
            )
        token_ids = verbalizer_token_ids(tokenizer, {lab: verbalizer[lab] for lab in data.labels})

    model = build_task_model(
        base.model, spec, len(data.labels), seed=config.seed, verbalizer=token_ids
    )
    built = model
    try:
        if head_init is not None:
            if head_init.linear.out_features != len(data.labels):
                raise ConfigError(
                    f"head_init has {head_init.linear.out_features} outputs but the data has "
                    f"{len(data.labels)} labels"
                )
            start = copy.deepcopy(head_init).train()
            start.dropout = model.head.dropout
            model.head = start.to(next(model.head.parameters()).device)
        trainable, total = trainable_parameters(model)
        lr = spec.learning_rate if config.learning_rate is None else config.learning_rate
        optimizer = make_optimizer(model, lr, config.weight_decay, config.loraplus_lr_ratio)
        lengths = [len(r) for r in enc_train.ids]
        per_epoch_batches = (
            len(length_batches(lengths, config.batch_size, seed=config.seed, epoch=0))
            // acc.num_processes
        )
        if per_epoch_batches == 0:
            raise ConfigError(
                f"{len(enc_train)} training rows make no batch of "
                f"{config.batch_size} per process on {acc.num_processes} processes"
            )
        steps_per_epoch = max(1, per_epoch_batches // config.grad_accum)
        cap_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        total_steps = cap_steps
        scheduler = make_scheduler(
            optimizer, config.scheduler, total_steps, int(config.warmup_ratio * total_steps)
        )
        model, optimizer = acc.prepare(model, optimizer)
        eval_every = config.eval_every or steps_per_epoch

        ckpt_dir = run_dir / "checkpoints"
        state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "history": [],
            "best_metric": None,
            "best_step": 0,
            "bad_evals": 0,
            "elapsed_s": 0.0,  # wall-clock seconds spent in the loop, over every resume
        }
        found = find_checkpoint(ckpt_dir / "last")
        resumed_from = 0
        if found is not None:
            state = json.loads((found / "state.json").read_text())
            load_trainable(acc.unwrap_model(model), load_file(str(found / "trainable.safetensors")))
            extra = torch.load(found / "optim.pt", weights_only=False)
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            torch.set_rng_state(extra["torch_rng"])
            np.random.set_state(extra["numpy_rng"])
            resumed_from = state["step"]
            sched = scheduler.lr_lambdas[0]  # its horizon came back with the checkpoint
            sched.total = cap_steps if config.max_minutes is None else min(sched.total, cap_steps)
            total_steps = sched.total
            state.setdefault("elapsed_s", 0.0)
            if main:
                print(f"peftkit: resuming {run_dir} from step {resumed_from}", file=sys.stderr)
        else:
            torch.manual_seed(config.seed)

        def checkpoint() -> None:
            if main:
                save_checkpoint(
                    ckpt_dir / "last", acc.unwrap_model(model), optimizer, scheduler, state
                )
            acc.wait_for_everyone()

        show = config.progress if config.progress is not None else None
        bar = tqdm(
            total=total_steps,
            initial=state["step"],
            desc=f"train {spec.method}",
            disable=(not main) or (show is False) or (show is None and not sys.stderr.isatty()),
        )
        start = time.perf_counter()
        step_times: list[float] = []
        running: list[float] = []
        budget_s = None if config.max_minutes is None else 60.0 * config.max_minutes
        eval_s = 0.0  # the last evaluation's cost, for the budget
        clock = [_now()]

        def tick() -> None:  # charge the time since the last tick to the budget
            now = _now()
            state["elapsed_s"] += now - clock[0]
            clock[0] = now

        def replan(first: bool = False) -> None:
            nonlocal total_steps
            if budget_s is None or not step_times:
                return
            # the mean, not the median: length-bucketed steps vary, and the budget is a sum
            recent = step_times[-500:]
            horizon = budget_horizon(
                state["step"],
                cap_steps,
                budget_s - state["elapsed_s"],
                float(np.mean(recent)),
                eval_s,
                eval_every,
            )
            sched = scheduler.lr_lambdas[0]
            if first and state["step"] < sched.warmup:
                sched.warmup = min(sched.warmup, int(config.warmup_ratio * horizon))
            sched.total = total_steps = horizon
            bar.total = horizon
            bar.refresh()

        model.train()
        stop = False
        try:
            while state["step"] < total_steps and not stop:
                batches = length_batches(
                    lengths, config.batch_size, seed=config.seed, epoch=state["epoch"]
                )
                usable = per_epoch_batches * acc.num_processes
                mine = batches[:usable][acc.process_index :: acc.num_processes]
                t0 = _now()
                while state["batch"] < len(mine):
                    idx = mine[state["batch"]]
                    state["batch"] += 1
                    tensors = collate([enc_train.ids[i] for i in idx], pad)
                    labels = torch.tensor([enc_train.labels[i] for i in idx], device=acc.device)
                    with acc.accumulate(model):
                        logits = model(
                            tensors["input_ids"].to(acc.device),
                            tensors["attention_mask"].to(acc.device),
                        )
                        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                        if not torch.isfinite(loss):
                            raise TrainingError(
                                f"loss became {loss.item()} at step {state['step'] + 1} "
                                f"(learning rate {scheduler.get_last_lr()[0]:.2g}); stopped. The last "
                                f"good checkpoint is kept in {ckpt_dir / 'last'} — lower "
                                "training.learning_rate and run again to resume from it"
                            )
                        acc.backward(loss)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        optimizer.step()
                        if acc.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad()
                    running.append(loss.item())
                    if not acc.sync_gradients:
                        continue
                    state["step"] += 1
                    step_times.append(_now() - t0)
                    t0 = _now()
                    tick()
                    bar.update(1)
                    step = state["step"]
                    if len(step_times) == 10:
                        replan(first=True)
                    if budget_s is not None and state["elapsed_s"] + eval_s >= budget_s:
                        total_steps = step  # no time for more: evaluate, checkpoint, stop
                    if step % config.log_every == 0 or step == total_steps:
                        row = {
                            "step": step,
                            "epoch": round(step / steps_per_epoch, 4),
                            "loss": float(np.mean(running)),
                            "lr": scheduler.get_last_lr()[0],
                        }
                        state["history"].append(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                        running = []
                    if step % eval_every == 0 or step >= total_steps:
                        e0 = _now()
                        stop = _evaluate(
                            acc, model, enc_val, data.labels, pad, config, state, ckpt_dir, main
                        )
                        eval_s = _now() - e0
                        tick()
                        if step < total_steps:
                            replan()
                        t0 = _now()
                    if step % config.checkpoint_every == 0 or stop or step >= total_steps:
                        tick()
                        checkpoint()
                    if stop or step >= total_steps:
                        break
                else:
                    state["epoch"] += 1
                    state["batch"] = 0
        except KeyboardInterrupt:
            if main:
                print(
                    f"\npeftkit: interrupted at step {state['step']}; the last checkpoint is in "
                    f"{ckpt_dir / 'last'}. Run the same command again to resume.",
                    file=sys.stderr,
                )
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        unwrapped = acc.unwrap_model(model)
        best = ckpt_dir / "best" / "trainable.safetensors"
        if best.is_file():
            load_trainable(unwrapped, load_file(str(best)))
        result = TrainResult(
            model=unwrapped,
            steps=state["step"],
            history=state["history"],
            best={"step": state["best_step"], config.metric: state["best_metric"]},
            trainable=trainable,
            total=total,
            seconds=seconds,
            step_seconds=float(np.median(step_times)) if step_times else 0.0,
            resumed_from=resumed_from,
        )
        if "test" in data.splits:
            test = data.split("test")
            enc_test = enc(test)
            metrics, logits = evaluate_split(
                unwrapped, enc_test, data.labels, pad, config.eval_batch_size, acc
            )
            result.test_metrics = metrics
            result.report = classification_report(
                list(enc_test.labels), logits.argmax(-1).tolist(), data.labels
            )
        if main:
            atomic_write_text(run_dir / "history.json", json.dumps(state["history"], indent=1))
        return result
    except BaseException:
        # leave the shared base as it was: take this run's adapter back out of it
        release(built)
        raise


def _evaluate(acc, model, enc_val, labels, pad, config, state, ckpt_dir, main) -> bool:
    """Evaluate on validation, keep the best weights; True when early stopping says stop."""
    metrics, logits = evaluate_split(
        acc.unwrap_model(model), enc_val, labels, pad, config.eval_batch_size, acc
    )
    _warn_if_collapsed(logits.argmax(-1), labels, state["step"], main)
    if config.metric not in metrics:
        raise ConfigError(f"training.metric={config.metric!r}; choose one of {sorted(metrics)}")
    value = metrics[config.metric]
    state["history"].append({"step": state["step"], **{f"eval_{k}": v for k, v in metrics.items()}})
    if state["best_metric"] is None or value > state["best_metric"]:
        state["best_metric"], state["best_step"], state["bad_evals"] = value, state["step"], 0
        if main:
            save_best(ckpt_dir / "best", acc.unwrap_model(model))
        return False
    state["bad_evals"] += 1
    return config.patience is not None and state["bad_evals"] >= config.patience


def _warn_if_collapsed(preds: np.ndarray, labels: tuple[str, ...], step: int, main: bool) -> None:
    """A run whose every validation row gets one label has collapsed (no NaN to catch it):
    say so while it can still be stopped, instead of letting it end at the majority rate."""
    if main and len(preds) >= 2 * len(labels) and bool((preds == preds[0]).all()):
        log.warning(
            "step %d: all %d validation rows are predicted %r; the model has collapsed to one "
            "label. Lower training.learning_rate (or check the training labels)",
            step,
            len(preds),
            labels[int(preds[0])],
        )


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
