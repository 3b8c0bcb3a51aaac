"""What a registry entry holds, and the checks on names, references and metadata.

An :class:`Entry` is one adapter version as the index records it; ``check_metadata``
validates what a caller registers (each bad field named with its valid form),
``encode_row`` / ``entry_from_row`` turn an entry into its index row and back, and
``parse_ref`` reads ``"name"``, ``"name@latest"`` and ``"name@3"``, ``split_ref`` also
``"name@production"`` (an alias: a label the index moves from version to version).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, RegistryError, did_you_mean

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")  # starts with a letter: never a version
MAX_VERSION = 2**63 - 1  # SQLite's largest INTEGER: a larger version cannot be stored
COLUMNS = tuple(
    "name version method task labels base_fingerprint base quantization template verbalizer"  # noqa: SIM905
    " metrics files tags created run_id lineage calibration".split()
)
# what a caller gives besides name and files (lineage and calibration may be None)
META_FIELDS = (*COLUMNS[2:11], "tags", "lineage", "calibration")
OPTIONAL_MAPPINGS = ("verbalizer", "lineage", "calibration")  # JSON objects or None
JSON_COLUMNS = frozenset(
    {"labels", "base", "verbalizer", "metrics", "files", "tags", "lineage", "calibration"}
)


@dataclass(frozen=True)
class Entry:
    """One registered adapter version; ``path`` is its folder inside the registry."""

    name: str
    version: int
    method: str
    task: str
    labels: tuple[str, ...]
    base_fingerprint: str
    base: dict[str, Any]
    quantization: str | None
    template: str | None
    verbalizer: dict[str, Any] | None
    metrics: dict[str, Any]
    files: dict[str, str]  # relative path -> sha256
    tags: tuple[str, ...]
    created: str  # ISO 8601, UTC
    run_id: str | None  # the run that registered it (see Registry.find_run)
    # where it came from: {"parent": "name@V", "data": {...fingerprints...}, ...}, or None
    lineage: dict[str, Any] | None
    # its confidence calibration: {"temperature": ..., "threshold": ..., ...}, or None
    calibration: dict[str, Any] | None
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, ``path`` as a string, plus ``ref``."""
        out = {c: getattr(self, c) for c in COLUMNS}
        out.update(
            ref=self.ref, labels=list(self.labels), tags=list(self.tags), path=str(self.path)
        )
        return out


def check_name(name: object) -> str:
    """``name`` if it is a valid adapter name (it becomes a folder), else ConfigError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and "
            f"'-', starting with a letter or digit, at most 128 characters "
            f"(e.g. 'sst2-lora'); a version is written 'name@3' only in references"
        )
    return name


def ref_str(ref: object) -> str:
    return ref.ref if isinstance(ref, Entry) else ref  # type: ignore[return-value]


def split_ref(ref: str) -> tuple[str, int | str | None]:
    """``"name"`` / ``"name@latest"`` -> (name, None); ``"name@3"`` -> (name, 3);
    ``"name@production"`` -> (name, "production"), an alias."""
    if not isinstance(ref, str):
        raise ConfigError(f"an adapter reference is a string like 'sst2' or 'sst2@3', got {ref!r}")
    name, at, selector = ref.partition("@")
    check_name(name)
    if not at or selector == "latest":
        return name, None
    if re.fullmatch(r"[0-9]+", selector):
        version = version_number(selector)
        if version is None:
            shown = ref if len(ref) <= 80 else ref[:60] + "..."
            raise ConfigError(
                f"bad adapter reference {shown!r}: a version number runs from 1 to "
                f"{MAX_VERSION}, e.g. '{name}@1'"
            )
        return name, version
    if ALIAS.fullmatch(selector):
        return name, selector
    raise ConfigError(
        f"bad adapter reference {ref!r}: after '@' comes a version number from 1, 'latest' "
        f"or an alias (a letter, then letters, digits, '.', '_', '-'), e.g. '{name}@1'"
    )


def version_number(text: str) -> int | None:
    """The version ``text`` names when it is ASCII digits from 1 to :data:`MAX_VERSION`
    (a reference's ``@3``, a version folder's name), else None."""
    if not re.fullmatch(r"[0-9]+", text):
        return None
    digits = text.lstrip("0")
    if not digits or len(digits) > len(str(MAX_VERSION)):  # int() of 5,000 digits raises
        return None
    version = int(digits)
    return version if version <= MAX_VERSION else None


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` / ``"name@latest"`` -> (name, None); ``"name@3"`` -> (name, 3). An alias
    reference is a ConfigError here: resolve it first (``Registry.resolve``)."""
    name, selector = split_ref(ref)
    if isinstance(selector, str):
        raise ConfigError(f"{ref!r} names an alias; this needs a version (name@N) or a bare name")
    return name, selector


def check_alias(alias: object) -> str:
    """``alias`` if it is a valid alias name, else ConfigError."""
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias) or alias == "latest":
        raise ConfigError(
            f"invalid alias {alias!r}: use a letter, then letters, digits, '.', '_' and '-', "
            "at most 64 characters, not 'latest' (e.g. 'production')"
        )
    return alias


