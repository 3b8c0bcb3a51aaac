"""Promotion: move an alias (``sst2@production``) to a candidate version only when it
scores well enough against the version the alias points at now.

    plan = plan_promotion(registry, "sst2@4", "production",
                          ["accuracy on data/sst2 >= alias - 0.5"])   # checks; loads no model
    decision = promote(plan)             # loads the base once, scores both, decides, records
    print(decision_text(decision))       # figures with 95% intervals, passed or refused

Everything that can be checked without a model is checked by :func:`plan_promotion`: the
candidate exists, the alias name, the gates' grammar and metrics (see
:mod:`peftkit.config.gates`), each gate's data loads and has a test split whose labels the
candidate and the current version know, and both were trained on the same base. Then
:func:`promote` loads the base once, scores the candidate and the current version with
:class:`~peftkit.serving.adapted.AdaptedModel` on the same test rows (the best label of
each row, abstaining or not), computes bootstrap intervals and the paired difference
(:mod:`peftkit.metrics.intervals`), and asks the registry to record the decision and, when
every gate holds, move the alias in the same transaction, but only if it still points where
it pointed when planning began (a concurrent promotion that moved it first wins; this one is
recorded as refused). A relative gate (``alias - 0.5``) holds when the alias points nowhere
yet, and the decision says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peftkit.config.gates import Gate, parse_gates
from peftkit.data.dataset import TextDataset
from peftkit.data.load import load_data
from peftkit.errors import ConfigError, DataError, PeftkitError, RegistryError
from peftkit.registry.entries import Entry, check_alias, describe_base, split_ref
from peftkit.registry.promotions import Promotion, new
from peftkit.registry.store import Registry

__all__ = [
    "PromotionPlan",
    "check_recipe_gates",
    "decision_text",
    "plan_promotion",
    "promote",
    "promote_after_run",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionPlan:
    """A promotion checked and ready to score: ``current`` is what the alias points at
    now (None: nowhere), ``data`` each gate's dataset by source."""

    registry: Registry
    candidate: Entry
    alias: str
    current: Entry | None
    gates: tuple[Gate, ...]
    data: Mapping[str, TextDataset]

    @property
    def gate_text(self) -> str:
        return " and ".join(g.text for g in self.gates)

    @property
    def target(self) -> str:
        return f"{self.candidate.name}@{self.alias}"


