"""Promotion gates: what a candidate adapter must score before an alias moves to it.

A gate is one line::

    accuracy on data/sst2 >= alias - 0.5     # at most half a point below the alias's version
    macro_f1 on tweets-sentiment > alias     # strictly better than the alias's version
    accuracy on data/sst2 >= 0.85            # an absolute score (or 85%)

``METRIC on DATA OP BOUND``: METRIC is one of :data:`GATE_METRICS`; DATA a data source
``load_data`` reads (a packaged corpus, a folder, a file), scored on its test split; OP
``>=`` or ``>``; BOUND either ``alias``, optionally ``+`` or ``-`` a margin in percentage
points, or an absolute score as a fraction in [0, 1] or a percentage (``85%``). Several
gates are joined by `` and `` (or given one by one; a data path holding `` and `` must be
given on its own); every gate must hold. No torch here: a recipe's gates are checked when
it is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from peftkit.errors import ConfigError, did_you_mean

__all__ = ["GATE_GRAMMAR", "GATE_METRICS", "Gate", "parse_gate", "parse_gates"]

GATE_METRICS = ("accuracy", "macro_f1")
GATE_GRAMMAR = (
    "'METRIC on DATA >= BOUND' (or '>'), METRIC one of accuracy, macro_f1; BOUND 'alias', "
    "'alias - 0.5' / 'alias + 1' (percentage points) or a score such as 0.85 or 85%; "
    "several gates joined by ' and ', e.g. 'accuracy on data/sst2 >= alias - 0.5'"
)
_GATE = re.compile(r"\s*(?P<metric>\S+)\s+on\s+(?P<data>.+?)\s*(?P<op>>=|>)\s*(?P<bound>.*?)\s*")
_RELATIVE = re.compile(r"alias\s*(?:(?P<sign>[+-])\s*(?P<margin>\d+(?:\.\d*)?|\.\d+))?")
_ABSOLUTE = re.compile(r"(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<percent>%?)")


@dataclass(frozen=True)
class Gate:
    """One parsed gate. ``relative``: the bound is the alias's version's score plus
    ``offset`` (a fraction: ``alias - 0.5`` gives -0.005); otherwise the bound is
    ``offset`` itself, an absolute score in [0, 1]."""

    text: str
    metric: str
    data: str
    strict: bool  # '>' rather than '>='
    relative: bool
    offset: float

    @property
    def op(self) -> str:
        return ">" if self.strict else ">="

    def bound(self, current: float | None) -> float | None:
        """The score to reach, given the alias's version's ``current`` score (None when
        the alias points nowhere: a relative gate then has no bound)."""
        if not self.relative:
            return self.offset
        return None if current is None else current + self.offset

    def holds(self, score: float, current: float | None) -> bool:
        """Whether ``score`` meets the gate (a relative gate holds with no alias yet)."""
        bound = self.bound(current)
        if bound is None:
            return True
        # a tolerance for float noise: 0.8 - 0.005 and 0.795 must compare equal
        return score > bound + 1e-12 if self.strict else score >= bound - 1e-12

    def describe_bound(self, current: float | None) -> str:
        """The bound in words: ``"0.8956 - 0.0050 = 0.8906"``, ``"0.85"``."""
        if not self.relative:
            return f"{self.offset:.4f}"
        if current is None:
            return "alias (none yet)"
        if self.offset == 0:
            return f"{current:.4f}"
        sign = "+" if self.offset > 0 else "-"
        return f"{current:.4f} {sign} {abs(self.offset):.4f} = {current + self.offset:.4f}"


def parse_gate(text: object, where: str = "gate") -> Gate:
    """``text`` parsed; ConfigError naming ``where`` (when not empty), what is wrong and
    the grammar."""
    at = f"{where}: " if where else ""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{at}a gate is a line of text: {GATE_GRAMMAR}; got {text!r}")
    match = _GATE.fullmatch(text)
    if match is None:
        raise ConfigError(f"{at}cannot read gate {text!r}: write {GATE_GRAMMAR}")
    metric, data, bound = match["metric"], match["data"], match["bound"]
    if metric not in GATE_METRICS:
        raise ConfigError(
            f"{at}unknown metric {metric!r} in gate {text!r}{did_you_mean(metric, GATE_METRICS)}"
            f"; a gate's metric is one of {', '.join(GATE_METRICS)}"
        )
    relative = _RELATIVE.fullmatch(bound)
    absolute = _ABSOLUTE.fullmatch(bound)
    if relative is not None:
        margin = float(relative["margin"] or 0) / 100
        offset = -margin if relative["sign"] == "-" else margin
    elif absolute is not None:
        offset = float(absolute["value"]) / (100 if absolute["percent"] else 1)
        if not 0 <= offset <= 1:
            raise ConfigError(
                f"{at}the bound {bound!r} of gate {text!r} is not a score: give a "
                "fraction in [0, 1] (0.85) or a percentage (85%)"
            )
    else:
        raise ConfigError(
            f"{at}cannot read the bound {bound!r} of gate {text!r}: write 'alias', "
            "'alias - 0.5' (percentage points) or a score such as 0.85 or 85%"
        )
    return Gate(text.strip(), metric, data, match["op"] == ">", relative is not None, offset)


def parse_gates(texts: str | Iterable[str], where: str = "gate") -> tuple[Gate, ...]:
    """Every gate of ``texts`` (one string, or several), each split at `` and ``.

    >>> [g.metric for g in parse_gates("accuracy on d >= alias - 0.5 and macro_f1 on d >= 0.8")]
    ['accuracy', 'macro_f1']
    """
    at = f"{where}: " if where else ""
    items = [texts] if isinstance(texts, str) else list(texts)
    gates = [
        parse_gate(part, where)
        for item in items
        for part in (re.split(r"\s+and\s+", item) if isinstance(item, str) else [item])
    ]
    if not gates:
        raise ConfigError(f"{at}give at least one gate: {GATE_GRAMMAR}")
    return tuple(gates)
