"""Execute a recipe: load the base and the data, train (or score a prompt), write the run
folder, register the adapter.

    from peftkit.recipes import load_recipe
    from peftkit.pipeline import run_recipe
    outcome = run_recipe(load_recipe("quickstart", ["training.max_steps=20"]))
    outcome.run_dir, outcome.metrics["accuracy"], outcome.entries   # ('runs/...', 0.9, [...])

Under ``accelerate launch`` every process runs this same function: they agree on the run
folder, train together (``train`` shards the batches and gathers the metrics), and only the
main process writes the run folder and the registry.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftkit.errors import ConfigError
from peftkit.recipes import Recipe, TaskSpec, recipe_to_dict, task_training
from peftkit.runs import (
    ENVIRONMENT_FILE,
    METRICS_FILE,
    default_run_dir,
    environment,
    interrupted_run,
    peak_rss_mb,
    prepare_run_dir,
    run_log,
    write_json,
    write_report,
)

log = logging.getLogger("peftkit.pipeline")


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
    data: Any
    spec: Any
    config: Any
    folder: Path
    head_init: Any = None  # recipes.HeadInitSpec


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
    """
    import torch
    from accelerate import PartialState

    out = out or sys.stdout
    # cpu=True on a machine without CUDA: under torchrun/accelerate launch that makes the
    # process group gloo (MULTI_CPU), the same state train()'s Accelerator then joins.
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    resolved = recipe_to_dict(recipe)
    path: Path | None = None
    resumed = False
    if main:
        if run_dir is None:
            found = interrupted_run(runs_root, recipe.name, resolved)
            run_dir = found or default_run_dir(recipe.name, runs_root)
        path, resumed = prepare_run_dir(run_dir, resolved, overwrite=overwrite)
        if resumed:
            print(f"peftkit: resuming the unfinished run in {path}", file=sys.stderr)
        write_json(path / ENVIRONMENT_FILE, environment(state.num_processes))
    path = Path(_broadcast(state, str(path) if path else None))
    say = _Say(out if main else None)
    reg_root = Path(registry or recipe.registry.path)
    if main:
        with run_log(path):
            return _run(recipe, path, reg_root, resumed, say, state)
    return _run(recipe, path, reg_root, resumed, say, state)


def _run(recipe: Recipe, path: Path, reg_root: Path, resumed: bool, say, state) -> RunOutcome:
    if recipe.prompt is not None:
        metrics = _run_prompt(recipe, path, say)
        metrics["peak_rss_mb"] = peak_rss_mb()
        write_json(path / METRICS_FILE, metrics)
        say(f"\nrun folder: {path}")
        return RunOutcome(path, metrics, [], resumed)
    return _train_all(recipe, path, reg_root, resumed, say, state)


def _train_all(recipe, path: Path, reg_root: Path, resumed: bool, say, state) -> RunOutcome:
    main = state.is_main_process
    tasks = [_main_task(recipe, path)] + [_then_task(recipe, t, path) for t in recipe.then]
    quant = {t.spec.quantization for t in tasks} - {None}
    if len(quant) > 1 or (recipe.base.quantization and quant - {recipe.base.quantization}):
        raise ConfigError(
            f"{recipe.source}: every task of a recipe shares one base, but they ask for "
            f"quantization {sorted(quant | {recipe.base.quantization} - {None})}"
        )
    quantization = recipe.base.quantization or (quant.pop() if quant else None)
    if quantization:  # before loading anything: a PiSSA start cannot run on it
        from peftkit.residual import check_init

        for t in tasks:
            check_init(t.spec.peft, quantized=True, where=f"{recipe.source}: task {t.name!r}")
    base = load_recipe_base(recipe.base, quantization, say)
    if (recipe.revisit or recipe.hotswap) and not recipe.registry.enabled:
        raise ConfigError(
            f"{recipe.source}: 'revisit' and 'hotswap' load the adapters from the registry; "
            "set registry.enabled: true"
        )
    registry = None
    if main and recipe.registry.enabled:
        from peftkit.registry import Registry

        registry = Registry(reg_root)
    metrics: dict[str, Any] = {}
    entries: list[str] = []
    matrix: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        task_metrics, ref = _train_one(recipe, base, task, path, registry, say, state, i == 0)
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
            say(f"registered in {reg_root}: {', '.join(entries)}")
    state.wait_for_everyone()
    return RunOutcome(path, metrics, entries, resumed)


