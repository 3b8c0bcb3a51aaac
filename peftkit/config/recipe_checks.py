"""The checks of a recipe that no single field can make alone, run by
:func:`peftkit.config.recipes.parse_recipe` once every section has parsed.

- ``adapter.init_from`` is ``previous`` or a pinned ``NAME@VERSION``
  (:func:`check_init_from`, called by ``AdapterRef``);
- the sections that exclude or need each other: exactly one of ``adapter`` and ``prompt``;
  ``calibration``, ``promote`` and ``then`` need an adapter recipe (``promote`` an enabled
  registry too); demonstrations need a scorer that takes them;
- a contrastive objective, of the recipe or of a ``then:`` task (its training merged over
  the recipe's), needs ``adapter.head_init``;
- every name that becomes a folder is one plain path component, and the task names differ
  from each other and from the registry name.

Each failure is a :class:`ConfigError` that names the recipe file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from peftkit.config.schema import Ctx, parse
from peftkit.config.scorers import scorer_row
from peftkit.config.training import TrainConfig
from peftkit.errors import ConfigError
from peftkit.registry.entries import check_name

if TYPE_CHECKING:
    from peftkit.config.recipes import AdapterRef, Recipe

INIT_FROM_PREVIOUS = "previous"


def check_init_from(ref: str) -> str:
    """``adapter.init_from``: ``previous`` or a pinned registry reference ``NAME@VERSION``
    (a number: a resumed run must continue the same parent, not the latest one)."""
    if ref == INIT_FROM_PREVIOUS:
        return ref
    name, _, version = str(ref).partition("@")
    if version.isdigit() and int(version) >= 1:
        with contextlib.suppress(ConfigError):
            check_name(name)
            return ref
    raise ConfigError(
        f"adapter.init_from must be NAME@VERSION (a registered adapter and its version "
        f"number, e.g. sst2-lora@3) or 'previous' (the adapter of the task before); got {ref!r}"
    )


def check_keep_parent(keep: float) -> float:
    """``adapter.keep_parent``: the share of the parent's weights blended back in after
    training, in [0, 1) (0: none)."""
    if not 0 <= keep < 1:
        raise ConfigError(
            f"adapter.keep_parent must be in [0, 1) (the share of the parent's weights kept), "
            f"got {keep}"
        )
    return keep


def check_recipe(recipe: Recipe, raw: dict[str, Any], ctx: Ctx) -> None:
    """The checks across sections of a parsed ``recipe`` (``raw``: the mapping it was
    parsed from, to tell which keys were given); errors name ``ctx``'s file and the key."""
    if (recipe.adapter is None) == (recipe.prompt is None):
        raise ctx.error((), "give exactly one of 'adapter' (train) or 'prompt' (zero/few-shot)")
    if recipe.prompt is not None and "calibration" in raw:
        raise ctx.error(
            ("calibration",),
            "calibration (temperature, reject) is for trained adapters; a prompt recipe "
            "calibrates with prompt.calibration",
        )
    if recipe.promote is not None and (recipe.prompt is not None or not recipe.registry.enabled):
        raise ctx.error(
            ("promote",), "promote moves a registry alias: it needs an 'adapter' recipe with "
            "registry.enabled: true"
        )  # fmt: skip
    prompt = recipe.prompt
    if (
        prompt is not None
        and prompt.demonstrations
        and prompt.scorer != "auto"
        and not scorer_row(prompt.scorer).demonstrations
    ):
        raise ctx.error(
            ("prompt", "demonstrations"),
            f"the {prompt.scorer} scorer takes no demonstrations; set prompt.demonstrations: 0",
        )
    if recipe.prompt is not None and recipe.then:
        raise ctx.error(("then",), "'then' (more tasks) needs an 'adapter' recipe")
    _check_contrastive(recipe.adapter, recipe.training, ("training", "objective"), ctx)
    for i, task in enumerate(recipe.then):
        merged = {**dataclasses.asdict(recipe.training), **task.training}
        config = parse(TrainConfig, merged, ("then", str(i), "training"), ctx)
        where = ("then", str(i), "training", "objective")
        _check_contrastive(task.adapter or recipe.adapter, config, where, ctx)
    _check_names(recipe, ctx)


def _check_contrastive(
    adapter: AdapterRef | None, config: TrainConfig, path: tuple[str, ...], ctx: Ctx
) -> None:
    """A contrastive objective rebuilds a prototype head: it needs ``adapter.head_init``
    (whether the preset trains the body is checked with the preset, in the run's plan)."""
    if adapter is None or config.objective != "contrastive" or adapter.head_init is not None:
        return
    raise ctx.error(
        path,
        "contrastive trains the body and rebuilds a prototype head on it: it needs "
        "adapter.head_init: prototypes",
    )


def _check_names(recipe: Recipe, ctx: Ctx) -> None:
    """Every name that becomes a folder (run folder, registry entry, task folder) is one
    plain path component: checked here, once, before anything is loaded or written."""
    named = [(("name",), recipe.name), (("registry", "name"), recipe.registry.name)]
    named += [(("then", str(i), "name"), t.name) for i, t in enumerate(recipe.then)]
    for path, value in named:
        if value is None:
            continue
        try:
            check_name(value)
        except ConfigError as exc:
            raise ctx.error(
                path, str(exc).replace("invalid adapter name", "invalid name")
            ) from None
    seen = [recipe.registry_name, *(t.name for t in recipe.then)]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ctx.error(
            ("then",),
            f"task names must differ from each other and from the "
            f"registry name; repeated: {', '.join(dupes)}",
        )
