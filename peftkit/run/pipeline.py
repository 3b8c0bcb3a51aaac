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
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.recipes import Recipe, TaskSpec, recipe_to_dict, task_training
from peftkit.errors import ConfigError, PeftkitError
from peftkit.run.folders import (
    ENVIRONMENT_FILE,
    METRICS_FILE,
    check_run_dir,
    default_run_dir,
    environment,
    interrupted_run,
    lock_run_dir,
    peak_rss_mb,
    prepare_run_dir,
    run_id,
    run_log,
    write_json,
    write_report,
)

log = logging.getLogger("peftkit.run.pipeline")


@dataclass
class RunOutcome:
    """What a run produced: its folder, headline metrics, and registered adapter refs."""

    run_dir: Path
    metrics: dict[str, Any]
    entries: list[str] = field(default_factory=list)
    resumed: bool = False


@dataclass
class _Task:
    name: str
    data: Any  # the loaded TextDataset
    train_split: Any
    spec: Any  # AdapterSpec
    config: Any  # TrainConfig
    folder: Path
    head_init: Any = None  # recipes.HeadInitSpec
    head: Any = None  # fewshot.Prototypes, when head_init is set


@dataclass
class _Plan:
    """Everything a recipe is checked for before a model is loaded or a folder written."""

    name: str  # the run folder's name
    quantization: str | None
    tasks: list[_Task] = field(default_factory=list)  # training recipes
    data: Any = None  # prompt recipes: the dataset and its training split (demonstrations)
    train_split: Any = None


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
    """
    import torch
    from accelerate import PartialState

    out = out or sys.stdout
    plan = plan_run(recipe)
    # cpu=True on a machine without CUDA: under torchrun/accelerate launch that makes the
    # process group gloo (MULTI_CPU), the same state train()'s Accelerator then joins.
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    resolved = recipe_to_dict(recipe)
    reg_root = Path(registry or recipe.registry.path)
    with contextlib.ExitStack() as stack:
        path: Path | None = None
        resumed = False
        reg = None
        if main:
            if run_dir is None:
                found = interrupted_run(runs_root, plan.name, resolved)
                run_dir = found or default_run_dir(plan.name, runs_root)
            check_run_dir(run_dir, resolved, overwrite=overwrite)
            reg = _open_registry(recipe, reg_root)
            if reg is not None:
                stack.callback(reg.close)
            stack.enter_context(lock_run_dir(run_dir))
            path, resumed = prepare_run_dir(run_dir, resolved, overwrite=overwrite)
            if resumed:
                print(f"peftkit: resuming the unfinished run in {path}", file=sys.stderr)
            write_json(path / ENVIRONMENT_FILE, environment(state.num_processes))
            stack.enter_context(run_log(path))
        path = Path(_broadcast(state, str(path) if path else None))
        say = _Say(out if main else None)
        if recipe.prompt is not None:
            return _run_prompt(recipe, plan, path, say)
        return _train_all(recipe, plan, path, reg, resumed, say, state)


def plan_run(recipe: Recipe) -> _Plan:
    """Check everything ``recipe`` can be checked for without loading a model: adapter
    presets and their peft options, the data of every task (fields, labels, sizes), the
    prompt set and its labels, the head's start, and that the base model can be found."""
    from peftkit.models.base import model_config

    if recipe.prompt is not None:
        data, train_split = load_task_data(recipe.data, need_train=recipe.prompt.demonstrations > 0)
        check_prompt(recipe, data)
        name = _run_name(recipe.name, data.name)
        plan = _Plan(name, recipe.base.quantization, data=data, train_split=train_split)
    else:
        tasks = [_main_task(recipe)] + [_then_task(recipe, t) for t in recipe.then]
        plan = _Plan(_training_run_name(recipe, tasks[0]), _quantization(recipe, tasks), tasks)
    model_config(recipe.base.source)
    return plan


