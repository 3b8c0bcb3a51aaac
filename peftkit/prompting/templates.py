"""Prompt templates and verbalizers, and the YAML prompt library that holds them.

A :class:`Template` is text with named fields (``{text}``, ``{text_pair}``, and ``{mask}``
for masked-LM filling); a :class:`Verbalizer` maps each label to one or more words or
phrases; a :class:`Prompt` pairs the two. A YAML file in ``prompts/`` (a
:class:`PromptSet`) holds several prompts for one task family::

    from peftkit.prompting.templates import load_prompt, load_prompt_set

    prompt = load_prompt("sentiment", "lm-eval-sst2")
    prompt.template.render({"text": "a charming journey ."})
    # 'a charming journey .\\nQuestion: Is this sentence positive or negative?\\nAnswer:'
    prompt.verbalizer.phrases("positive")          # (' positive',)
    load_prompt_set("my_prompts.yaml").names()     # a user's own file works the same way

File schema (every key is checked; unknown keys are errors)::

    family: sentiment                   # required: the task family's name
    description: ...                    # optional
    labels: [negative, positive]        # required: the label names, in order
    verbalizer: {negative: " bad", positive: [" good", " great"]}  # default for templates
    domain: "Answer:"                   # optional default domain prompt (for PMI scoring)
    descriptions: {negative: "It was bad.", positive: "It was good."}  # optional, see below
    templates:                          # required: name -> text, or name -> mapping
      short: "{text} It was"
      long: {text: "...", verbalizer: {...}, domain: "...", description: "..."}

``descriptions`` (label -> sentence(s)) describe the labels to an embedding model: the
embedding scorer and the few-shot prototype prior compare a text's embedding with theirs.
A sentence encoder matches a text to a sentence better than to a bare label word (MiniLM,
zero-shot on validation splits: sentiment 67.5% with " negative"/" positive", 73.6% with
"It was terrible."/"It was great."; spam 49% -> 77%); without them, the words of the
first template's verbalizer serve. :meth:`PromptSet.describe` gives whichever applies.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config.library import available, find
from peftkit.config.schema import load_yaml, read_text
from peftkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "DATA_FIELDS",
    "Prompt",
    "PromptSet",
    "Template",
    "Verbalizer",
    "available_prompt_sets",
    "load_prompt",
    "load_prompt_set",
    "parse_prompt_set",
]

DATA_FIELDS = ("text", "text_pair")  # fields a row of data can fill
MASK_FIELD = "mask"  # filled with the tokenizer's mask token by the masked-LM scorer
_FILE_KEYS = (
    "family",
    "description",
    "labels",
    "verbalizer",
    "domain",
    "descriptions",
    "templates",
)
DESCRIPTIONS = "descriptions"  # the name of the prompt that holds a set's descriptions
_TEMPLATE_KEYS = ("text", "verbalizer", "domain", "description")


# --- templates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """Text with named fields, e.g. ``Template("{text}\\nSentiment:", name="short")``.

    ``domain`` is the content-free "domain prompt" used by domain-conditional PMI; by
    default it is the template's text after its last field (``"Sentiment:"`` above).
    Literal braces are written ``{{`` and ``}}``.
    """

    text: str
    name: str = "template"
    domain: str | None = None
    _pieces: tuple[tuple[str, str | None], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pieces", _parse(self.text, self.name))

    @property
    def fields(self) -> tuple[str, ...]:
        """The data fields the template uses, in order of first use (``mask`` excluded)."""
        seen: list[str] = []
        for _, name in self._pieces:
            if name is not None and name != MASK_FIELD and name not in seen:
                seen.append(name)
        return tuple(seen)

    @property
    def uses_mask(self) -> bool:
        return any(name == MASK_FIELD for _, name in self._pieces)

    def render(self, row: Mapping[str, str | None], mask: str | None = None) -> str:
        """Fill the fields from ``row`` (and ``{mask}`` with ``mask``).

        >>> Template("Review: {text}\\nSentiment:").render({"text": "great fun"})
        'Review: great fun\\nSentiment:'
        """
        out = []
        for literal, name in self._pieces:
            out.append(literal)
            if name == MASK_FIELD:
                if mask is None:
                    raise ConfigError(
                        f"template {self.name!r} has a {{mask}} field: it is meant for a "
                        "masked-LM scorer (score_masked_lm), which fills in the mask token"
                    )
                out.append(mask)
            elif name is not None:
                value = row.get(name)
                if value is None:
                    self.check_fields([k for k, v in row.items() if v is not None])
                out.append(str(value))
        return "".join(out)

    def check_fields(self, available: Iterable[str]) -> None:
        """A DataError if the template uses a field the data lacks (naming what it has)."""
        have = sorted(set(available))
        missing = [f for f in self.fields if f not in have]
        if missing:
            raise DataError(
                f"template {self.name!r} uses field {{{missing[0]}}}, but the data has "
                f"only: {', '.join(have) or 'no fields'}"
                + (" (give text_pairs for {text_pair})" if missing[0] == "text_pair" else "")
            )

    def domain_prompt(self) -> str:
        """The prompt for P(label | domain): ``domain``, else the text after the last field."""
        if self.domain is not None:
            return self.domain
        tail = ""
        for literal, name in self._pieces:
            tail = tail + literal if name is None else ""
        return tail.lstrip()


def _parse(text: str, where: str) -> tuple[tuple[str, str | None], ...]:
    """``text`` as (literal, field-or-None) pieces; ConfigError on a bad or unknown field."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"template {where!r}: the text must be a non-empty string")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(
            f"template {where!r}: {exc} (write literal braces as {{{{ and }}}})"
        ) from None
    valid = (*DATA_FIELDS, MASK_FIELD)
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in valid or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "")
            shown += (f":{spec}" if spec else "") + "}"
            raise ConfigError(
                f"template {where!r}: unknown field {shown}; valid fields: "
                + ", ".join("{" + v + "}" for v in valid)
                + did_you_mean(name, valid)
            )
        pieces.append((literal, name))
    if not any(name in DATA_FIELDS for _, name in pieces):
        raise ConfigError(f"template {where!r} has no {{text}} field: {text!r}")
    return tuple(pieces)


