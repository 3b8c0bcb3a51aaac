"""The zero- and few-shot scorers, one row each: what evaluation runs, recipes and the CLI
read instead of comparing scorer names (no torch: the functions are import paths).

    row = scorer_row("masked-lm")
    row.function, row.needs, row.demonstrations       # ('peftkit.prompting.scorers....', 'masked-lm', True)

Adding a scorer is one row here and its function under ``peftkit/prompting/scorers/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftkit.errors import ConfigError, did_you_mean

NEEDS = ("causal-lm", "masked-lm", "any", "nli")
"""What a scorer needs from the base: a causal LM; an encoder with its masked-LM head; any
base (its mean-pooled last hidden states); a sequence classifier with an entailment class."""


@dataclass(frozen=True)
class Scorer:
    """What peftkit does with one scorer (one row of :data:`SCORER_TABLE`)."""

    function: str  # "module:function", imported when it first scores
    needs: str  # one of NEEDS
    reads: str  # "prompt": the template and its verbalizer; "labels": the verbalizer alone
    demonstrations: bool  # whether it takes in-context demonstrations
    fills_mask: bool  # whether it fills a template's {mask} (and needs one)
    auto: bool  # whether scorer "auto" may pick it (for a base that has what it needs)
    recipes: bool  # whether a recipe may name it (load_base builds what it needs)

    def load(self) -> Callable[..., Any]:
        """The scoring function (its module imported now)."""
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


_SCORERS = "peftkit.prompting.scorers"
SCORER_TABLE: dict[str, Scorer] = {
    "causal": Scorer(f"{_SCORERS}.causal:score_causal", "causal-lm", "prompt", True, False, True, True),
    "masked-lm": Scorer(f"{_SCORERS}.encoders:score_masked_lm", "masked-lm", "prompt", True, True, True, True),
    "embedding": Scorer(f"{_SCORERS}.encoders:score_embedding", "any", "labels", False, False, True, True),
    # an NLI classifier is passed in from Python: load_base builds head-less encoders
    "nli": Scorer(f"{_SCORERS}.encoders:score_nli", "nli", "labels", False, False, False, False),
}  # fmt: skip

SCORERS = tuple(SCORER_TABLE)
RECIPE_SCORERS = ("auto", *(name for name, row in SCORER_TABLE.items() if row.recipes))


def scorer_row(name: str) -> Scorer:
    """The table's row for ``name``; a ConfigError names the valid ones."""
    try:
        return SCORER_TABLE[name]
    except KeyError:
        raise ConfigError(
            f"scorer must be one of auto, {', '.join(SCORER_TABLE)}; got {name!r}"
            + did_you_mean(str(name), SCORER_TABLE)
        ) from None


def pick_scorer(scorer: str, has: Callable[[str], bool], uses_mask: bool) -> str:
    """The scorer to run: ``scorer`` itself, or for ``"auto"`` the first automatic row the
    base ``has`` what it needs for (``has(need) -> bool``) that fills a ``{mask}`` exactly
    when the template has one, else the first the base can run at all."""
    if scorer != "auto":
        scorer_row(scorer)
        return scorer
    runnable = [name for name, row in SCORER_TABLE.items() if row.auto and has(row.needs)]
    for name in runnable:
        if SCORER_TABLE[name].fills_mask == uses_mask:
            return name
    if not runnable:
        raise ConfigError("no scorer can run on this base")
    return runnable[0]
