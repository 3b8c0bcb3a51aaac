"""Builders: a recipe's parts made into objects, one plain function each (torchtune style):
the base model, each task's data, adapter preset and head start, and the prompt's check.
Everything here but :func:`load_recipe_base` needs no model, so a run calls these first and
refuses bad input before anything is loaded or written."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.presets import method_row
from peftkit.config.recipes import Recipe, TaskSpec, task_training
from peftkit.errors import ConfigError, PeftkitError

log = logging.getLogger("peftkit.run")


@dataclass
class Task:
    """One adapter a training recipe makes: its data, preset, settings and head start."""

    name: str
    data: Any  # the loaded TextDataset
    train_split: Any
    spec: Any  # AdapterSpec
    config: Any  # TrainConfig
    folder: Path
    head_init: Any = None  # recipes.HeadInitSpec
    head: Any = None  # training.prototypes.Prototypes, when head_init is set
    continual: Any = None  # run.continual.Continual: parent, data fingerprints, replay


def preset_of(recipe: Recipe, ref, where: str):
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


def build_tasks(recipe: Recipe) -> list[Task]:
    """The main task and every ``then:`` task, each checked and with its data loaded."""
    return [_main_task(recipe)] + [_then_task(recipe, t) for t in recipe.then]


def _main_task(recipe: Recipe) -> Task:
    assert recipe.adapter is not None
    spec = preset_of(recipe, recipe.adapter, "adapter")
    return _task(recipe, recipe.registry_name, recipe.data, spec, recipe.training,
                 Path(), recipe.adapter.head_init, "adapter.head_init")  # fmt: skip


def _then_task(recipe: Recipe, task: TaskSpec) -> Task:
    ref = task.adapter or recipe.adapter
    assert ref is not None
    spec = preset_of(recipe, ref, f"then: {task.name}: adapter")
    where = f"then: {task.name}: adapter.head_init"
    config = task_training(recipe, task)
    return _task(recipe, task.name, task.data, spec, config, Path("tasks", task.name),
                 ref.head_init, where)  # fmt: skip


def _task(recipe, name, data_spec, spec, config, folder, head_init, where) -> Task:
    """One task with its data loaded and its head's start checked (no model needed)."""
    from peftkit.training.trackers import check_installed

    check_installed(config.log_with, where=recipe.source)
    as_is = config.max_steps == 0  # no training: register the start head as it stands
    if as_is and (head_init is None or method_row(spec.method).saved_as != "head"):
        raise ConfigError(
            f"{recipe.source}: training.max_steps: 0 registers the prototype head untrained; "
            f"it needs adapter.preset: probe and adapter.head_init: prototypes (this task: "
            f"{spec.method}, head_init {'set' if head_init else 'unset'})"
        )
    if config.objective == "contrastive" and (
        head_init is None or method_row(spec.method).saved_as == "head"
    ):
        raise ConfigError(
            f"{recipe.source}: {where.rpartition('adapter.head_init')[0]}training.objective: "
            "contrastive trains the body and rebuilds a prototype head on it: it needs "
            f"adapter.head_init: prototypes and an adapter that trains the body (this task: "
            f"{spec.method}, head_init {'set' if head_init else 'unset'})"
        )
    data, train_split = load_task_data(data_spec)
    head = None
    if head_init is not None:
        head = prototypes_of(head_init, data, train_split, where=f"{recipe.source}: {where}")
    return Task(name, data, train_split, spec, config, folder, head_init, head)


def quantization_of(recipe: Recipe, tasks: list[Task]) -> str | None:
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


def check_demonstrations(recipe: Recipe, data, pool) -> None:
    """``prompt.demonstrations`` (k per label) fits the training rows drawn from, checked
    once the data is loaded, before the model is."""
    from collections import Counter

    k = recipe.prompt.demonstrations if recipe.prompt is not None else 0
    if not k:
        return
    counts = Counter(pool.labels)
    short = [(name, counts[i]) for i, name in enumerate(data.labels) if counts[i] < k]
    if short:
        listing = ", ".join(f"{name!r} has {n}" for name, n in short)
        smallest = min(counts[i] for i in range(len(data.labels)))
        raise ConfigError(
            f"{where_set(recipe, 'prompt.demonstrations')}: prompt.demonstrations={k} per label, "
            f"but the training split is too small: {listing}; use at most {smallest}"
        )