def _run_name(name: str, data_name: str) -> str:
    """A run folder's name: the recipe's, and the data's when the recipe's does not say it
    (``zero-shot-sst2`` on AG News runs as ``zero-shot-sst2-ag_news``)."""
    plain = re.sub(r"[^A-Za-z0-9]+", "", data_name.lower())
    if not plain or plain in re.sub(r"[^A-Za-z0-9]+", "", name.lower()):
        return name
    return f"{name}-{re.sub(r'[^A-Za-z0-9._-]+', '-', data_name).strip('-.')}"[:128]


def _training_run_name(recipe: Recipe, first: _Task) -> str:
    if recipe.registry.name:  # the user named what the run makes
        return recipe.registry.name
    return _run_name(recipe.name, first.data.name)


def _quantization(recipe: Recipe, tasks: list[_Task]) -> str | None:
    """The one quantization every task's base shares; a PiSSA start is refused on it."""
    quant = {t.spec.quantization for t in tasks} - {None}
    if len(quant) > 1 or (recipe.base.quantization and quant - {recipe.base.quantization}):
        raise ConfigError(
            f"{recipe.source}: every task of a recipe shares one base, but they ask for "
            f"quantization {sorted(str(q) for q in quant | {recipe.base.quantization} - {None})}"
        )
    quantization = recipe.base.quantization or (quant.pop() if quant else None)
    if quantization:
        from peftkit.adapters.rewrite import check_init

        for t in tasks:
            check_init(t.spec.peft, quantized=True, where=f"{recipe.source}: task {t.name!r}")
    return quantization


def _open_registry(recipe: Recipe, reg_root: Path):
    """The registry a training recipe registers into (opened before training, so a damaged
    or read-only one is refused before the work, not after it)."""
    if recipe.prompt is not None or not recipe.registry.enabled:
        if recipe.revisit or recipe.hotswap:
            raise ConfigError(
                f"{recipe.source}: 'revisit' and 'hotswap' load the adapters from the "
                "registry; set registry.enabled: true"
            )
        return None
    from peftkit.registry.store import Registry

    if reg_root.exists() and not reg_root.is_dir():
        raise ConfigError(f"registry {reg_root} is a file, not a folder; give another --registry")
    return Registry(reg_root)


def _train_all(recipe, plan: _Plan, path: Path, registry, resumed: bool, say, state):
    main = state.is_main_process
    tasks = plan.tasks
    base = load_recipe_base(recipe.base, plan.quantization, say)
    run = run_id(path) if main else ""
    metrics: dict[str, Any] = {}
    entries: list[str] = []
    matrix: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        ctx = _Ctx(recipe, base, path, registry, say, state, run, first=i == 0)
        task_metrics, ref = _train_one(ctx, task)
        if i == 0:
            metrics = task_metrics
        else:
            metrics.setdefault("tasks", {})[task.name] = task_metrics
        if ref:
            entries.append(ref)
        if recipe.revisit and main and registry is not None:
            matrix[task.name] = _revisit(base, registry, tasks[: i + 1], entries, say)
        state.wait_for_everyone()
    if recipe.revisit:
        metrics["revisit"] = matrix
    if recipe.hotswap is not None and main and registry is not None:
        metrics["hotswap"] = _hotswap(base, registry, entries, recipe.hotswap, say)
    metrics["peak_rss_mb"] = peak_rss_mb()
    if main:
        write_json(path / METRICS_FILE, metrics)  # last: marks the run finished
        say(f"\nrun folder: {path}")
        if entries:
            say(f"registered in {registry.root}: {', '.join(entries)}")
    state.wait_for_everyone()
    return RunOutcome(path, metrics, entries, resumed)


@dataclass(frozen=True)
class _Ctx:
    """What every task of one run shares."""

    recipe: Recipe
    base: Any
    path: Path
    registry: Any
    say: Any
    state: Any
    run_id: str
    first: bool


