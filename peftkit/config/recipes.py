"""Recipes: one YAML file per experiment, validated against a typed, frozen schema.

A recipe composes a base model, an adapter preset *or* a prompt, data, training,
evaluation and where the result is registered::

    from peftkit.config.recipes import load_recipe
    recipe = load_recipe("quickstart", overrides=["training.epochs=1", "data.max_rows=200"])
    recipe.base.source, recipe.adapter.preset, recipe.training.epochs   # 'minilm', 'lora', 1.0

Every key is checked: an unknown key, a wrong type or a missing required field is a
:class:`ConfigError` that names the file, the line, the key path and the closest valid key.
``key.path=value`` overrides (values parsed as YAML scalars) go through the same checks.
Scalar shorthands: ``base: minilm`` means ``base: {source: minilm}``, ``adapter: lora``
means ``adapter: {preset: lora}``, ``prompt: sentiment`` means ``prompt: {set: sentiment}``.

This module is the schema and its loading; the checks across sections (adapter or prompt,
what needs an adapter recipe, ``then:`` tasks, names that become folders) are
``peftkit.config.recipe_checks``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config import overrides as overrides_mod
from peftkit.config.gates import parse_gates
from peftkit.config.library import available, find
from peftkit.config.recipe_checks import (
    INIT_FROM_PREVIOUS,
    check_init_from,
    check_keep_parent,
    check_recipe,
)
from peftkit.config.schema import Ctx, parse, read_text, read_yaml
from peftkit.config.scorers import RECIPE_SCORERS
from peftkit.config.training import SEED_MAX, TrainConfig
from peftkit.errors import ConfigError
from peftkit.registry.entries import check_alias

__all__ = [
    "AdapterRef",
    "BaseSpec",
    "CalibrationSpec",
    "DataSpec",
    "EvaluationSpec",
    "HotswapSpec",
    "INIT_FROM_PREVIOUS",
    "PromoteSpec",
    "PromptRef",
    "HeadInitSpec",
    "RejectSpec",
    "Recipe",
    "RegistrySpec",
    "TaskSpec",
    "apply_overrides",
    "available_recipes",
    "check_init_from",
    "find_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_to_dict",
]


@dataclass(frozen=True)
class BaseSpec:
    """The frozen base model: packaged name, local folder or hub id (+ k-bit loading, and
    the weights' dtype: unset = float32 on CPU, bfloat16 on CUDA)."""

    source: str
    quantization: str | None = field(default=None, metadata={"choices": (None, "4bit", "8bit")})
    kind: str = field(default="auto", metadata={"choices": ("auto", "encoder", "causal-lm")})
    double_quant: bool = False
    dtype: str | None = field(
        default=None, metadata={"choices": (None, "float32", "bfloat16", "float16")}
    )


@dataclass(frozen=True)
class HeadInitSpec:
    """Start the head from class prototypes of the training rows (few-shot; see
    ``peftkit.training.prototypes.prototype_head``) instead of a random one. The labels are described by
    a prompt set (``prompt: SET``: its ``descriptions``, else its first template's words;
    ``prompt: SET/TEMPLATE``: that template's words), by ``descriptions`` (label ->
    sentences), or else by their names."""

    method: str = field(default="prototypes", metadata={"choices": ("prototypes",)})
    prompt: str | None = None
    descriptions: dict[str, Any] = field(default_factory=dict)
    prior: float = 2.0  # weight of the descriptions' embedding (fewshot.prototype_head)


@dataclass(frozen=True)
class AdapterRef:
    """An adapter preset from ``adapters/`` (name or path) and overrides of its fields."""

    preset: str
    peft: dict[str, Any] = field(default_factory=dict)  # peft's own options, checked by peft
    head: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None
    quantization: str | None = field(default=None, metadata={"choices": (None, "4bit", "8bit")})
    pooling: str | None = field(
        default=None, metadata={"choices": (None, "auto", "mean", "last", "cls")}
    )
    head_init: HeadInitSpec | None = None  # `head_init: prototypes`
    # continue a registered adapter: NAME@VERSION, or `previous` (the task before, in `then:`)
    init_from: str | None = None
    # after training, blend this share of init_from's weights back in (0: none; WiSE-FT)
    keep_parent: float | None = None

    def __post_init__(self) -> None:
        if self.init_from is not None:
            check_init_from(self.init_from)
        if self.keep_parent is not None:
            check_keep_parent(self.keep_parent)
            if self.init_from is None:
                raise ConfigError(
                    "adapter.keep_parent blends the trained adapter with the one it "
                    "continues: give adapter.init_from too"
                )

    def overrides(self) -> dict[str, Any]:
        """The fields given, in the form ``load_preset(..., overrides=)`` takes."""
        out: dict[str, Any] = {}
        for name in ("peft", "head", "learning_rate", "quantization", "pooling"):
            value = getattr(self, name)
            if value not in (None, {}):
                out[name] = value
        return out


@dataclass(frozen=True)
class PromptRef:
    """A prompt from ``prompts/`` for zero-/few-shot evaluation (no training)."""

    set: str
    template: str | None = None  # None: every template of the set
    scorer: str = field(default="auto", metadata={"choices": RECIPE_SCORERS})
    normalize: str = field(default="sum", metadata={"choices": ("sum", "mean", "pmi")})
    calibration: str = field(default="none", metadata={"choices": ("none", "content-free")})
    demonstrations: int = 0  # k per class; 0: zero-shot
    demo_selection: str = field(default="random", metadata={"choices": ("random", "nearest")})

    def __post_init__(self) -> None:
        if self.demonstrations < 0:
            raise ConfigError(
                f"prompt.demonstrations must be >= 0 (per label; 0: zero-shot), "
                f"got {self.demonstrations}"
            )


@dataclass(frozen=True)
class DataSpec:
    """Where the rows come from (see ``peftkit.data.load.load_data``) and how many to use."""

    source: str
    text_field: str = "text"
    label_field: str = "label"
    text_pair_field: str | None = None  # None: 'text_pair' when the rows have it; "": never
    labels: tuple[str, ...] | None = None
    split_ratios: tuple[float, ...] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_rows: int | None = None  # at most N rows of each split, sampled as `sample` says
    sample: str = field(default="stratified", metadata={"choices": ("stratified", "first")})
    few_shot_k: int | None = None  # train on k examples per class

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ConfigError(
                "data.source must name a data folder, a CSV/JSONL file or a packaged corpus, got ''"
            )
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"data.seed must be in [0, {SEED_MAX}], got {self.seed}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"data.max_rows must be >= 1 (or null for all), got {self.max_rows}")
        if self.few_shot_k is not None and self.few_shot_k < 1:
            raise ConfigError(f"data.few_shot_k must be >= 1 (or null), got {self.few_shot_k}")
        ratios = self.split_ratios
        if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
            raise ConfigError(
                "data.split_ratios must be three numbers >= 0 summing to 1 (train, validation, "
                f"test), e.g. [0.8, 0.1, 0.1]; got {list(ratios)}"
            )
        if self.labels is not None and not all(x.strip() for x in self.labels):
            raise ConfigError(f"data.labels must be non-empty names, got {list(self.labels)}")
        for key in ("text_field", "label_field"):
            if not getattr(self, key).strip():
                raise ConfigError(f"data.{key} must name a field of the rows, got ''")


@dataclass(frozen=True)
class EvaluationSpec:
    split: str = field(default="test", metadata={"choices": ("test", "validation")})
    batch_size: int = 64
    max_rows: int | None = None  # prompt runs: N rows of the split, sampled as `sample` says
    sample: str = field(default="stratified", metadata={"choices": ("stratified", "first")})

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ConfigError(f"evaluation.batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows is not None and int(self.max_rows) < 1:
            raise ConfigError(f"evaluation.max_rows must be >= 1, got {self.max_rows}")


@dataclass(frozen=True)
class RegistrySpec:
    """Where the trained adapter is registered (``path`` relative to the working folder)."""

    enabled: bool = True
    path: str = "registry"
    name: str | None = None  # default: the recipe's name
    task: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """A further task trained on the same base after the main one (``then:``)."""

    name: str
    data: DataSpec
    adapter: AdapterRef | None = None  # default: the recipe's adapter
    training: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's


@dataclass(frozen=True)
class HotswapSpec:
    """After training, switch between the adapters trained and predict a mixed batch."""

    texts: tuple[str, ...]
    repeats: int = 20  # use() calls timed


@dataclass(frozen=True)
class RejectSpec:
    """A reject option's target, met on the validation split: the answered rows' precision
    at least ``precision``, or a share ``coverage`` of the rows answered (exactly one)."""

    precision: float | None = None
    coverage: float | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("precision", self.precision), ("coverage", self.coverage))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ConfigError(
                "calibration.reject needs exactly one target: {precision: 0.95} or "
                f"{{coverage: 0.8}}; got {dict(given) or 'none'}"
            )
        key, value = given[0]
        if not 0 < value <= 1:
            raise ConfigError(f"calibration.reject.{key} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class CalibrationSpec:
    """After training: fit a temperature on the validation split (``temperature``; unset:
    on for a trained adapter, off for an untrained prototype head), choose a reject
    threshold for a target (``reject``), and serve ``out_of_scope`` (a label of the data) as
    an abstention. Stored in the adapter's task.json; see peftkit.run.confidence."""

    temperature: bool | None = None
    reject: RejectSpec | None = None
    out_of_scope: str | None = None


@dataclass(frozen=True)
class PromoteSpec:
    """After registering, promote the new version to ``alias`` when every ``gate`` holds
    (``accuracy on DATA >= alias - 0.5``: see peftkit.config.gates and peftkit.run.promote);
    the decision goes to metrics.json and the registry."""

    gate: tuple[str, ...]
    alias: str = "production"

    def __post_init__(self) -> None:
        check_alias(self.alias)
        parse_gates(self.gate, "")  # the error is prefixed with the key


@dataclass(frozen=True)
class Recipe:
    base: BaseSpec
    data: DataSpec
    name: str = ""
    description: str = ""
    adapter: AdapterRef | None = None
    prompt: PromptRef | None = None
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    registry: RegistrySpec = field(default_factory=RegistrySpec)
    then: tuple[TaskSpec, ...] = ()  # more tasks, one adapter each, on the same base
    revisit: bool = False  # continual learning: re-evaluate earlier tasks after each one
    hotswap: HotswapSpec | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    promote: PromoteSpec | None = None  # after registering: move an alias behind a gate
    source: str = field(default="<dict>", metadata={"internal": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"internal": True})  # as given

    @property
    def mode(self) -> str:
        return "train" if self.adapter is not None else "prompt"

    @property
    def registry_name(self) -> str:
        return self.registry.name or self.name


SHORTHAND = {
    BaseSpec: "source",
    AdapterRef: "preset",
    PromptRef: "set",
    DataSpec: "source",
    HeadInitSpec: "method",
}


# --- finding and loading --------------------------------------------------------------------


def available_recipes(folder: Path | None = None) -> list[str]:
    """Names of the built-in recipes (``recipes/*.yaml``)."""
    return available("recipes", folder)


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or a built-in one by name; unknown names list the valid ones."""
    return find("recipes", name_or_path)


def load_recipe(name_or_path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe (built-in name or path)."""
    path = find_recipe(name_or_path)
    text = read_text(path, "recipe")
    raw, lines = read_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the recipe is empty; it needs at least 'base' and 'data'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    recipe = parse_recipe(
        raw, source=str(path), lines=lines, overridden=overrides_mod.override_keys(overrides)
    )
    return dataclasses.replace(recipe, overrides=tuple(overrides))


def parse_recipe(
    raw: dict[str, Any],
    source: str = "<dict>",
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: dict[tuple[str, ...], str] | None = None,
) -> Recipe:
    """Validate a recipe mapping; errors name ``source`` (and the line when known)."""
    ctx = Ctx(source, lines or {}, overridden or {}, SHORTHAND)
    if not isinstance(raw, dict):
        raise ctx.error((), "a recipe must be a mapping with at least 'base' and 'data'")
    raw = dict(raw)
    recipe = typing.cast(Recipe, parse(Recipe, raw, (), ctx))
    if not recipe.name:
        recipe = dataclasses.replace(recipe, name=_name_from_stem(Path(source).stem))
    check_recipe(recipe, raw, ctx)
    return dataclasses.replace(recipe, source=source)


def _name_from_stem(stem: str) -> str:
    """A file's stem as a run name: characters a folder name may not hold become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "recipe"
    return name if name[0].isalnum() else f"r{name}"


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (what the run folder records)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if not f.metadata.get("internal")
            }
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(recipe)


def task_training(recipe: Recipe, task: TaskSpec) -> TrainConfig:
    """The training settings of a ``then:`` task: the recipe's, with the task's overrides."""
    return dataclasses.replace(recipe.training, **task.training)


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``["training.epochs=1", "adapter=probe"]`` applied to a copy of a recipe mapping (see
    :func:`peftkit.config.overrides.apply_overrides`)."""
    return overrides_mod.apply_overrides(raw, overrides, Recipe, SHORTHAND, top="the recipe")
