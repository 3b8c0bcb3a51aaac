"""Execute a recipe: load the base and the data, train (or score a prompt), write the run
folder, register the adapter.

    from peftkit.config.recipes import load_recipe
    from peftkit.run.pipeline import run_recipe
    outcome = run_recipe(load_recipe("quickstart", ["training.max_steps=20"]))
    outcome.run_dir, outcome.metrics["accuracy"], outcome.entries   # ('runs/...', 0.9, [...])

Under ``accelerate launch`` every process runs this same function: they agree on the run
folder, train together (``train`` shards the batches and gathers the metrics), and only the
main process writes the run folder and the registry.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.recipes import Recipe
from peftkit.errors import ConfigError
from peftkit.run.builders import (
    Task,
    build_tasks,
    check_demonstrations,
    check_prompt,
    check_scorer,
    check_targets,
    load_recipe_base,
    load_task_data,
    quantization_of,
)
from peftkit.run.confidence import calibrate, check_calibration
from peftkit.run.folders import (
    METRICS_FILE,
    peak_rss_mb,
    run_id,
    run_name,
    write_json,
    write_report,
)
from peftkit.run.predictions import (
    PREDICTIONS_FILE,
    interval_metrics,
    interval_text,
    write_predictions,
)
from peftkit.run.prepare import BaseRefused, Made, prepare
from peftkit.run.promote import check_recipe_gates, promote_after_run

log = logging.getLogger("peftkit.run")  # the run's report: the CLI prints it


@dataclass
class RunOutcome:
    """What a run produced: its folder, headline metrics, and registered adapter refs."""

    run_dir: Path
    metrics: dict[str, Any]
    entries: list[str] = field(default_factory=list)
    resumed: bool = False


@dataclass
class Plan:
    """Everything a recipe is checked for before a model is loaded or a folder written."""

    name: str  # the run folder's name
    quantization: str | None
    tasks: list[Task] = field(default_factory=list)  # training recipes
    data: Any = None  # prompt recipes: the dataset and its training split (demonstrations)
    train_split: Any = None
    registry_root: Path | None = None  # where `adapter.init_from: NAME@V` is looked up


@dataclass
class RunContext:
    """What every step of one run shares (the base once it is loaded)."""

    recipe: Recipe
    plan: Plan
    path: Path
    registry: Any  # peftkit.registry.Registry, or None
    state: Any  # accelerate's PartialState
    run_id: str = ""
    base: Any = None  # peftkit.models.base.Base
    refs: dict[str, str] = field(default_factory=dict)  # task name -> its registered ref

    @property
    def main(self) -> bool:
        return bool(self.state.is_main_process)


def run_recipe(
    recipe: Recipe,
    *,
    run_dir: str | Path | None = None,
    registry: str | Path | None = None,
    overwrite: bool = False,
    runs_root: str | Path = "runs",
    out: TextIO | None = None,
) -> RunOutcome:
    """Run ``recipe`` end to end and return where its results are.

    ``run_dir`` defaults to ``runs_root/<name>-<timestamp>`` (or the newest unfinished run of
    the same recipe there, which is resumed); ``registry`` overrides ``recipe.registry.path``.
    Everything that can be checked without a model (presets, data, prompt, the model's
    config, the run folder) is checked first: a refused run loads nothing and writes nothing.
    The run's report (what it loaded, trained, scored and registered) goes to the
    ``peftkit.run`` logger, and to ``run.log``; ``out`` (a stream) gets it too. A library
    call prints nothing unless asked; the ``peftkit`` command prints it.
    """
    import torch
    from accelerate import PartialState

    plan = plan_run(recipe, registry=registry)
    # cpu=True on a machine without CUDA: under torchrun/accelerate launch that makes the
    # process group gloo (MULTI_CPU), the same state train()'s Accelerator then joins.
    state = PartialState(cpu=not torch.cuda.is_available())
    made: list[Made] = []  # the folders this run created, in the order it made them
    prepared = False
    try:
        with contextlib.ExitStack() as stack:
            path, reg, resumed = prepare(recipe, plan, state, stack, made, run_dir, registry,
                                         overwrite, runs_root, out)  # fmt: skip
            prepared = True
            ctx = RunContext(recipe, plan, path, reg, state)
            if recipe.prompt is not None:
                return _run_prompt(ctx)
            outcome = _train_all(ctx)
            outcome.resumed = resumed
            return outcome
    except ConfigError as exc:
        # refused while preparing (the run folder in use: a new registry was made) or once
        # the base was loaded, before any training: nothing worth keeping (the registry is
        # closed by now; the newest first: a run folder inside a new registry goes before
        # the registry is checked for strangers' files)
        if not prepared or isinstance(exc, BaseRefused):
            for folder in reversed(made):
                folder.remove()
        raise
    finally:
        for folder in made:
            folder.close()


def _say(ctx: RunContext, text: str) -> None:
    if ctx.main:  # every process runs the pipeline; one reports
        log.info(text)


def plan_run(recipe: Recipe, *, registry: str | Path | None = None) -> Plan:
    """Check everything ``recipe`` can be checked for without loading a model: adapter
    presets and their peft options, the data of every task (fields, labels, sizes), the
    prompt set and its labels, the head's start, the adapters continued (``init_from``:
    found in ``registry`` or the recipe's, same method and labels) and the rows replayed,
    and that the base model can be found (its config: the scorer a prompt's ``auto`` picks
    takes the demonstrations asked for)."""
    from peftkit.models.base import model_config
    from peftkit.run.continual import plan_continual

    if recipe.prompt is not None:
        data, train_split = load_task_data(recipe.data, need_train=recipe.prompt.demonstrations > 0)
        check_prompt(recipe, data)
        check_demonstrations(recipe, data, train_split)
        name = run_name(recipe.name, data.name)
        plan = Plan(name, recipe.base.quantization, data=data, train_split=train_split)
    else:
        root = Path(registry or recipe.registry.path)
        tasks = plan_continual(recipe, build_tasks(recipe), root)
        check_calibration(recipe, tasks)
        if recipe.promote is not None:  # the gates' data, before any training
            check_recipe_gates(recipe, tasks[0].data.labels)
        plan = Plan(_training_run_name(recipe, tasks[0]), quantization_of(recipe, tasks), tasks)
        plan.registry_root = root
    check_scorer(recipe, model_config(recipe.base.source))
    return plan


def _training_run_name(recipe: Recipe, first: Task) -> str:
    if recipe.registry.name:  # the user named what the run makes
        return recipe.registry.name
    return run_name(recipe.name, first.data.name)


def _train_all(ctx: RunContext) -> RunOutcome:
    from peftkit.run.continual import revisit_refs
    from peftkit.run.hotswap import hotswap, revisit

    recipe, tasks, registry = ctx.recipe, ctx.plan.tasks, ctx.registry
    ctx.base = load_recipe_base(recipe.base, ctx.plan.quantization)
    try:  # only the loaded base knows its module names
        check_targets(recipe, tasks, ctx.base)
    except ConfigError as exc:
        raise BaseRefused(str(exc)) from None
    ctx.run_id = run_id(ctx.path) if ctx.main else ""
    metrics: dict[str, Any] = {}
    entries: list[str] = []
    matrix: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        task_metrics, ref = _train_one(ctx, task, first=i == 0)
        if i == 0:
            metrics = task_metrics
        else:
            metrics.setdefault("tasks", {})[task.name] = task_metrics
        if ref:
            entries.append(ref)
            ctx.refs[task.name] = ref
        if recipe.revisit and ctx.main and registry is not None:
            scored = revisit_refs(tasks[: i + 1], entries)
            matrix[task.name] = revisit(ctx.base, registry, tasks[: i + 1], scored)
        ctx.state.wait_for_everyone()
    if recipe.revisit:
        metrics["revisit"] = matrix
    if recipe.hotswap is not None and ctx.main and registry is not None:
        metrics["hotswap"] = hotswap(ctx.base, registry, entries, recipe.hotswap)
    if recipe.promote is not None and ctx.main and registry is not None and entries:
        metrics["promotion"], text = promote_after_run(ctx.base, registry, entries[0], recipe)
        _say(ctx, f"\n{text}")
    metrics["peak_rss_mb"] = peak_rss_mb()
    if ctx.main:
        write_json(ctx.path / METRICS_FILE, metrics)  # last: marks the run finished
        _say(ctx, f"\nrun folder: {ctx.path}")
        if entries:
            _say(ctx, f"registered in {registry.root}: {', '.join(entries)}")
    ctx.state.wait_for_everyone()
    return RunOutcome(ctx.path, metrics, entries)


def _pairs_note(data) -> str:
    return ", text pairs" if any(s.text_pairs is not None for s in data.splits.values()) else ""


def _train_one(ctx: RunContext, task: Task, first: bool):
    from peftkit.adapters.folder import release
    from peftkit.run.continual import parent_folder
    from peftkit.training.prototypes import check_mean_pooling
    from peftkit.training.trackers import named
    from peftkit.training.train import train, untrained

    base, data, train_split = ctx.base, task.data, task.train_split
    _say(
        ctx,
        f"\n== {task.name}: {task.spec.method} on {data.name} "
        f"({len(train_split)} training rows, {len(data.labels)} labels{_pairs_note(data)})",
    )
    folder = ctx.path / task.folder
    if task.head is not None:
        check_mean_pooling(base, task.spec)
        _say(ctx, f"head starts from the prototypes of {len(train_split)} rows")
    parent, parent_ref = parent_folder(ctx, task, ctx.refs)
    keep = task.continual.keep_parent if task.continual is not None else 0.0
    if parent is not None:
        kept = f"; keeps {keep:g} of its weights after training" if keep else ""
        _say(ctx, f"continues {parent_ref or parent} (adapter.init_from{kept})")
    if task.continual is not None and task.continual.replay is not None:
        replay = task.continual.replay
        _say(ctx, f"replays {replay['rows']} rows of {replay['source']} "
             f"({replay['share']:.0%} of the training rows)")  # fmt: skip
    if task.config.objective == "contrastive":
        _say(ctx, "training.objective: contrastive - pairs of the rows train the body; the "
             "head is rebuilt on it")  # fmt: skip
    if task.config.max_steps == 0:
        _say(ctx, "training.max_steps: 0 - the prototype head is the classifier, untrained")
        result = untrained(base, data, task.head.head(base.model, base.tokenizer), task.config)
    else:
        run = ctx.path.name if first else f"{ctx.path.name}-{task.name}"  # the tracker's run
        result = train(
            base, task.spec, data, named(task.config, ctx.recipe.name, run), folder,
            train_split=train_split, head_init=task.head, init_from=parent, keep_parent=keep,
        )  # fmt: skip
    metrics: dict[str, Any] = {
        "recipe": ctx.recipe.name,
        "task": task.name,
        "method": task.spec.method,
        "data": data.name,
        **result.test_metrics,
        "trainable": result.trainable,
        "total": result.total,
        "trainable_share": round(result.trainable / max(result.total, 1), 6),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "step_seconds": round(result.step_seconds, 4),
        "best": result.best,
        "resumed_from": result.resumed_from,
        "processes": ctx.state.num_processes,
    }
    if result.test_probs is not None:
        metrics = interval_metrics(
            metrics, data.split("test").labels, result.test_probs.argmax(1), data.labels
        )
    ref = None
    try:
        if ctx.main:
            prefix = "" if first else f"{task.name}-"
            # before saving: the temperature and threshold go into task.json (and its hash)
            conf = calibrate(ctx.base, task, result, ctx.recipe.calibration, ctx.path, prefix)
            metrics.update(conf.metrics)
            note = "\n".join(t for t in (interval_text(metrics), conf.text) if t)
            # the registry entry keeps the test scores with their intervals and calibration
            scores = {k: v for k, v in metrics.items() if k in result.test_metrics or k in
                      conf.metrics or k.endswith("_ci95") or k == "ci_method"}  # fmt: skip
            ref = _publish(ctx, task, result, folder, prefix, note, parent_ref, scores)
            if ref is not None:
                metrics["registered"] = ref
    finally:
        # the shared base goes back as it was, whatever happened above
        release(result.model)
    return metrics, ref


def _publish(ctx: RunContext, task: Task, result, folder: Path, prefix: str, note: str,
             parent: str | None = None, scores: dict[str, Any] | None = None):  # fmt: skip
    """Save the trained adapter, write its report, test predictions and curves (``note``:
    the intervals line under the report), and register it with its lineage (``parent``:
    the ref it continued; its data's fingerprints; the replay) (once: the
    entry carries the run's id, so a resumed run finds its registration even when it was
    killed before recording it); ``scores``: the entry's metrics (default: the test
    metrics). Returns the registry ref, if any."""
    from peftkit.adapters.folder import save_adapter
    from peftkit.run.continual import lineage
    from peftkit.training.train import model_max_length

    data, registry = task.data, ctx.registry
    adapter = save_adapter(
        result.model,
        folder / "adapter",
        method=task.spec.method,
        labels=data.labels,
        # what training used: capped at the base's positions (train warned when it cut)
        max_length=model_max_length(task.config.max_length, ctx.base.model, warn=False),
    )
    if result.report is not None:
        title = f"{task.name} · {task.spec.method}"
        write_report(ctx.path, result.report, title=title, prefix=prefix, note=note)
        _say(ctx, f"\ntest report ({task.name}):\n{result.report.to_text()}\n{note}")
    if result.test_probs is not None:
        path = ctx.path / f"{prefix}{PREDICTIONS_FILE}"
        calibration = result.model.task.calibration  # what the adapter serves, as saved
        write_predictions(path, data.split("test"), data.labels, result.test_probs, calibration)
    if result.history:
        from peftkit.run.plots import plot_history

        contrastive = task.config.objective == "contrastive"
        loss_label = "train (pair loss)" if contrastive else "train (cross-entropy)"
        plot_history(result.history, ctx.path / f"{prefix}curves.png", loss_label=loss_label)
    if registry is None:
        return None
    run = f"{ctx.run_id}/{task.name}"
    done = folder / "registered.json"
    previous = registry.find_run(run)
    if previous is not None:
        write_json(done, {"ref": previous.ref, "run_id": run})
        _say(ctx, f"already registered as {previous.ref} (resumed run); not registering again")
        return previous.ref
    entry = registry.register(
        task.name,
        adapter,
        method=task.spec.method,
        labels=data.labels,
        base_fingerprint=ctx.base.fingerprint.id,
        base=ctx.base.fingerprint.to_dict(),
        quantization=ctx.base.quantization,
        task=ctx.recipe.registry.task or data.name,
        metrics=result.test_metrics if scores is None else scores,
        tags=ctx.recipe.registry.tags,
        run_id=run,
        lineage=lineage(task, parent),
    )
    write_json(done, {"ref": entry.ref, "run_id": run})
    _say(ctx, f"registered {entry.ref}")
    return entry.ref


def _run_prompt(ctx: RunContext) -> RunOutcome:
    """Score every template of the prompt (or the one named) on the evaluation split."""
    from peftkit.metrics.report import classification_report
    from peftkit.prompting.evaluation import evaluate_prompts

    recipe, plan, path = ctx.recipe, ctx.plan, ctx.path
    ref = recipe.prompt
    assert ref is not None
    data = plan.data
    base = load_recipe_base(recipe.base, recipe.base.quantization)
    run = evaluate_prompts(
        base,
        data,
        ref.set,
        templates=[ref.template] if ref.template else None,
        split=recipe.evaluation.split,
        scorer=ref.scorer,
        normalize=ref.normalize,
        calibration=ref.calibration,
        demonstrations=ref.demonstrations,
        demo_selection=ref.demo_selection,
        max_rows=recipe.evaluation.max_rows,
        sample=recipe.evaluation.sample,
        demo_pool=plan.train_split,
        batch_size=recipe.evaluation.batch_size,
    )
    _say(ctx, f"\n== {plan.name}\n{run.table()}")
    run.save(path)
    head = run.results[0]  # the first template: not picked on the test split
    report = classification_report(list(run.gold), head.probs.argmax(1).tolist(), run.labels)
    note = interval_text(head.to_dict())
    write_report(path, report, title=f"{plan.name} · {head.template}", note=note)
    _say(ctx, f"\nreport ({head.template}):\n{report.to_text()}\n{note}")
    metrics = {
        "recipe": recipe.name,
        "method": run.config["method"],
        "data": data.name,
        **head.to_dict(),
        "calibration": ref.calibration,
        "templates": [r.to_dict() for r in run.results],
        "summary": run.summary(),
        "across_templates": run.across_templates(),  # the mean with its 95% interval
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(path / METRICS_FILE, metrics)
    _say(ctx, f"\nrun folder: {path}")
    return RunOutcome(path, metrics, [], False)