def _preset(recipe: Recipe, ref, where: str):
    """The adapter preset a recipe names, with its overrides; an error names the recipe too
    (the preset file alone does not say where an override came from)."""
    from peftkit.config.presets import load_preset

    try:
        return load_preset(ref.preset, ref.overrides())
    except ConfigError as exc:
        raise ConfigError(
            f"{recipe.source}, {where}: {exc}{_override_named(recipe, exc)}"
        ) from None


def _override_named(recipe: Recipe, exc: Exception) -> str:
    """`` (override 'adapter.peft.r=0')`` when the preset's error is about a key that a
    command-line override set (the preset file alone cannot say where a value came from)."""
    for item in recipe.overrides:
        key = item.partition("=")[0].strip()
        tail = key.split(".adapter.", 1)[-1] if ".adapter." in key else key
        named = f"{tail} " in f"{exc} " or f"{tail}=" in str(exc)
        if tail.startswith("adapter.") and named:
            return f" (override {item!r})"
    return ""


def _main_task(recipe: Recipe) -> _Task:
    assert recipe.adapter is not None
    spec = _preset(recipe, recipe.adapter, "adapter")
    return _task(recipe, recipe.registry_name, recipe.data, spec, recipe.training,
                 Path(), recipe.adapter.head_init, "adapter.head_init")  # fmt: skip


def _then_task(recipe: Recipe, task: TaskSpec) -> _Task:
    ref = task.adapter or recipe.adapter
    assert ref is not None
    spec = _preset(recipe, ref, f"then: {task.name}: adapter")
    where = f"then: {task.name}: adapter.head_init"
    config = task_training(recipe, task)
    return _task(recipe, task.name, task.data, spec, config, Path("tasks", task.name),
                 ref.head_init, where)  # fmt: skip


def _task(recipe, name, data_spec, spec, config, folder, head_init, where) -> _Task:
    """One task with its data loaded and its head's start checked (no model needed)."""
    as_is = config.max_steps == 0  # no training: register the start head as it stands
    if as_is and (head_init is None or spec.method != "probe"):
        raise ConfigError(
            f"{recipe.source}: training.max_steps: 0 registers the prototype head untrained; "
            f"it needs adapter.preset: probe and adapter.head_init: prototypes (this task: "
            f"{spec.method}, head_init {'set' if head_init else 'unset'})"
        )
    data, train_split = load_task_data(data_spec)
    head = None
    if head_init is not None:
        head = prototypes_of(head_init, data, train_split, where=f"{recipe.source}: {where}")
    return _Task(name, data, train_split, spec, config, folder, head_init, head)


def prototypes_of(init, data, train_split, where: str = "adapter.head_init"):
    """A recipe's ``adapter.head_init: prototypes`` as a ``fewshot.Prototypes`` (built on the
    base to start from; rebuilt on the trained body by a contrastive objective). The label
    descriptions are checked against the data's labels here, before any model is loaded."""
    from peftkit.prompting.templates import load_prompt_set
    from peftkit.training.prototypes import Prototypes

    if init.prompt and init.descriptions:
        raise ConfigError(f"{where}: give prompt or descriptions, not both")
    descriptions: Any = init.descriptions or None
    if init.prompt:  # "SET/TEMPLATE", "SET", or a prompt file's path (+ "/TEMPLATE")
        family, template = init.prompt, None
        if "/" in family and not family.endswith((".yaml", ".yml")):
            family, _, template = family.rpartition("/")
        prompts = load_prompt_set(family)
        descriptions = prompts.get(template).verbalizer if template else prompts.describe()
        where = f"{where}.prompt: {init.prompt!r}"
    # Prototypes checks that the descriptions cover every label, naming ``where``
    return Prototypes(train_split, data.labels, descriptions, prior=init.prior, where=where)


def load_task_data(spec, *, need_train: bool = True) -> tuple[Any, Any]:
    """The dataset of a recipe's ``data:`` and its training split (few-shot when asked)."""
    from peftkit.data.load import few_shot, load_data

    data = load_data(
        spec.source,
        text_field=spec.text_field,
        label_field=spec.label_field,
        text_pair_field=spec.text_pair_field,
        labels=spec.labels,
        split_ratios=spec.split_ratios,
        seed=spec.seed,
        max_rows=spec.max_rows,
        sample=spec.sample,
        need_train=need_train,
    )
    train_split = data.split("train")
    if spec.few_shot_k:
        train_split = few_shot(train_split, spec.few_shot_k, spec.seed, label_names=data.labels)
    return data, train_split