# --- verbalizers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verbalizer:
    """Label -> words or phrases. Multi-token phrases are allowed; spaces matter.

    >>> v = Verbalizer.from_dict({"negative": " bad", "positive": [" good", " great"]})
    >>> v.labels, v.phrases("positive")
    (('negative', 'positive'), (' good', ' great'))
    """

    words: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        _check_words(self.words, "verbalizer")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "verbalizer") -> Verbalizer:
        if not isinstance(mapping, Mapping) or not mapping:
            raise ConfigError(f"{where}: must be a non-empty mapping label -> word(s)")
        words = []
        for label, value in mapping.items():
            phrases = (value,) if isinstance(value, str) else value
            if not isinstance(phrases, Sequence) or not all(isinstance(p, str) for p in phrases):
                raise ConfigError(
                    f"{where}: label {label!r} must map to a string or a list of strings; "
                    f"got {value!r}"
                )
            words.append((str(label), tuple(phrases)))
        _check_words(words, where)
        return cls(tuple(words))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.words)

    def phrases(self, label: str) -> tuple[str, ...]:
        for name, phrases in self.words:
            if name == label:
                return phrases
        raise ConfigError(
            f"verbalizer has no label {label!r}; it has: {', '.join(self.labels)}"
            + did_you_mean(label, self.labels)
        )

    def answer(self, label: str) -> str:
        """The phrase written after a demonstration of ``label`` (its first phrase)."""
        return self.phrases(label)[0]

    def description(self, label: str) -> str:
        """A readable description of ``label`` (its first phrase, stripped)."""
        return self.answer(label).strip()

    def for_labels(self, labels: Sequence[str] | None, where: str = "verbalizer") -> Verbalizer:
        """This verbalizer restricted to (and ordered by) a dataset's ``labels``.

        A DataError names the labels it lacks.
        """
        if labels is None:
            return self
        missing = [label for label in labels if label not in self.labels]
        if missing:
            raise DataError(
                f"{where} has no words for label(s) {', '.join(map(repr, missing))} of the "
                f"data; it covers: {', '.join(self.labels)}" + did_you_mean(missing[0], self.labels)
            )
        return Verbalizer(tuple((label, self.phrases(label)) for label in labels))


def _check_words(words: Iterable[tuple[str, tuple[str, ...]]], where: str) -> None:
    owner: dict[str, str] = {}
    labels: set[str] = set()
    for label, phrases in words:
        if label in labels:
            raise ConfigError(f"{where}: label {label!r} appears twice")
        labels.add(label)
        if not phrases:
            raise ConfigError(f"{where}: label {label!r} has no words")
        for phrase in phrases:
            if not phrase.strip():
                raise ConfigError(f"{where}: label {label!r} has an empty word {phrase!r}")
            key = phrase.strip().casefold()
            if key in owner and owner[key] != label:
                raise ConfigError(
                    f"{where}: labels {owner[key]!r} and {label!r} share the words "
                    f"{phrase.strip()!r}; each label needs words of its own"
                )
            owner[key] = label
    if not labels:
        raise ConfigError(f"{where}: no labels")


# --- prompts and prompt sets -------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A template with its verbalizer: what the scorers take."""

    template: Template
    verbalizer: Verbalizer
    family: str = ""

    @property
    def name(self) -> str:
        return self.template.name