def check_metadata(given: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's metadata from ``given`` (other keys ignored), checked: ConfigError
    names the field and the valid form (``lineage`` and ``calibration`` may be left out)."""
    meta: dict[str, Any] = {
        k: given[k] if k not in OPTIONAL_MAPPINGS[1:] else given.get(k) for k in META_FIELDS
    }
    for field in ("method", "base_fingerprint", "task", "quantization", "template"):
        value = meta[field]
        if field in ("quantization", "template") and value is None:
            continue
        if not isinstance(value, str) or (not value and field != "task"):
            kind = "a string" if field == "task" else "a non-empty string"
            raise ConfigError(f"{field} must be {kind}, got {value!r}")
    meta["labels"] = _strings("labels", meta["labels"])
    meta["tags"] = _strings("tags", meta["tags"])
    dupes = sorted({x for x in meta["labels"] if meta["labels"].count(x) > 1})
    if dupes:
        raise ConfigError(f"labels must be distinct; repeated: {', '.join(map(repr, dupes))}")
    for field in ("base", "metrics", *OPTIONAL_MAPPINGS):
        if meta[field] is not None or field not in OPTIONAL_MAPPINGS:
            meta[field] = check_json_mapping(field, meta[field] or {})
    return meta


def check_run_id(run_id: object) -> str | None:
    if run_id is None:
        return None
    if not isinstance(run_id, str) or not run_id or len(run_id) > 512:
        raise ConfigError(
            f"run_id must be None or a non-empty string of at most 512 characters, got {run_id!r}"
        )
    return run_id


def _strings(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{field} must be a list of strings, e.g. ['neg', 'pos'], got {value!r}")
    items = tuple(value)
    bad = [x for x in items if not isinstance(x, str) or not x]
    if bad:
        raise ConfigError(f"{field} must hold non-empty strings; bad items: {bad!r}")
    return items


def check_json_mapping(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a mapping (dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{field} must hold JSON values (str, number, bool, None, lists, "
            f"dicts with string keys): {exc}"
        ) from None


def encode_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(
        json.dumps(list(row[c]) if isinstance(row[c], tuple) else row[c])
        if c in JSON_COLUMNS and row[c] is not None
        else row[c]
        for c in COLUMNS
    )


def entry_from_row(row: Iterable[Any], adapters: Path) -> Entry:
    """The entry of an index row (the columns of :data:`COLUMNS`, JSON ones encoded); its
    path is its version folder under ``adapters``."""
    values = dict(zip(COLUMNS, row, strict=True))
    for c in JSON_COLUMNS:
        if values[c] is not None:
            values[c] = json.loads(values[c])
    values["labels"], values["tags"] = tuple(values["labels"]), tuple(values["tags"])
    return Entry(**values, path=adapters / values["name"] / str(values["version"]))


def not_found(
    root: Path, name: str, version: int | None, versions: list[int], names: list[str]
) -> RegistryError:
    """The error for a reference the registry at ``root`` cannot resolve: the versions
    ``name`` has (``versions``), or the registered ``names`` with a did-you-mean."""
    if versions and version is not None:
        return RegistryError(
            f"adapter {name!r} has no version {version}; its versions are "
            f"{', '.join(map(str, versions))} (registry {root})"
        )
    if not names:
        return RegistryError(f"no adapter named {name!r}: the registry at {root} is empty")
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return RegistryError(
        f"no adapter named {name!r} in the registry at {root}"
        f"{did_you_mean(name, names)}; registered: {shown}"
    )


def describe_base(fingerprint: str, base: Mapping[str, Any]) -> str:
    keys = [k for k in ("architecture", "source", "quantization") if base.get(k) is not None]
    details = ", ".join(f"{k}={base[k]!r}" for k in keys)
    return f"{fingerprint!r}" + (f" ({details})" if details else "")


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`Registry.doctor` found: ``kind`` (``damaged-index``,
    ``unindexed-folder``, ``missing-folder``, ``files-differ``, ``unfinished``, ``link``,
    ``no-metadata``; a rebuild's replay of the journal adds ``journal-line``,
    ``alias-dropped`` and, as warnings, ``journal-torn`` and ``metrics-skipped``; the
    doctor also ``journal-file``, ``journal-differs`` and ``journal-lacks``),
    ``where`` (a ref or a path) and what to do in ``detail``."""

    kind: str
    where: str
    detail: str


@dataclass(frozen=True)
class Report:
    """What a check found: the refs that passed, the problems, and for a rebuild the refs
    it re-indexed, where it moved a damaged index, what it restored from the journal
    (``"alias sst2@production -> sst2@3"``, ``"promotion ..."``, ``"metrics sst2@1"``) and
    what it skipped without harm (``warnings``: they leave the report healthy)."""

    root: str
    ok: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()
    added: tuple[str, ...] = ()
    moved_aside: str | None = None
    restored: tuple[str, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "healthy": self.healthy,
            "ok": list(self.ok),
            "added": list(self.added),
            "moved_aside": self.moved_aside,
            "problems": [asdict(p) for p in self.problems],
            "restored": list(self.restored),
            "warnings": [asdict(p) for p in self.warnings],
        }

    def lines(self) -> list[str]:
        """The report as lines a person reads (one per problem)."""
        out = [] if self.moved_aside is None else [f"moved the damaged index to {self.moved_aside}"]
        out += [f"{p.kind}: {p.where}: {p.detail}" for p in self.problems]
        out += [f"warning: {p.kind}: {p.where}: {p.detail}" for p in self.warnings]
        out += [f"re-indexed {ref}" for ref in self.added]
        out += [f"restored {what}" for what in self.restored]
        rebuilt = self.added or self.moved_aside is not None or self.restored
        done = f"{len(self.added)} re-indexed" if rebuilt else f"{len(self.ok)} checked"
        if self.restored:
            done += f", {len(self.restored)} restored from the journal"
        verdict = "healthy" if self.healthy else f"{len(self.problems)} problem(s)"
        return [*out, f"{self.root}: {done}, {verdict}"]