def _pairs_note(data) -> str:
    return ", text pairs" if any(s.text_pairs is not None for s in data.splits.values()) else ""


def _train_one(ctx: _Ctx, task: _Task):
    from peftkit.adapters.folder import release
    from peftkit.training.prototypes import check_mean_pooling
    from peftkit.training.train import train, untrained

    base, say, data, train_split = ctx.base, ctx.say, task.data, task.train_split
    say(
        f"\n== {task.name}: {task.spec.method} on {data.name} "
        f"({len(train_split)} training rows, {len(data.labels)} labels{_pairs_note(data)})"
    )
    folder = ctx.path / task.folder
    if task.head is not None:
        check_mean_pooling(base, task.spec)
        say(f"head starts from the prototypes of {len(train_split)} rows")
    if task.config.objective == "contrastive":
        say("training.objective: contrastive - pairs of the rows train the body; the head is "
            "rebuilt on it")  # fmt: skip
    if task.config.max_steps == 0:
        say("training.max_steps: 0 - the prototype head is the classifier, untrained")
        result = untrained(base, data, task.head.head(base.model, base.tokenizer), task.config)
    else:
        result = train(
            base, task.spec, data, task.config, folder, train_split=train_split,
            head_init=task.head,
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
    ref = None
    try:
        if ctx.state.is_main_process:
            ref = _publish(ctx, task, result, folder)
            if ref is not None:
                metrics["registered"] = ref
    finally:
        # the shared base goes back as it was, whatever happened above
        release(result.model)
    return metrics, ref


def _publish(ctx: _Ctx, task: _Task, result, folder: Path):
    """Save the trained adapter, write its report and curves, and register it (once: the
    entry carries the run's id, so a resumed run finds its registration even when it was
    killed before recording it). Returns the registry ref, if any."""
    from peftkit.adapters.folder import save_adapter
    from peftkit.training.train import model_max_length

    say, data, registry = ctx.say, task.data, ctx.registry
    prefix = "" if ctx.first else f"{task.name}-"
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
        write_report(ctx.path, result.report, title=title, prefix=prefix)
        say(f"\ntest report ({task.name}):\n{result.report.to_text()}")
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
        say(f"already registered as {previous.ref} (resumed run); not registering again")
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
        metrics=result.test_metrics,
        tags=ctx.recipe.registry.tags,
        run_id=run,
    )
    write_json(done, {"ref": entry.ref, "run_id": run})
    say(f"registered {entry.ref}")
    return entry.ref


def _revisit(base, registry, tasks: list[_Task], refs: list[str], say) -> dict[str, float]:
    """Accuracy of every adapter so far on its own task's test split (continual learning)."""
    from peftkit.metrics.report import compute_metrics
    from peftkit.serving.adapted import AdaptedModel

    model = AdaptedModel(base, registry)
    scores = {}
    try:
        for task, ref in zip(tasks, refs, strict=False):
            data = task.data
            test = data.split("test")
            preds = model.predict(list(test.texts), adapter=ref)
            ids = [data.labels.index(p.label) for p in preds]
            scores[task.name] = compute_metrics(list(test.labels), ids, data.labels)["accuracy"]
    finally:
        model.close()
    say(
        "revisit (accuracy on each earlier task): "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    )
    return scores


