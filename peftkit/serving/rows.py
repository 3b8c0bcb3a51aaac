"""What passes through the serving scheduler (``peftkit.serving.scheduler``): the rows a
request brings, the errors that refuse one, and what each forward and adapter load report
to the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peftkit.errors import PeftkitError

__all__ = ["ForwardStats", "LoadStats", "Overloaded", "RequestTimeout", "Row", "char_tokens"]


class Overloaded(PeftkitError):
    """Too many rows are waiting (or the server is stopping): retry after ``retry_after``
    seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(PeftkitError):
    """A request was not answered within the scheduler's ``timeout_s``."""


@dataclass(frozen=True)
class Row:
    """One text to classify, by ``ref`` (``name@N``, pinned at admission)."""

    text: str
    ref: str
    text_pair: str | None = None


@dataclass(frozen=True)
class ForwardStats:
    """What one forward did (for metrics): its rows and distinct adapters, its time, the
    seconds each of its rows waited in the queue, and the rows that failed."""

    rows: int
    adapters: int
    tokens: int
    seconds: float
    waits: tuple[float, ...]
    failed: int


@dataclass(frozen=True)
class LoadStats:
    """One adapter made resident (or not): ``error`` is None when it loaded."""

    ref: str
    seconds: float
    error: str | None


def char_tokens(texts: Sequence[str], pairs: Sequence[str | None]) -> list[int]:
    """A token count without a tokenizer: characters / 4, at least 1 per row."""
    return [max(1, (len(t) + len(p or "")) // 4) for t, p in zip(texts, pairs, strict=True)]
