"""Continual training in a recipe: ``adapter.init_from`` (continue a registered adapter, or
the task before's) and ``training.replay`` (mix earlier rows in), checked and prepared
before the base loads, and the lineage each new version records.

    plan.continual = plan_continual(recipe, tasks, registry_root)   # no model needed
    folder = parent_folder(ctx, task, plan.continual[task.name])    # after the base loads
    registry.register(..., lineage=lineage(step, parent_ref, task))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.recipes import INIT_FROM_PREVIOUS, AdapterRef, Recipe
from peftkit.config.training import REPLAY_PREVIOUS
from peftkit.errors import ConfigError, FingerprintMismatch, PeftkitError

__all__ = ["Continual", "lineage", "parent_folder", "plan_continual", "revisit_refs"]


@dataclass
class Continual:
    """How one task continues: its parent (a registry ref, or the index of the task before
    in this recipe), the data fingerprints before replay, and the replay drawn."""

    parent: str | None = None  # "name@V" in the registry
    previous: int | None = None  # or the task at this index of the recipe
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    replay: dict[str, Any] | None = None
    keep_parent: float = 0.0  # adapter.keep_parent: the parent's share blended back in
    original: Any = None  # the training rows before replay (what a later task replays)


def adapter_refs(recipe: Recipe) -> list[AdapterRef]:
    """Each task's adapter block: the recipe's, then each ``then:`` task's (or the recipe's)."""
    assert recipe.adapter is not None
    return [recipe.adapter] + [t.adapter or recipe.adapter for t in recipe.then]


def plan_continual(recipe: Recipe, tasks: list[Any], registry_root: Path) -> list[Any]:
    """``tasks`` with every continuing one's data put in its parent's label order and its
    replay mixed in (``task.continual`` set on each). Refuses, before any model loads: an
    unknown parent, one of another method or base, labels the data lacks, and replay
    sources whose labels the data lacks."""
    from peftkit.adapters.parent import check_parent
    from peftkit.data.fingerprint import data_fingerprints
    from peftkit.data.replay import with_label_order

    out: list[Any] = []
    for i, (task, ref) in enumerate(zip(tasks, adapter_refs(recipe), strict=True)):
        cont = Continual(keep_parent=ref.keep_parent or 0.0)
        where = f"{recipe.source}: task {task.name!r}: adapter.init_from: {ref.init_from}"
        if ref.init_from is not None:
            if ref.head_init is not None:
                raise ConfigError(f"{where}: a continued adapter keeps its head; drop head_init")
            if ref.init_from == INIT_FROM_PREVIOUS:
                if i == 0:
                    raise ConfigError(
                        f"{where}: the first task has no task before it; give NAME@VERSION"
                    )
                prev = out[i - 1]
                parent_name, method, labels = (
                    f"task {prev.name!r}",
                    prev.spec.method,
                    prev.data.labels,
                )
                cont.previous = i - 1
            else:
                entry = _registry_entry(registry_root, ref.init_from, recipe, where)
                parent_name, method, labels = entry.ref, entry.method, entry.labels
                cont.parent = entry.ref
            order = check_parent(
                parent_name, method, labels, task_method=task.spec.method,
                task_labels=task.data.labels, where=where,
            )  # fmt: skip
            data = with_label_order(task.data, order)
            train = task.train_split
            if data is not task.data:
                from peftkit.data.replay import map_labels

                train = map_labels(train, task.data.labels, order, task.data.name)
            task = dataclasses.replace(task, data=data, train_split=train)
        cont.data = data_fingerprints(task.data, task.train_split)
        cont.original = task.train_split
        if task.config.replay is not None:
            task = _replay(task, out, cont, recipe)
        task.continual = cont
        out.append(task)
    return out


def _registry_entry(root: Path, ref: str, recipe: Recipe, where: str):
    """The registered parent, and a first check of its base (the model's config, read
    without the weights; the full fingerprint is checked once the base is loaded)."""
    from peftkit.models.base import model_config
    from peftkit.models.fingerprint import config_hash
    from peftkit.registry import Registry
    from peftkit.registry.entries import describe_base

    if not recipe.registry.enabled or not Path(root).is_dir():
        raise ConfigError(f"{where}: there is no registry at {root} to continue from")
    with Registry(root, read_only=True) as reg:
        try:
            entry = reg.get(ref)
        except PeftkitError as exc:
            raise type(exc)(f"{where}: {exc}") from None
    ours = config_hash(model_config(recipe.base.source))
    theirs = (entry.base or {}).get("config_hash")
    if theirs and theirs != ours:
        raise FingerprintMismatch(
            f"{where}: {entry.ref} was trained on base "
            f"{describe_base(entry.base_fingerprint, entry.base)}, but this recipe's base is "
            f"{recipe.base.source!r} (another model config, hash {ours}); continue it on its "
            "own base"
        )
    return entry


def _replay(task, earlier: list[Any], cont: Continual, recipe: Recipe):
    """``task`` with its training split mixed with replayed rows (``training.replay``)."""
    from peftkit.data.fingerprint import split_fingerprint
    from peftkit.data.replay import mix_replay
    from peftkit.run.builders import load_task_data

    spec = task.config.replay
    where = f"{recipe.source}: task {task.name!r}: training.replay"
    if spec.source == REPLAY_PREVIOUS:
        if not earlier:
            raise ConfigError(f"{where}: source 'previous' needs a task before this one")
        pools = [(t.name, t.continual.original, t.data.labels) for t in earlier]
    else:
        from peftkit.config.recipes import DataSpec

        data, split = load_task_data(DataSpec(source=spec.source, seed=task.config.seed))
        pools = [(spec.source, split, data.labels)]
    try:
        mixed = mix_replay(task.train_split, task.data.labels, pools, share=spec.share,
                           seed=task.config.seed)  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    replayed = mixed.subset(range(len(task.train_split), len(mixed)))
    cont.replay = {
        "source": spec.source,
        "share": spec.share,
        "rows": len(replayed),
        "fingerprint": split_fingerprint(replayed, task.data.labels),
    }
    return dataclasses.replace(task, train_split=mixed)


def parent_folder(ctx: Any, task: Any, refs: dict[str, str]) -> tuple[Path | None, str | None]:
    """The folder a continuing task starts from and its parent's ref: the task before's
    adapter in this run folder, or the registry entry, verified (files' hashes, and trained
    on the loaded base)."""
    cont = task.continual
    if cont is None:
        return None, None
    if cont.previous is not None:
        prev = ctx.plan.tasks[cont.previous]
        return ctx.path / prev.folder / "adapter", refs.get(prev.name)
    if cont.parent is None:
        return None, None
    from peftkit.registry import Registry

    fp = ctx.base.fingerprint
    with Registry(Path(ctx.plan.registry_root), read_only=True) as reg:
        entry = reg.load_path(cont.parent, expected_fingerprint=fp.id, expected_base=fp.to_dict())
    return entry.path, entry.ref


def lineage(task: Any, parent: str | None) -> dict[str, Any]:
    """What the registered version records of where it came from."""
    cont = task.continual or Continual()
    out = {"parent": parent, "data": dict(cont.data), "replay": cont.replay}
    if cont.keep_parent:
        out["keep_parent"] = cont.keep_parent
    return out


def revisit_refs(tasks: list[Any], refs: list[str]) -> list[str]:
    """The adapter to score each of ``tasks`` with after the last of them: its own
    (``refs[i]``), or the last one when a chain of ``init_from: previous`` continued it."""
    out = list(refs)
    i = len(refs) - 1
    while i > 0 and tasks[i].continual is not None and tasks[i].continual.previous == i - 1:
        out[i - 1] = refs[-1]
        i -= 1
    return out
