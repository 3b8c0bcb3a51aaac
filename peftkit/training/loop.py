"""The training loop behind :func:`peftkit.training.train.train`, and prediction over encoded rows.

``TrainLoop`` owns one run: the prepared model, optimizer and schedule, the state a kill
must not lose, the time budget. ``train`` builds the model, runs the loop and reports.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftkit.adapters.model import TaskModel, trainable_parameters
from peftkit.config.presets import AdapterSpec
from peftkit.data.batching import Encoded, collate, length_batches
from peftkit.errors import ConfigError, TrainingError
from peftkit.training.checkpoints import (
    find_checkpoint,
    load_trainable,
    read_weights,
    restore_checkpoint,
    save_best,
    save_checkpoint,
)
from peftkit.training.contrastive import cosine_pair_loss
from peftkit.training.predict import evaluate_split, warn_if_collapsed
from peftkit.training.schedule import (
    budget_horizon,
    final_eval_reserve,
    make_optimizer,
    make_scheduler,
)
from peftkit.training.trackers import log_row

if TYPE_CHECKING:
    from peftkit.config.training import TrainConfig

log = logging.getLogger(__name__)
budget_log = logging.getLogger("peftkit.training.train")  # the budget's lines go with the run's own


def clock() -> float:
    """The training clock, in seconds (a test may replace it to make time pass)."""
    return time.perf_counter()


class TrainLoop:
    """One run of the training loop, fresh or resumed from ``run_dir``'s last checkpoint.

    Its end is the schedule's horizon (``horizon``): the configured length, moved earlier
    by a time budget; everything the loop must carry over a kill is in ``state`` and the
    checkpoint.
    """

    def __init__(
        self,
        acc: Any,
        model: TaskModel,
        spec: AdapterSpec,
        config: TrainConfig,
        enc_train: Encoded,
        enc_val: Encoded,
        labels: tuple[str, ...],
        pad: int,
        run_dir: Path,
        *,
        pairs: list[tuple[int, int, float]] | None = None,
        refit: Callable[[TaskModel], None] | None = None,
        test_rows: int = 0,
    ) -> None:
        """``pairs`` (``contrastive.contrastive_pairs`` over ``enc_train``'s rows): train the
        body on them with the cosine pair loss instead of the head on the rows; ``refit``
        rebuilds the head on the current body before every evaluation and at the end.
        ``test_rows``: the rows of the final test evaluation, whose time a budget keeps."""
        self.acc, self.config, self.labels, self.pad = acc, config, labels, pad
        self.pairs, self.refit, self.test_rows = pairs, refit, test_rows
        self.enc_train, self.enc_val = enc_train, enc_val
        self.main = acc.is_main_process
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        self.trainable, self.total = trainable_parameters(model)
        lr = spec.learning_rate if config.learning_rate is None else config.learning_rate
        optimizer = make_optimizer(model, lr, config.weight_decay, config.loraplus_lr_ratio)
        self.lengths = [len(r) for r in enc_train.ids]
        if pairs is not None:  # batches are of pairs: bucket them by their longer text
            self.lengths = [max(self.lengths[a], self.lengths[b]) for a, b, _ in pairs]
        self.per_epoch_batches = (
            len(length_batches(self.lengths, config.batch_size, seed=config.seed, epoch=0))
            // acc.num_processes
        )
        if self.per_epoch_batches == 0:
            raise ConfigError(
                f"{len(self.lengths)} training {'pairs' if pairs else 'rows'} make no batch of "
                f"{config.batch_size} per process on {acc.num_processes} processes"
            )
        self.steps_per_epoch = max(1, self.per_epoch_batches // config.grad_accum)
        self.cap_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(
            optimizer, config.scheduler, self.cap_steps, int(config.warmup_ratio * self.cap_steps)
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.desc = f"train {spec.method}"
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "history": [],
            "best_metric": None,
            "best_step": 0,
            "bad_evals": 0,
            "elapsed_s": 0.0,  # wall-clock seconds spent in the loop, over every resume
        }
        self.resumed_from = self._resume()
        self.budget_s = None if config.max_minutes is None else 60.0 * config.max_minutes
        self.eval_s = 0.0  # the last evaluation's cost, for the budget
        self.reserve_s = 0.0  # the final test evaluation's expected cost, kept out of it
        self.step_times: list[float] = []
        self.running: list[float] = []
        self.seconds = 0.0

    @property
    def horizon(self) -> int:
        """The step this run ends at: the schedule's end, which a time budget moves."""
        return int(self.scheduler.lr_lambdas[0].total)

    def _resume(self) -> int:
        """Load ``run_dir``'s last checkpoint if there is one; the step it resumes from."""
        found = find_checkpoint(self.ckpt_dir / "last")
        if found is None:
            torch.manual_seed(self.config.seed)
            return 0
        unwrapped = self.acc.unwrap_model(self.model)
        self.state = restore_checkpoint(
            found, unwrapped, self.optimizer, self.scheduler, total_steps=self.cap_steps
        )
        self.state.setdefault("elapsed_s", 0.0)
        sched = self.scheduler.lr_lambdas[0]  # its horizon came back with the checkpoint
        budgeted = self.config.max_minutes is not None
        end = min(sched.total, self.cap_steps) if budgeted else self.cap_steps
        sched.replan(int(self.state["step"]), end)
        if self.main:
            print(
                f"peftkit: resuming {self.run_dir} from step {self.state['step']}", file=sys.stderr
            )
        return int(self.state["step"])

    def run(self) -> None:
        """Train to the horizon, an early stop or the end of the budget, checkpointing."""
        from tqdm.auto import tqdm

        state, acc = self.state, self.acc
        show = self.config.progress
        self.bar = tqdm(
            total=self.horizon,
            initial=state["step"],
            desc=self.desc,
            disable=(not self.main)
            or (show is False)
            or (show is None and not sys.stderr.isatty()),
        )
        start = time.perf_counter()
        self.clock = clock()
        self._log_budget()
        self.model.train()
        stop = False
        try:
            while state["step"] < self.horizon and not stop:
                batches = length_batches(
                    self.lengths,
                    self.config.batch_size,
                    seed=self.config.seed,
                    epoch=state["epoch"],
                )
                usable = self.per_epoch_batches * acc.num_processes
                mine = batches[:usable][acc.process_index :: acc.num_processes]
                self.t0 = clock()
                while state["batch"] < len(mine):
                    idx = mine[state["batch"]]
                    state["batch"] += 1
                    if not self._train_batch(idx):
                        continue  # accumulating gradients
                    stop = self._after_step()
                    if stop or state["step"] >= self.horizon:
                        break
                else:
                    state["epoch"] += 1
                    state["batch"] = 0
        except KeyboardInterrupt:
            # said once, by whoever catches it (the CLI adds the command that resumes)
            last = self.ckpt_dir / "last"
            try:
                kept = find_checkpoint(last)
            except TrainingError:  # said when the run resumes
                kept = last
            raise KeyboardInterrupt(
                f"at step {state['step']}; the last checkpoint is in {last}"
                if kept is not None
                else f"at step {state['step']}, before the first checkpoint (resuming starts over)"
            ) from None
        finally:
            self.bar.close()
        self.seconds = time.perf_counter() - start

    def _train_batch(self, idx: list[int]) -> bool:
        """Forward and backward one batch; True when that completed an optimizer step."""
        acc, model = self.acc, self.model
        with acc.accumulate(model):
            loss = self._pair_loss(idx) if self.pairs is not None else self._row_loss(idx)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {self.state['step'] + 1} "
                    f"(learning rate {self.scheduler.get_last_lr()[0]:.2g}); stopped. The last "
                    f"good checkpoint is kept in {self.ckpt_dir / 'last'} — lower "
                    "training.learning_rate and run again to resume from it"
                )
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        self.running.append(loss.item())
        return bool(acc.sync_gradients)

    def _row_loss(self, idx: list[int]) -> torch.Tensor:
        """Cross-entropy of the head's logits on rows ``idx``."""
        device = self.acc.device
        tensors = collate([self.enc_train.ids[i] for i in idx], self.pad)
        labels = torch.tensor([self.enc_train.labels[i] for i in idx], device=device)
        logits = self.model(tensors["input_ids"].to(device), tensors["attention_mask"].to(device))
        return torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=self.config.label_smoothing
        )

    def _pair_loss(self, idx: list[int]) -> torch.Tensor:
        """The cosine pair loss on pairs ``idx``: both sides in one forward (each text its
        own dropout, as SetFit encodes them)."""
        assert self.pairs is not None
        pairs = [self.pairs[i] for i in idx]
        rows = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
        tensors = collate([self.enc_train.ids[r] for r in rows], self.pad)
        device = self.acc.device
        feats = self.model(
            tensors["input_ids"].to(device), tensors["attention_mask"].to(device), pooled=True
        )
        targets = torch.tensor([t for _, _, t in pairs], device=device)
        return cosine_pair_loss(feats[: len(pairs)], feats[len(pairs) :], targets)

    def _after_step(self) -> bool:
        """Count, log, evaluate and checkpoint after an optimizer step; True to stop early."""
        state, config = self.state, self.config
        state["step"] += 1
        step = state["step"]
        self.step_times.append(clock() - self.t0)
        self.t0 = clock()
        self._tick()
        self.bar.update(1)
        if len(self.step_times) == 10:
            self._replan(first=True)
        if self.budget_s is not None and self._out_of_time() and step < self.horizon:
            self.scheduler.lr_lambdas[0].replan(step, step)  # no time for more: evaluate, stop
            if self.main:
                budget_log.info(
                    "time budget: stopping at step %d (%.0f of %.0f s used)",
                    step,
                    state["elapsed_s"],
                    self.budget_s,
                )
        if step % config.log_every == 0 or step == self.horizon:
            row = {
                "step": step,
                "epoch": round(step / self.steps_per_epoch, 4),
                "loss": float(np.mean(self.running)),
                "lr": self.scheduler.get_last_lr()[0],
            }
            state["history"].append(row)
            log_row(self.acc, row)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
            self.running = []
            if self.main:
                log.info(
                    "step %d/%d: loss %.4f, lr %.3g", step, self.horizon, row["loss"], row["lr"]
                )
        stop = False
        if step % self.eval_every == 0 or step >= self.horizon:
            e0 = clock()
            stop = self._evaluate()
            self._measured_eval(clock() - e0)
            self._tick()
            if step < self.horizon:
                self._replan()
            self.t0 = clock()
        if step % config.checkpoint_every == 0 or stop or step >= self.horizon:
            self._tick()
            if self.main:
                save_checkpoint(
                    self.ckpt_dir / "last",
                    self.acc.unwrap_model(self.model),
                    self.optimizer,
                    self.scheduler,
                    state,
                )
            self.acc.wait_for_everyone()
        return stop

    def _tick(self) -> None:
        """Charge the time since the last tick to the budget."""
        now = clock()
        self.state["elapsed_s"] += now - self.clock
        self.clock = now

    def _out_of_time(self) -> bool:
        """No room for another step, the final validation and the test evaluation."""
        assert self.budget_s is not None
        return self.state["elapsed_s"] + self.eval_s + self.reserve_s >= self.budget_s

    def _measured_eval(self, seconds: float) -> None:
        """Record an evaluation's cost and, from it, the final test evaluation's."""
        first = self.eval_s == 0.0
        self.eval_s = seconds
        self.reserve_s = final_eval_reserve(seconds, len(self.enc_val), self.test_rows)
        if first and self.main and self.budget_s is not None and self.test_rows:
            budget_log.info(
                "time budget: the final test evaluation (%d rows) is expected to take %.1f s "
                "(%.4f s a row, as validation took); kept out of the training budget",
                self.test_rows,
                self.reserve_s,
                seconds / max(1, len(self.enc_val)),
            )

    def _log_budget(self) -> None:
        """Say what ``training.max_minutes`` bounds, once, as the loop starts."""
        if self.budget_s is None or not self.main:
            return
        final = (
            f"and keeps room for the final test evaluation ({self.test_rows} rows, its time "
            "estimated from the first validation evaluation)"
            if self.test_rows
            else "(no test split to evaluate after it)"
        )
        budget_log.info(
            "time budget: training.max_minutes=%g (%.0f s; %.0f s already spent) covers training "
            "steps, validation evaluations and checkpoints, %s; loading the model and data "
            "before it and writing reports after it are not counted",
            self.config.max_minutes,
            self.budget_s,
            self.state["elapsed_s"],
            final,
        )

    def _replan(self, first: bool = False) -> None:
        """Move the horizon to the steps that fit in the budget left (no budget: no-op)."""
        if self.budget_s is None or not self.step_times:
            return
        # the mean, not the median: length-bucketed steps vary, and the budget is a sum
        horizon = budget_horizon(
            self.state["step"],
            self.cap_steps,
            self.budget_s - self.state["elapsed_s"] - self.reserve_s,
            float(np.mean(self.step_times[-500:])),
            self.eval_s,
            self.eval_every,
        )
        sched = self.scheduler.lr_lambdas[0]
        warmup = int(self.config.warmup_ratio * horizon) if first else None
        before = sched.total
        sched.replan(self.state["step"], horizon, warmup)
        if self.main and horizon != before:
            budget_log.info(
                "time budget: step %d, training now ends at step %d (was %d)",
                self.state["step"],
                horizon,
                before,
            )
        self.bar.total = horizon
        self.bar.refresh()

    def _evaluate(self) -> bool:
        """Evaluate on validation, keep the best weights; True when early stopping says stop."""
        state, config, acc = self.state, self.config, self.acc
        if self.refit is not None:
            self.refit(acc.unwrap_model(self.model))
        metrics, logits = evaluate_split(
            acc.unwrap_model(self.model),
            self.enc_val,
            self.labels,
            self.pad,
            config.eval_batch_size,
            acc,
        )
        warn_if_collapsed(logits.argmax(-1), self.labels, state["step"], self.main)
        if config.metric not in metrics:
            raise ConfigError(f"training.metric={config.metric!r}; choose one of {sorted(metrics)}")
        value = metrics[config.metric]
        row = {"step": state["step"], **{f"eval_{k}": v for k, v in metrics.items()}}
        state["history"].append(row)
        log_row(acc, row)
        improved = state["best_metric"] is None or value > state["best_metric"]
        if improved:
            state["best_metric"], state["best_step"], state["bad_evals"] = value, state["step"], 0
            if self.main:
                save_best(self.ckpt_dir / "best", acc.unwrap_model(self.model))
        else:
            state["bad_evals"] += 1
        if self.main:
            log.info(
                "step %d: validation %s; best %s %.4f at step %d",
                state["step"],
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                config.metric,
                state["best_metric"],
                state["best_step"],
            )
        if improved:
            return False
        return config.patience is not None and state["bad_evals"] >= config.patience

    def load_best(self) -> TaskModel:
        """The trained model, with its best weights when there was an evaluation, in eval mode
        (dropout off: ready to predict; the shared base it wraps is left as it was loaded)."""
        unwrapped = self.acc.unwrap_model(self.model)
        best = self.ckpt_dir / "best" / "trainable.safetensors"
        if best.is_file():
            load_trainable(unwrapped, read_weights(best))
        if self.refit is not None:
            self.refit(unwrapped)
        return unwrapped.eval()