def plan_promotion(
    registry: Registry,
    ref: str,
    alias: str,
    gates: str | Iterable[str],
    *,
    data_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PromotionPlan:
    """Check a promotion of ``ref`` (``name@N``; a bare name means its latest) to
    ``name@alias`` under ``gates`` without loading a model; ConfigError, DataError or
    RegistryError (one line) for anything wrong. ``data_options`` gives ``load_data``
    keyword arguments per data source (fields, labels, split ratios, seed)."""
    check_alias(alias)
    _, selector = split_ref(ref)
    if isinstance(selector, str):
        raise ConfigError(
            f"promote {ref!r}: give the candidate as NAME@VERSION (e.g. "
            f"{ref.partition('@')[0]}@3), not an alias"
        )
    parsed = parse_gates(gates, "--gate")
    if registry.read_only:
        raise RegistryError(
            f"the registry at {registry.root} is read-only: a promotion records its decision "
            "there; open a writable registry"
        )
    candidate = registry.get(ref)
    current = _current(registry, candidate.name, alias)
    if current is not None and current.version == candidate.version:
        raise ConfigError(
            f"{candidate.name}@{alias} already points at {candidate.ref}; nothing to promote"
        )
    if current is not None and current.base_fingerprint != candidate.base_fingerprint:
        raise ConfigError(
            f"cannot promote {candidate.ref} to {candidate.name}@{alias}: it was trained on base "
            f"{describe_base(candidate.base_fingerprint, candidate.base)}, but {current.ref} "
            f"(what the alias points at) on {describe_base(current.base_fingerprint, current.base)}"
            "; a promotion compares versions of one base"
        )
    options = data_options or {}
    data = {}
    for gate in parsed:
        if gate.data not in data:
            data[gate.data] = _gate_data(gate, options.get(gate.data, {}))
        for entry in (candidate, current):
            if entry is not None:
                _check_labels(gate, data[gate.data], entry)
    if not (candidate.base or {}).get("source"):
        raise ConfigError(
            f"{candidate.ref} does not record its base model's source; cannot load it"
        )
    return PromotionPlan(registry, candidate, alias, current, parsed, data)


def promote(plan: PromotionPlan, base: Any = None, *, batch_size: int = 32) -> Promotion:
    """Score, decide and record ``plan`` (``base``: the loaded base, else it is loaded
    from the candidate's record); returns the decision as the registry recorded it."""
    figures = _score(plan, base, batch_size)
    passed, reason = _decide(plan, figures)
    promotion = new(
        plan.candidate.name,
        plan.alias,
        plan.candidate.ref,
        None if plan.current is None else plan.current.ref,
        passed=passed,
        gate=plan.gate_text,
        figures=figures,
        reason=reason,
    )
    expected = None if plan.current is None else plan.current.ref
    return plan.registry.decide_promotion(promotion, expected=expected)


# -- a recipe's promote: block --------------------------------------------------------------


def recipe_data_options(data_spec: Any) -> dict[str, dict[str, Any]]:
    """``load_data`` options for a gate on the recipe's own ``data.source``: the same
    fields, labels, splits and rows the run was scored on."""
    keys = ("text_field", "label_field", "text_pair_field", "labels", "split_ratios", "seed")
    options = {k: getattr(data_spec, k) for k in (*keys, "max_rows", "sample")}
    return {data_spec.source: {**options, "need_train": True}}


def check_recipe_gates(recipe: Any, labels: Iterable[str]) -> None:
    """Before a run trains: each gate of the recipe's ``promote:`` block names data that
    loads, has a test split, and whose test labels are among the run's ``labels``."""
    known = set(labels)
    options = recipe_data_options(recipe.data)
    where = f"{recipe.source}: promote.gate"
    for gate in parse_gates(recipe.promote.gate, where):
        data = _gate_data(gate, options.get(gate.data, {}), where)
        unknown = sorted({data.labels[y] for y in data.split("test").labels} - known)
        if unknown:
            raise DataError(
                f"{where} {gate.text!r}: the labels of {gate.data}'s test rows are not "
                f"the run's: {', '.join(map(repr, unknown[:10]))} are not among its labels"
            )


def promote_after_run(base: Any, registry: Registry, ref: str, recipe: Any) -> tuple[dict, str]:
    """A recipe's ``promote:`` block for the version ``ref`` it just registered, scored on
    the run's loaded ``base``: what metrics.json records (the decision) and the decision
    as text. A resumed run whose alias already points at ``ref`` promotes nothing again."""
    spec = recipe.promote
    name = ref.partition("@")[0]
    if registry.aliases(name).get(f"{name}@{spec.alias}") == ref:
        done = f"{name}@{spec.alias} already points at {ref}; not promoting again"
        return {"alias": spec.alias, "candidate": ref, "decision": "already", "reason": done}, done
    plan = plan_promotion(
        registry, ref, spec.alias, spec.gate, data_options=recipe_data_options(recipe.data)
    )
    decision = promote(plan, base)
    return decision.to_dict(), decision_text(decision)


# -- checks --------------------------------------------------------------------------------


def _current(registry: Registry, name: str, alias: str) -> Entry | None:
    """What ``name@alias`` points at now, or None when there is no such alias yet."""
    target = registry.aliases(name).get(f"{name}@{alias}")
    return None if target is None else registry.get(target)


def _gate_data(gate: Gate, options: Mapping[str, Any], where: str = "gate") -> TextDataset:
    """The gate's data, loaded for scoring; its test split must have rows."""
    try:
        data = load_data(gate.data, **{"need_train": False, **options})
    except PeftkitError as exc:
        raise type(exc)(f"{where} {gate.text!r}: {exc}") from None
    if len(data.split("test")) == 0:
        raise DataError(
            f"{where} {gate.text!r}: {gate.data} has no test split (no test rows); a gate scores "
            "the test split: give a folder with a test file, a single file or a packaged corpus"
        )
    return data


def _check_labels(gate: Gate, data: TextDataset, entry: Entry) -> None:
    """DataError when the test rows carry labels ``entry`` does not know."""
    seen = sorted({data.labels[y] for y in data.split("test").labels})
    unknown = [lab for lab in seen if lab not in entry.labels]
    if unknown:
        raise DataError(
            f"gate {gate.text!r}: the labels of {gate.data}'s test rows do not match "
            f"{entry.ref}'s: it does not know {', '.join(map(repr, unknown[:10]))}"
            f"{' ...' if len(unknown) > 10 else ''} (its labels: {', '.join(entry.labels[:10])}"
            f"{' ...' if len(entry.labels) > 10 else ''})"
        )


# -- scoring -------------------------------------------------------------------------------


def _score(plan: PromotionPlan, base: Any, batch_size: int) -> dict[str, Any]:
    """Both versions' predictions on each gate's test rows, their intervals and paired
    difference: the figures the decision rests on."""
    from peftkit.metrics.intervals import bootstrap_intervals, bootstrap_method, paired_comparison
    from peftkit.serving.adapted import AdaptedModel

    if base is None:
        from peftkit.models.base import load_base

        source = plan.candidate.base["source"]
        log.info("loading base %s for %s", source, plan.candidate.ref)
        base = load_base(source, quantization=plan.candidate.quantization)
    versions = [e for e in (plan.candidate, plan.current) if e is not None]
    per_data: dict[str, Any] = {}
    with AdaptedModel(base, plan.registry, max_resident=2, batch_size=batch_size) as model:
        for source, data in plan.data.items():
            test = data.split("test")
            preds = {
                e.ref: [
                    p.label for p in model.predict(test.texts, e.ref, text_pairs=test.text_pairs)
                ]
                for e in versions
            }
            labels = list(data.labels)
            labels += sorted({x for p in preds.values() for x in p} - set(labels))
            index = {label: i for i, label in enumerate(labels)}
            gold = [index[data.labels[y]] for y in test.labels]
            ids = {ref: [index[x] for x in p] for ref, p in preds.items()}
            cand = bootstrap_intervals(gold, ids[plan.candidate.ref], labels)
            figures: dict[str, Any] = {
                "rows": len(gold),
                "candidate": {k: v.to_dict() for k, v in cand.items()},
                "current": None,
                "paired": None,
                "method": bootstrap_method(len(gold)),
            }
            if plan.current is not None:
                cur = bootstrap_intervals(gold, ids[plan.current.ref], labels)
                figures["current"] = {k: v.to_dict() for k, v in cur.items()}
                paired = paired_comparison(
                    gold, ids[plan.current.ref], ids[plan.candidate.ref], labels
                )
                figures["paired"] = paired.to_dict()  # difference: candidate - current
            per_data[source] = figures
    gates = []
    for gate in plan.gates:
        got = per_data[gate.data]
        score = got["candidate"][gate.metric]["estimate"]
        current = None if got["current"] is None else got["current"][gate.metric]["estimate"]
        gates.append(
            {
                "gate": gate.text,
                "metric": gate.metric,
                "data": gate.data,
                "candidate": score,
                "current": current,
                "bound": gate.bound(current),
                "holds": gate.holds(score, current),
                "why": _why(gate, score, current, plan),
            }
        )
    return {"data": per_data, "gates": gates}


def _why(gate: Gate, score: float, current: float | None, plan: PromotionPlan) -> str:
    holds = gate.holds(score, current)
    if gate.relative and current is None:
        return f"{gate.metric} {score:.4f}: {plan.target} points nowhere yet, so a gate relative to it holds"
    op = gate.op if holds else ("<=" if gate.strict else "<")
    whose = f" ({plan.current.ref}'s {gate.metric})" if gate.relative and plan.current else ""
    return (
        f"{gate.metric} on {gate.data}: {score:.4f} {op} {gate.describe_bound(current)}{whose}: "
        f"{'holds' if holds else 'fails'}"
    )


def _decide(plan: PromotionPlan, figures: Mapping[str, Any]) -> tuple[bool, str]:
    failed = [g["why"] for g in figures["gates"] if not g["holds"]]
    if failed:
        stays = plan.current.ref if plan.current is not None else "nothing (no alias)"
        return False, "; ".join(failed) + f"; {plan.target} stays at {stays}"
    reason = f"every gate holds ({len(figures['gates'])})"
    if plan.current is None and any(g.relative for g in plan.gates):
        reason += f"; {plan.target} pointed nowhere, so the gates relative to it held"
    return True, reason


# -- the decision on one screen ------------------------------------------------------------


def decision_text(promotion: Promotion) -> str:
    """The decision as a person reads it: per data set both versions' scores with 95%
    intervals and their paired difference, per gate whether it holds, then the verdict."""
    figures = promotion.figures
    now = promotion.previous or "nothing"
    target = f"{promotion.name}@{promotion.alias}"
    lines = [f"promote {promotion.candidate} to {target} (now {now})", f"gate: {promotion.gate}"]
    for source, got in figures.get("data", {}).items():
        metrics = list(got["candidate"])
        lines += [f"\n{source}: {got['rows']} test rows", _row("", metrics)]
        lines.append(
            _row(f"candidate {promotion.candidate}", map(_interval, got["candidate"].values()))
        )
        if got.get("current") is not None:
            lines.append(
                _row(f"current {promotion.previous}", map(_interval, got["current"].values()))
            )
        paired = got.get("paired")
        if paired:
            diff = [_interval(v, signed=True) for v in paired["difference"].values()]
            lines.append(_row("difference (paired)", diff))
            verdict = _VERDICTS.get(paired["verdict"]["accuracy"], paired["verdict"]["accuracy"])
            lines.append(f"  accuracy: {verdict} (McNemar p={paired['mcnemar_p']:.3g})")
        lines.append(f"  95% intervals: {got['method']}")
    gates = figures.get("gates", [])
    lines.append("")
    lines += [f"{'holds' if g['holds'] else 'FAILS'}: {g['why']}" for g in gates]
    by = f"recorded by {promotion.who} at {promotion.at}"
    if promotion.passed:
        lines.append(f"PASSED: {target} {now} -> {promotion.candidate} ({by})")
    elif all(g["holds"] for g in gates):  # the gates held, but the alias moved meanwhile
        lines.append(f"REFUSED: {promotion.reason} ({by})")
    else:
        failed = sum(not g["holds"] for g in gates)
        lines.append(
            f"REFUSED: {failed} of {len(gates)} gate(s) fail; {target} stays at {now} ({by})"
        )
    return "\n".join(lines)


# paired_comparison's verdicts, with A the current version and B the candidate
_VERDICTS = {
    "A is better": "the current version is better",
    "B is better": "the candidate is better",
}


def _row(role: str, cells: Iterable[str]) -> str:
    return f"  {role:<24}" + "".join(f"{c:<28}" for c in cells).rstrip()


def _interval(value: Mapping[str, float], signed: bool = False) -> str:
    fmt = "{:+.4f}" if signed else "{:.4f}"
    low, high = fmt.format(value["low"]), fmt.format(value["high"])
    return f"{fmt.format(value['estimate'])} [{low}, {high}]"
