"""One training loop for every method, on Accelerate.

    result = train(base, load_preset("lora"), data, TrainConfig(epochs=2), run_dir)

Seeded, length-bucketed batches; gradient accumulation; AdamW with warmup then linear or
cosine decay; evaluation every ``eval_every`` steps with early stopping on a validation
metric and the best weights kept; a checkpoint of the trainable weights, optimizer,
scheduler and RNG every ``checkpoint_every`` steps (written to a temporary folder, then
renamed), from which a killed run resumes to the same steps; a NaN loss stops the run with
the last good checkpoint intact. Under ``accelerate launch`` each process takes its share of
every batch list; only the main process writes.

``max_minutes`` gives the training loop a wall-clock budget, carried over a resume. It
covers training steps, validation evaluations and checkpoints, and keeps room for the final
test evaluation (its time estimated from the validation evaluation's time per row × the
test rows); loading the model, encoding the data and writing reports are outside it. After
the first steps and after every evaluation the loop re-estimates how many steps fit in what
is left and the learning-rate schedule decays to that horizon, never rising when it moves,
so a budgeted run ends annealed rather than cut off mid-schedule.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.adapters.folder import release
from peftkit.adapters.model import TaskModel, build_task_model, unpack_base, verbalizer_token_ids
from peftkit.adapters.parent import ParentWeights, continue_from
from peftkit.adapters.task import TaskInfo
from peftkit.config.presets import AdapterSpec, method_row
from peftkit.config.recipe_checks import check_keep_parent
from peftkit.config.training import TrainConfig
from peftkit.data.batching import Encoded, apply_template, encode, pad_id, position_limit
from peftkit.data.load import Split, TextDataset
from peftkit.errors import ConfigError
from peftkit.metrics.report import classification_report
from peftkit.paths import atomic_write_text
from peftkit.training.contrastive import contrastive_pairs
from peftkit.training.loop import TrainLoop
from peftkit.training.predict import evaluate_split, predict_logits
from peftkit.training.prototypes import Prototypes, check_mean_pooling
from peftkit.training.trackers import Tracking, accelerator_kwargs, check_installed, start

__all__ = [
    "TrainConfig",
    "TrainResult",
    "config_dict",
    "evaluate_split",
    "model_max_length",
    "predict_logits",
    "split_encoder",
    "train",
]
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: TaskModel
    steps: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    test_metrics: dict[str, float] = field(default_factory=dict)
    report: Any = None
    test_probs: Any = None  # (test rows, labels) softmax probabilities, in the split's order
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    resumed_from: int = 0

    # `with train(...) as result:` gives the shared base back when the block ends
    def __enter__(self) -> TrainResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.release()


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
    init_from: str | Path | None = None,
    keep_parent: float = 0.0,
) -> TrainResult:
    """Train ``spec`` on ``data`` and return the best model (in eval mode, wrapping the
    shared base until released), its history and test report. The model knows its task
    (``result.model.task``: labels, method, max length, template, base)::

        with train(base, load_preset("lora"), data, TrainConfig(), "runs/sst2") as result:
            result.model.save_pretrained("adapters/sst2")
        # the block's end released the adapter: the base is as load_base gave it

    ``run_dir`` holds ``checkpoints/`` (resumable state, best weights) and ``history.json``.
    Starting again on the same ``run_dir`` resumes from the last checkpoint. ``config.log_with``
    sends the loss, learning rate, evaluations and test report to an experiment tracker too
    (``peftkit.training.trackers``; by default it writes under ``run_dir``).

    ``template`` (``"{text} Sentiment:"``) formats every input; ``verbalizer`` (label ->
    word) starts the head from a causal LM's own rows for the label words' first tokens,
    so training fine-tunes the LM's label-word scores (pattern-based fine-tuning).
    ``head_init`` (an ``adapters.Head`` of the task's labels, e.g. ``fewshot.prototype_head``,
    or a ``fewshot.Prototypes`` to build one on the base) is the head training starts from
    instead of a fresh one; it is copied, not changed. ``init_from`` (an adapter folder of
    the same method and base, e.g. a registry entry's ``path``) continues that adapter: its
    weights and its labels' head rows are where training starts (``adapters.parent``);
    ``keep_parent`` (in [0, 1)) then blends that share of the parent's weights back into the
    trained ones (``ParentWeights.blend_into``) before the test split is scored.

    ``config.objective="contrastive"`` trains the body on pairs of the training rows
    (``peftkit.training.contrastive``) and not the head, which must be a ``fewshot.Prototypes``: it
    is rebuilt on the trained body before every evaluation and at the end.
    """
    from accelerate import Accelerator

    if config.max_steps == 0:
        raise ConfigError(
            "training.max_steps=0 trains nothing: use train.untrained(base, data, head, config) "
            "to evaluate a start head as it stands"
        )
    if keep_parent and init_from is None:
        raise ConfigError(
            "adapter.keep_parent blends the trained adapter with the one it continued: it "
            "needs adapter.init_from"
        )
    check_keep_parent(keep_parent)
    if init_from is not None and head_init is not None:
        raise ConfigError(
            "adapter.init_from continues a trained adapter's head; it cannot also start the "
            "head from adapter.head_init (give one)"
        )
    check_installed(config.log_with)  # before any work: a tracker's library is an extra
    contrastive = config.objective == "contrastive"
    prototypes = head_init if isinstance(head_init, Prototypes) else None
    if contrastive and (prototypes is None or method_row(spec.method).saved_as == "head"):
        raise ConfigError(
            "training.objective: contrastive trains the body and rebuilds a prototype head "
            "on it: it needs adapter.head_init: prototypes and an adapter that trains the "
            f"body (this run: {spec.method}, head_init "
            f"{type(head_init).__name__ if head_init is not None else 'unset'})"
        )
    if prototypes is not None:
        check_mean_pooling(base, spec)
        if prototypes.labels != tuple(data.labels):
            raise ConfigError(
                f"head_init prototypes are for labels {list(prototypes.labels)}, but the data's "
                f"are {list(data.labels)}"
            )
        if prototypes.template not in (None, template):
            raise ConfigError(
                f"head_init prototypes embed their examples with template "
                f"{prototypes.template!r}, but training formats them with {template!r}"
            )
        prototypes = replace(prototypes, template=template)
        head_init = prototypes.head(base.model, base.tokenizer)
    run_dir = Path(run_dir)
    acc = accelerator or Accelerator(
        gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available(),
        **accelerator_kwargs(config, run_dir),
    )  # fmt: skip
    tokenizer = base.tokenizer
    train_rows = train_split or data.split("train")
    val_name = "validation" if "validation" in data.splits else "test"

    max_length = model_max_length(config.max_length, base.model)
    enc = split_encoder(tokenizer, max_length, template)
    enc_train = enc(train_rows)
    enc_val = enc(data.split(val_name))
    if enc_train.truncated:
        log.info(
            "%d of %d training rows cut to %d tokens",
            enc_train.truncated,
            len(enc_train),
            max_length,
        )
    if config.loraplus_lr_ratio is not None and method_row(spec.method).family != "lora":
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

    if head_init is not None and head_init.linear.out_features != len(data.labels):
        raise ConfigError(
            f"head_init has {head_init.linear.out_features} outputs but the data has "
            f"{len(data.labels)} labels"
        )
    try:
        model = build_task_model(
            base, spec, labels=data.labels, max_length=max_length, template=template,
            seed=config.seed, verbalizer=token_ids,
        )  # fmt: skip
    except ValueError as exc:
        if "target modules" not in str(exc).lower() or isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"adapter.peft.target_modules: {spec.peft.get('target_modules')!r} matches no "
            "module of the base model; name modules it has (e.g. its attention projections)"
        ) from None
    if verbalizer is not None:  # recorded as words: serving needs no tokenizer to read them
        model.task = replace(model.task, verbalizer={lab: verbalizer[lab] for lab in data.labels})
    tracking = Tracking(acc)  # training.log_with's run, started once the loop is set up
    try:
        parent = None
        if init_from is not None:
            rows = continue_from(model, init_from)
            parent = ParentWeights(model, rows) if keep_parent else None
        if head_init is not None:
            _start_head(model, head_init)
        pad = pad_id(tokenizer)
        pairs = refit = None
        if contrastive:
            assert prototypes is not None
            pairs = contrastive_pairs(enc_train.labels, config.seed)
            model.head.requires_grad_(False)  # rebuilt, not trained
            refit = _refit(prototypes, tokenizer)
        test_rows = len(data.split("test")) if "test" in data.splits else 0
        loop = TrainLoop(
            acc, model, spec, config, enc_train, enc_val, data.labels, pad, run_dir,
            pairs=pairs, refit=refit, test_rows=test_rows,
        )  # fmt: skip
        params = {**asdict(config), "method": spec.method, "data": data.name}
        tracking = start(acc, config, run_dir, {**params, "train_rows": len(train_rows)},
                         resumed_from=loop.resumed_from)  # fmt: skip
        loop.run()
        state = loop.state
        best = loop.load_best()
        if parent is not None:
            parent.blend_into(best, keep_parent)
            log.info("kept %g of the parent's weights (adapter.keep_parent)", keep_parent)
        result = TrainResult(
            model=best,
            steps=state["step"],
            history=state["history"],
            best={"step": state["best_step"], config.metric: state["best_metric"]},
            trainable=loop.trainable,
            total=loop.total,
            seconds=loop.seconds,
            step_seconds=float(np.median(loop.step_times)) if loop.step_times else 0.0,
            resumed_from=loop.resumed_from,
        )
        _test(result, data, enc, pad, config, acc)
        report = result.report.to_text() if result.report is not None else None
        tracking.final(result.test_metrics, report, result.steps)
        tracking.close()
        if acc.is_main_process:
            atomic_write_text(run_dir / "history.json", json.dumps(result.history, indent=1))
        return result
    except BaseException:
        tracking.close(failed=True)
        # leave the shared base as it was: take this run's adapter back out of it
        release(model)
        raise


def model_max_length(requested: int, model: Any, *, warn: bool = True) -> int:
    """``requested`` (``training.max_length``), capped at the positions ``model`` has, with
    a warning when it is: longer rows would index past its position table."""
    limit = position_limit(getattr(model, "config", None))
    if limit is None or requested <= limit:
        return requested
    if not warn:
        return limit
    log.warning(
        "training.max_length=%d is more than this model's %d positions; rows are cut to %d "
        "tokens for training and evaluation",
        requested,
        limit,
        limit,
    )
    return limit


def split_encoder(tokenizer: Any, max_length: int, template: str | None):
    """Split -> token ids as training and evaluation see them (``template`` formats texts)."""

    def enc(split: Split) -> Encoded:
        if template is None:
            return encode(tokenizer, split.texts, split.labels, max_length, split.text_pairs)
        texts = apply_template(template, split.texts, split.text_pairs)
        return encode(tokenizer, texts, split.labels, max_length, keep_end=True)

    return enc


def _test(result: TrainResult, data: TextDataset, enc, pad: int, config: TrainConfig, acc) -> None:
    """Fill ``result``'s test metrics and report when the data has a test split."""
    if "test" in data.splits:
        enc_test = enc(data.split("test"))
        metrics, logits = evaluate_split(
            result.model, enc_test, data.labels, pad, config.eval_batch_size, acc
        )
        result.test_metrics = metrics
        result.test_probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        result.report = classification_report(
            list(enc_test.labels), logits.argmax(-1).tolist(), data.labels
        )


def untrained(
    base: Any, data: TextDataset, head: Any, config: TrainConfig, *, accelerator: Any = None
) -> TrainResult:
    """No training (``training.max_steps: 0``): ``head`` (e.g. ``fewshot.prototype_head``)
    on the frozen base as it stands, a ``probe`` adapter, with its test report."""
    from accelerate import Accelerator

    from peftkit.training.prototypes import prototype_probe

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    model = prototype_probe(base, copy.deepcopy(head)).eval()
    max_length = model_max_length(config.max_length, base.model)
    _, origin = unpack_base(base)
    model.task = TaskInfo(
        method="probe", labels=tuple(data.labels), pooling=model.pooling,
        max_length=max_length, hidden_size=model.head.linear.in_features, **origin,
    )  # fmt: skip
    trainable = sum(p.numel() for p in model.head.parameters())
    total = trainable + sum(p.numel() for p in model.body.parameters())
    result = TrainResult(
        model=model, steps=0, history=[], best={}, trainable=trainable, total=total
    )

    enc = split_encoder(base.tokenizer, max_length, None)
    _test(result, data, enc, pad_id(base.tokenizer), config, acc)
    return result


def _refit(prototypes: Prototypes, tokenizer: Any):
    """Rebuild the prototype head on the model's current body, in place (the optimizer and
    any distributed wrapper keep the same module)."""

    def refit(model: TaskModel) -> None:
        head = prototypes.head(model, tokenizer)
        with torch.no_grad():
            model.head.linear.weight.copy_(head.linear.weight)
            model.head.linear.bias.copy_(head.linear.bias)

    return refit


def _start_head(model: TaskModel, head_init: Any) -> None:
    """Train from a copy of ``head_init`` (keeping the preset's head dropout)."""
    start = copy.deepcopy(head_init).train()
    start.dropout = model.head.dropout
    model.head = start.to(next(model.head.parameters()).device)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