def _preset(recipe: Recipe, ref, where: str):
    """The adapter preset a recipe names, with its overrides; an error names the recipe too
    (the preset file alone does not say where an override came from)."""
    from peftkit.adapters import load_preset

    try:
        return load_preset(ref.preset, ref.overrides())
    except ConfigError as exc:
        raise ConfigError(f"{recipe.source}, {where}: {exc}") from None


def _main_task(recipe: Recipe, path: Path) -> _Task:
    assert recipe.adapter is not None
    spec = _preset(recipe, recipe.adapter, "adapter")
    return _Task(
        recipe.registry_name, recipe.data, spec, recipe.training, path, recipe.adapter.head_init
    )


def _then_task(recipe: Recipe, task: TaskSpec, path: Path) -> _Task:
    ref = task.adapter or recipe.adapter
    assert ref is not None
    spec = _preset(recipe, ref, f"then: {task.name}: adapter")
    folder = path / "tasks" / task.name
    config = task_training(recipe, task)
    return _Task(task.name, task.data, spec, config, folder, ref.head_init)


def prototypes_of(base, init, spec, data, train_split):
    """A recipe's ``adapter.head_init: prototypes`` as a ``fewshot.Prototypes`` (built on the
    base to start from; rebuilt on the trained body by a contrastive objective)."""
    from peftkit.errors import ConfigError
    from peftkit.fewshot import Prototypes, check_mean_pooling
    from peftkit.prompts import load_prompt_set

    check_mean_pooling(base, spec)
    if init.prompt and init.descriptions:
        raise ConfigError("adapter.head_init: give prompt or descriptions, not both")
    descriptions: Any = init.descriptions or None
    if init.prompt:  # "SET/TEMPLATE", "SET", or a prompt file's path (+ "/TEMPLATE")
        family, template = init.prompt, None
        if "/" in family and not family.endswith((".yaml", ".yml")):
            family, _, template = family.rpartition("/")
        prompts = load_prompt_set(family)
        descriptions = prompts.get(template).verbalizer if template else prompts.describe()
    return Prototypes(train_split, data.labels, descriptions, prior=init.prior)


def load_task_data(spec) -> tuple[Any, Any]:
    """The dataset of a recipe's ``data:`` and its training split (few-shot when asked)."""
    from peftkit.data import few_shot, load_data

    data = load_data(
        spec.source,
        text_field=spec.text_field,
        label_field=spec.label_field,
        text_pair_field=spec.text_pair_field,
        labels=spec.labels,
        split_ratios=spec.split_ratios,
        seed=spec.seed,
        max_rows=spec.max_rows,
    )
    train_split = data.split("train")
    if spec.few_shot_k:
        train_split = few_shot(train_split, spec.few_shot_k, spec.seed, label_names=data.labels)
    return data, train_split


def _train_one(recipe, base, task: _Task, path: Path, registry, say, state, first: bool):
    from peftkit.artifacts import release
    from peftkit.train import train, untrained

    as_is = task.config.max_steps == 0  # no training: register the start head as it stands
    if as_is and (task.head_init is None or task.spec.method != "probe"):
        raise ConfigError(
            "training.max_steps: 0 registers the prototype head untrained; it needs "
            f"adapter.preset: probe and adapter.head_init: prototypes (this task: "
            f"{task.spec.method}, head_init {'set' if task.head_init else 'unset'})"
        )
    data, train_split = load_task_data(task.data)
    say(
        f"\n== {task.name}: {task.spec.method} on {data.name} "
        f"({len(train_split)} training rows, {len(data.labels)} labels)"
    )
    folder = task.folder
    head = None
    if task.head_init is not None:
        head = prototypes_of(base, task.head_init, task.spec, data, train_split)
        say(f"head starts from the prototypes of {len(train_split)} rows")
    if task.config.objective == "contrastive":
        say("training.objective: contrastive - pairs of the rows train the body; the head is "
            "rebuilt on it")  # fmt: skip
    if as_is:
        say("training.max_steps: 0 - the prototype head is the classifier, untrained")
        assert head is not None  # as_is needs head_init (checked above)
        result = untrained(base, data, head.head(base.model, base.tokenizer), task.config)
    else:
        result = train(
            base, task.spec, data, task.config, folder, train_split=train_split, head_init=head
        )
    prefix = "" if first else f"{task.name}-"
    metrics: dict[str, Any] = {
        "recipe": recipe.name,
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
        "processes": state.num_processes,
    }
    ref = None
    try:
        if state.is_main_process:
            ref = _publish(recipe, base, task, data, result, path, registry, say, prefix)
            if ref is not None:
                metrics["registered"] = ref
    finally:
        # the shared base goes back as it was, whatever happened above
        release(result.model)
    return metrics, ref