def _hotswap(base, registry, refs: list[str], spec, say) -> dict[str, Any]:
    """Switch between the adapters just trained; time ``use()`` and predict a mixed batch."""
    from peftkit.serving.adapted import AdaptedModel

    model = AdaptedModel(base, registry)
    try:
        t0 = time.perf_counter()
        for ref in refs:
            model.load(ref)
        load_ms = (time.perf_counter() - t0) * 1000 / max(len(refs), 1)
        times = []
        for i in range(spec.repeats):
            t0 = time.perf_counter()
            model.use(refs[i % len(refs)])
            times.append((time.perf_counter() - t0) * 1000)
        texts = list(spec.texts)
        adapters = [refs[i % len(refs)] for i in range(len(texts))]
        preds = model.predict_mixed(texts, adapters)
    finally:
        model.close()
    use_ms = statistics.median(times) if times else 0.0
    say(f"\nhot-swap between {', '.join(refs)}: load {load_ms:.1f} ms each, use() {use_ms:.3f} ms")
    say("mixed batch (each row names its adapter):")
    width = max(len(r) for r in refs)
    for text, pred in zip(texts, preds, strict=True):
        say(f"  {pred.adapter:<{width}}  {pred.label:<12} {pred.score:.2f}  {text[:60]}")
    rows = [{"text": t, **p.to_dict()} for t, p in zip(texts, preds, strict=True)]
    return {
        "adapters": refs,
        "load_ms": round(load_ms, 2),
        "use_ms": round(use_ms, 4),
        "batch": rows,
    }


# --- prompt recipes: zero-/few-shot scoring, no training -------------------------------------


def check_prompt(recipe: Recipe, data) -> None:
    """The prompt set exists, has the template named, and describes every label of the data."""
    from peftkit.prompting.templates import load_prompt_set

    ref = recipe.prompt
    assert ref is not None
    try:
        prompts = load_prompt_set(ref.set)
        chosen = [prompts.get(ref.template)] if ref.template else list(prompts)
        for prompt in chosen:
            prompt.verbalizer.for_labels(data.labels, where=f"prompt {prompt.name!r}")
    except PeftkitError as exc:
        raise type(exc)(f"{recipe.source}: prompt: {exc}") from None


def _run_prompt(recipe: Recipe, plan: _Plan, path: Path, say) -> RunOutcome:
    """Score every template of the prompt (or the one named) on the evaluation split."""
    from peftkit.metrics.report import classification_report
    from peftkit.prompting.evaluation import evaluate_prompts

    ref = recipe.prompt
    assert ref is not None
    data = plan.data
    base = load_recipe_base(recipe.base, recipe.base.quantization, say)
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
        say=say,
    )
    say(f"\n== {plan.name}\n{run.table()}")
    run.save(path)
    head = run.results[0]  # the first template: not picked on the test split
    report = classification_report(list(run.gold), head.probs.argmax(1).tolist(), run.labels)
    write_report(path, report, title=f"{plan.name} · {head.template}")
    say(f"\nreport ({head.template}):\n{report.to_text()}")
    metrics = {
        "recipe": recipe.name,
        "method": run.config["method"],
        "data": data.name,
        **head.to_dict(),
        "calibration": ref.calibration,
        "templates": [r.to_dict() for r in run.results],
        "summary": run.summary(),
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(path / METRICS_FILE, metrics)
    say(f"\nrun folder: {path}")
    return RunOutcome(path, metrics, [], False)


class _Say:
    """Print to the run's output (main process only) and log to run.log."""

    def __init__(self, out: TextIO | None):
        self.out = out

    def __call__(self, text: str) -> None:
        if self.out is None:
            return
        print(text, file=self.out, flush=True)
        log.info(text.strip())


def load_recipe_base(spec, quantization: str | None, say):
    """Load a recipe's ``base:`` (``quantization``: the one its tasks settled on), saying so."""
    from peftkit.models.base import load_base

    dtype = f", dtype {spec.dtype}" if spec.dtype else ""
    say(f"loading base {spec.source!r} (quantization: {quantization or 'none'}{dtype})")
    return load_base(
        spec.source,
        kind=spec.kind,
        quantization=quantization,
        double_quant=spec.double_quant,
        dtype=spec.dtype,
    )


def _broadcast(state, value: Any) -> Any:
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