def check_scorer(recipe: Recipe, config) -> None:
    """``prompt.scorer`` can run on the base, and with ``prompt.demonstrations`` the scorer
    used takes them (for ``auto``: the one it picks). Both follow the base's kind, which its
    ``config`` (the transformers config, read without the weights) tells, so this is refused
    before the model loads."""
    from peftkit.config.scorers import scorer_row
    from peftkit.models.base import infer_kind
    from peftkit.prompting.evaluation import NEEDS_TEXT, config_has, without_demonstrations
    from peftkit.prompting.templates import load_prompt_set

    ref = recipe.prompt
    if ref is None:
        return
    has = config_has(config, recipe.base.kind)
    kind = infer_kind(config) if recipe.base.kind == "auto" else recipe.base.kind
    article = "a causal LM" if kind == "causal-lm" else "an encoder"
    loaded = f"base {recipe.base.source!r}, loaded as {article}"
    if ref.scorer != "auto" and not has(scorer_row(ref.scorer).needs):
        raise ConfigError(
            f"{where_set(recipe, 'prompt.scorer')}: the {ref.scorer} scorer needs "
            f"{NEEDS_TEXT[scorer_row(ref.scorer).needs]}, and {loaded} has none; use "
            "prompt.scorer: auto"
        )
    if not ref.demonstrations or ref.scorer != "auto":
        return
    prompts = load_prompt_set(ref.set)
    chosen = [prompts.get(ref.template)] if ref.template else list(prompts)
    used = without_demonstrations(ref.scorer, has, [p.template.uses_mask for p in chosen])
    if used is not None:
        raise ConfigError(
            f"{where_set(recipe, 'prompt.demonstrations')}: the {used} scorer takes no "
            f"demonstrations (prompt.scorer: auto picks it for {loaded}); set "
            "prompt.demonstrations: 0, or give a causal LM as base"
        )


def where_set(recipe: Recipe, key: str) -> str:
    """The recipe file, with the command-line override that set ``key`` when one did."""
    for item in reversed(recipe.overrides):
        given = item.partition("=")[0].strip()
        if key == given or key.startswith(given + "."):
            return f"{recipe.source} (override {item!r})"
    return recipe.source


def check_targets(recipe: Recipe, tasks: list[Task], base) -> None:
    """Every task's ``adapter.peft.target_modules`` names modules the loaded base has (only
    the base can tell): a one-line error listing some of its module names, before training."""
    import re

    modules = [(n, m) for n, m in base.model.named_modules() if n]
    names = [n for n, _ in modules]
    # what to suggest: the linear layers' own names (LoRA's usual targets), else every leaf
    linear = {n.rpartition(".")[2] for n, m in modules if type(m).__name__ in ("Linear", "Conv1D")}
    leaves = sorted(linear or {n.rpartition(".")[2] for n in names if not n[-1].isdigit()})
    for task in tasks:
        targets = task.spec.peft.get("target_modules") if task.spec.uses_peft else None
        if targets is None or targets in ("auto", "all-linear"):
            continue
        if isinstance(targets, str):
            patterns = [re.compile(targets)] if _compiles(targets) else []
            found = any(p.fullmatch(n) for p in patterns for n in _suffixes(names))
            missing = [] if found or not patterns else [targets]
        else:
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            shown = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
            key = "adapter.peft.target_modules"
            task_note = "" if task is tasks[0] else f" (then: {task.name})"
            raise ConfigError(
                f"{where_set(recipe, key)}: {key}{task_note}: {', '.join(map(repr, missing))} "
                f"matches no module of base {recipe.base.source!r}; its layers include: {shown}"
            )


def _compiles(pattern: str) -> bool:
    import re

    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _suffixes(names: list[str]) -> list[str]:
    """Each module name and every tail of it (peft matches the body's names, which may lack
    the wrapper's first parts)."""
    out: set[str] = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(out)


def load_recipe_base(spec, quantization: str | None):
    """Load a recipe's ``base:`` (``quantization``: the one its tasks settled on), saying so."""
    from peftkit.models.base import load_base

    dtype = f", dtype {spec.dtype}" if spec.dtype else ""
    log.info(f"loading base {spec.source!r} (quantization: {quantization or 'none'}{dtype})")
    return load_base(
        spec.source,
        kind=spec.kind,
        quantization=quantization,
        double_quant=spec.double_quant,
        dtype=spec.dtype,
    )