def _publish(recipe, base, task: _Task, data, result, path: Path, registry, say, prefix: str):
    """Save the trained adapter, write its report and curves, and register it (once: a
    resumed run finds its earlier registration). Returns the registry ref, if any."""
    from peftkit.artifacts import save_adapter

    folder = task.folder
    adapter = save_adapter(
        result.model,
        folder / "adapter",
        method=task.spec.method,
        labels=data.labels,
        max_length=task.config.max_length,
    )
    if result.report is not None:
        write_report(path, result.report, title=f"{task.name} · {task.spec.method}", prefix=prefix)
        say(f"\ntest report ({task.name}):\n{result.report.to_text()}")
    if result.history:
        from peftkit.plots import plot_history

        contrastive = task.config.objective == "contrastive"
        loss_label = "train (pair loss)" if contrastive else "train (cross-entropy)"
        plot_history(result.history, path / f"{prefix}curves.png", loss_label=loss_label)
    done = folder / "registered.json"
    previous = _previous_registration(done, registry)
    if previous is not None:
        say(f"already registered as {previous} (resumed run); not registering again")
        return previous
    if registry is None:
        return None
    entry = registry.register(
        task.name,
        adapter,
        method=task.spec.method,
        labels=data.labels,
        base_fingerprint=base.fingerprint.id,
        base=base.fingerprint.to_dict(),
        quantization=base.quantization,
        task=recipe.registry.task or data.name,
        metrics=result.test_metrics,
        tags=recipe.registry.tags,
    )
    write_json(done, {"ref": entry.ref})
    say(f"registered {entry.ref}")
    return entry.ref


def _previous_registration(done: Path, registry) -> str | None:
    """The ref a resumed run already registered, if the registry still has it."""
    import json

    from peftkit.errors import RegistryError

    if registry is None or not done.is_file():
        return None
    try:
        ref = json.loads(done.read_text())["ref"]
        return registry.get(ref).ref
    except (OSError, ValueError, KeyError, RegistryError):
        return None


def _revisit(base, registry, tasks: list[_Task], refs: list[str], say) -> dict[str, float]:
    """Accuracy of every adapter so far on its own task's test split (continual learning)."""
    from peftkit.evaluation import compute_metrics
    from peftkit.switch import AdaptedModel

    model = AdaptedModel(base, registry)
    scores = {}
    try:
        for task, ref in zip(tasks, refs, strict=False):
            data, _ = load_task_data(task.data)
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
    from peftkit.switch import AdaptedModel

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


def _run_prompt(recipe: Recipe, path: Path, say) -> dict[str, Any]:
    """Score every template of the prompt (or the one named) on the evaluation split."""
    from peftkit.evaluation import classification_report
    from peftkit.prompt_eval import evaluate_prompts

    ref = recipe.prompt
    assert ref is not None
    data, train_split = load_task_data(recipe.data)
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
        demo_pool=train_split,
        batch_size=recipe.evaluation.batch_size,
        say=say,
    )
    say(f"\n== {recipe.name}\n{run.table()}")
    run.save(path)
    head = run.results[0]  # the first template: not picked on the test split
    report = classification_report(list(run.gold), head.probs.argmax(1).tolist(), run.labels)
    write_report(path, report, title=f"{recipe.name} · {head.template}")
    say(f"\nreport ({head.template}):\n{report.to_text()}")
    return {
        "recipe": recipe.name,
        "method": run.config["method"],
        "data": data.name,
        **head.to_dict(),
        "calibration": ref.calibration,
        "templates": [r.to_dict() for r in run.results],
        "summary": run.summary(),
    }


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
    from peftkit.base import load_base

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