@dataclass(frozen=True)
class PromptSet:
    """One YAML file: several prompts for one task family over one label set."""

    family: str
    labels: tuple[str, ...]
    prompts: tuple[Prompt, ...]
    description: str = ""
    source: str = ""
    descriptions: Verbalizer | None = None  # label -> sentences, for embedding models

    def names(self) -> list[str]:
        return [p.name for p in self.prompts]

    def get(self, name: str) -> Prompt:
        """The template ``name``; ``"descriptions"`` is the set's descriptions (if it has
        them and no template of that name) as a ``{text}`` prompt for the embedding scorer."""
        for prompt in self.prompts:
            if prompt.name == name:
                return prompt
        if name == DESCRIPTIONS and self.descriptions is not None:
            return self.descriptions_prompt()
        names = self.names() + ([DESCRIPTIONS] if self.descriptions is not None else [])
        raise ConfigError(
            f"{self.source or self.family}: no template {name!r}; templates: "
            f"{', '.join(names)}" + did_you_mean(name, names)
        )

    def describe(self) -> Verbalizer:
        """What describes each label to an embedding model: the file's ``descriptions``,
        else the first template's verbalizer words."""
        return self.descriptions if self.descriptions is not None else self.prompts[0].verbalizer

    def descriptions_prompt(self) -> Prompt:
        """The descriptions as a prompt named ``"descriptions"`` (template ``{text}``)."""
        if self.descriptions is None:
            raise ConfigError(f"{self.source or self.family}: has no 'descriptions'")
        return Prompt(Template("{text}", DESCRIPTIONS), self.descriptions, self.family)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)


def available_prompt_sets() -> list[str]:
    """Names of the built-in prompt files (``sentiment``, ``news_ag``, ...)."""
    return available("prompts")


def load_prompt_set(source: str | Path) -> PromptSet:
    """A built-in prompt set by name (``"sentiment"``) or a user's YAML file by path."""
    path = find("prompts", source)
    return parse_prompt_set(read_text(path, "prompt file"), source=str(path))


def load_prompt(source: str | Path, template: str | None = None) -> Prompt:
    """One prompt of a set: ``load_prompt("sentiment", "lm-eval-sst2")`` (default: the first)."""
    prompts = load_prompt_set(source)
    return prompts.prompts[0] if template is None else prompts.get(template)


def parse_prompt_set(text: str, source: str = "<string>") -> PromptSet:
    """Parse and validate the YAML ``text`` of a prompt file (errors name ``source``)."""
    data = load_yaml(text, source)  # no duplicate keys, no aliases
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a prompt file must be a mapping with keys {_FILE_KEYS}")
    _check_keys(data, _FILE_KEYS, source)
    for key in ("family", "labels", "templates"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}")
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels):
        raise ConfigError(f"{source}: 'labels' must be a non-empty list of distinct names")
    labels = tuple(str(label) for label in labels)
    templates = data["templates"]
    if not isinstance(templates, dict) or not templates:
        raise ConfigError(f"{source}: 'templates' must map template names to templates")
    default_words = data.get("verbalizer")
    default_domain = data.get("domain")
    prompts = []
    for name, spec in templates.items():
        where = f"{source}: template {name!r}"
        spec = {"text": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a string or a mapping with keys {_TEMPLATE_KEYS}")
        _check_keys(spec, _TEMPLATE_KEYS, where)
        if "text" not in spec:
            raise ConfigError(f"{where}: missing key 'text'")
        words = spec.get("verbalizer", default_words)
        if words is None:
            raise ConfigError(f"{where}: no 'verbalizer' (give one here or at the top of the file)")
        key = "verbalizer" if "verbalizer" in spec else "verbalizer (file default)"
        verbalizer = Verbalizer.from_dict(words, where=f"{where}, key {key!r}")
        _check_cover(verbalizer, labels, f"{where}, key {key!r}")
        verbalizer = verbalizer.for_labels(labels)
        try:
            template = Template(spec["text"], str(name), spec.get("domain", default_domain))
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'text' of {exc}") from None
        prompts.append(Prompt(template, verbalizer, str(data["family"])))
    descriptions = None
    if data.get("descriptions") is not None:
        where = f"{source}: key 'descriptions'"
        descriptions = Verbalizer.from_dict(data["descriptions"], where=where)
        _check_cover(descriptions, labels, where)
        descriptions = descriptions.for_labels(labels)
    return PromptSet(
        family=str(data["family"]),
        labels=labels,
        prompts=tuple(prompts),
        description=str(data.get("description", "")),
        source=source,
        descriptions=descriptions,
    )


def _check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}"
                + did_you_mean(str(key), valid)
                + f"; valid keys: {', '.join(valid)}"
            )


def _check_cover(verbalizer: Verbalizer, labels: tuple[str, ...], where: str) -> None:
    missing = [label for label in labels if label not in verbalizer.labels]
    extra = [label for label in verbalizer.labels if label not in labels]
    if extra:
        raise ConfigError(
            f"{where}: label {extra[0]!r} is not one of the file's labels "
            f"({', '.join(labels)})" + did_you_mean(extra[0], missing or labels)
        )
    if missing:
        raise ConfigError(
            f"{where}: no words for label(s) {', '.join(map(repr, missing))}; the file's "
            f"labels are: {', '.join(labels)}"
        )
