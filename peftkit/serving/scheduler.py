"""One worker thread batching rows from every waiting request into mixed-adapter forwards.

The HTTP routes (``peftkit.serving.http``) only admit requests; this object does the model
work, off the event loop::

    scheduler = Scheduler(model, max_batch_rows=64)   # model: AdaptedModel
    scheduler.start()
    predictions = await scheduler.submit([Row("a gripping film", ref="sst2@3")])
    scheduler.close()      # answers what is queued, then stops the thread

**The worker owns the model.** Only its thread calls the ``AdaptedModel``: forwards, and
the jobs given to :meth:`Scheduler.call` (an admin load or unload) between forwards.

**Batching.** A forward starts when the rows waiting reach ``max_batch_rows`` or
``max_batch_tokens``, or ``max_wait_ms`` after the oldest waiting row arrived (at once
when rows are already late, as under a backlog). The default ``max_wait_ms`` is 0: a free
worker starts on whatever waits, and the rows that arrive during a forward make the next
one, so batches grow with the load and a lone request never waits for company (on the
2-core CPU of ``bench_serve``, 5 ms of waiting cost a lone one-row request 30% of its
latency and bought no throughput at 64 clients). It takes rows up to both limits (always at
least one row) and at most ``model.max_resident`` distinct adapters, then runs one
``predict_mixed`` (two when the batch mixes rows with and without a ``text_pair``: the
tokenizer encodes a pair differently). Each row carries its adapter pinned as ``name@N``
when it was admitted, so a request in flight finishes on the version it started with.

**One worker, all of torch's threads.** Two workers forwarding at once, each on one
thread, were measured against it offline (2026-12-08, 2 CPU cores, 16 MiniLM LoRA
adapters, ``predict_mixed`` on two AdaptedModels in two threads): 1.12x the rows/s at one
row per forward, 1.18x at 8 and 1.10x at 64, while each forward took 1.8x as long (19.2
ms against 10.7 at one row), so a lone request would wait longer. Not worth sharing the
model between forwards in flight.

**Fairness: round-robin over requests, one row at a time.** The waiting requests form a
ring; a forward takes one row from each request in turn until it is full, and the next
forward goes on from where this one stopped. So with ``R`` requests waiting, each gets at
least ``floor(max_batch_rows / R)`` rows (and at least one row every ``ceil(R /
max_batch_rows)`` forwards), whatever their sizes: a 10,000-row request takes at most
``ceil(max_batch_rows / R)`` rows of a forward while others wait, and a k-row request that
arrives behind it is answered within about ``k * R / max_batch_rows + 1`` forwards. A
request larger than a forward is split over as many as it needs.

**Overload.** Rows waiting are bounded by ``max_queue_rows``: a request that would pass it
is refused at once with :class:`Overloaded` (the server answers 503 + Retry-After). A
request not answered within ``timeout_s`` raises :class:`RequestTimeout`, and its rows not
yet taken are dropped.

**Failures stay with their rows.** An adapter that fails to load (corrupt files, another
base) fails the requests that asked for it, with that error; the other rows of the same
forward are answered as usual. A request fails as a whole with the first error one of its
rows met (its rows not yet taken are dropped).

Tokens are counted by ``count_tokens`` (``serve.py`` gives the base tokenizer's count; the
default, characters / 4, is for tests and models without one), in the submitting thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.serving.rows import (
    ForwardStats,
    LoadStats,
    Overloaded,
    RequestTimeout,
    Row,
    char_tokens,
)

__all__ = [
    "ForwardStats",
    "LoadStats",
    "Overloaded",
    "RequestTimeout",
    "Row",
    "Scheduler",
    "char_tokens",
]

log = logging.getLogger(__name__)


class _Request:
    """A submitted request: its rows, which are taken and answered, and how to answer."""

    def __init__(self, rows: Sequence[Row], tokens: list[int], finish: Callable) -> None:
        self.rows = list(rows)
        self.tokens = tokens
        self.results: list[Any] = [None] * len(rows)
        self.next = 0  # the first row not yet taken into a forward
        self.left = len(rows)  # rows not yet answered
        self.arrived = time.monotonic()
        self.done = False
        self.finish = finish  # finish(result_or_exception), from the worker thread


class Scheduler:
    """Batches rows across requests into forwards of ``model`` (see the module docstring).

    ``model`` needs ``load(ref)``, ``predict_mixed(texts, adapters, text_pairs)``,
    ``resident`` and ``max_resident`` (an ``AdaptedModel`` has them). ``observe``, if
    given, is called from the worker thread with a :class:`ForwardStats` after every
    forward and a :class:`LoadStats` after every adapter load.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_rows: int = 64,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 0.0,
        max_queue_rows: int = 4096,
        timeout_s: float = 30.0,
        count_tokens: Callable[[Sequence[str], Sequence[str | None]], list[int]] = char_tokens,
        observe: Callable[[ForwardStats | LoadStats], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self.timeout_s = timeout_s
        self.count_tokens = count_tokens
        self.observe = observe
        self._cond = threading.Condition()
        self._ring: deque[_Request] = deque()  # requests with rows not yet taken
        self._jobs: deque[tuple[Callable[[Any], Any], Callable]] = deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.resident: tuple[str, ...] = tuple(model.resident)  # as of the last forward

    # -- the submitting side (any thread; submit and call on an event loop) -----------------

    @property
    def queued_rows(self) -> int:
        """Rows admitted and not yet taken into a forward."""
        return self._queued_rows

    @property
    def running(self) -> bool:
        """Whether the worker runs and takes new requests (False once close() began)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> Scheduler:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="peftkit-scheduler")
            self._thread.start()
        return self

    async def submit(self, rows: Sequence[Row]) -> list[Any]:
        """The predictions for ``rows`` (in order), from as many forwards as they need.

        Raises :class:`Overloaded` at once when the queue cannot take them,
        :class:`RequestTimeout` after ``timeout_s``, or the first error a row met.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        request = self._admit(rows, _resolver(loop, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            self._drop(request)
            raise RequestTimeout(
                f"the request was not answered within request_timeout_s={self.timeout_s:g} s "
                f"({len(rows)} rows, {self._queued_rows} rows queued); send fewer rows or "
                "retry later"
            ) from None
        except asyncio.CancelledError:  # the client went away
            self._drop(request)
            raise

    async def call(self, job: Callable[[Any], Any]) -> Any:
        """``job(model)`` run on the worker thread between forwards; its result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is stopping; retry on another instance")
            self._jobs.append((job, _resolver(loop, future)))
            self._cond.notify()
        return await future

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, answer those queued, then stop the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _admit(self, rows: Sequence[Row], finish: Callable) -> _Request:
        if not rows:
            raise ValueError("a request needs at least one row")
        tokens = self.count_tokens([r.text for r in rows], [r.text_pair for r in rows])
        request = _Request(rows, tokens, finish)
        with self._cond:
            if self._stopping or self._thread is None:
                raise Overloaded("the server is stopping; retry on another instance")
            if self._queued_rows + len(rows) > self.max_queue_rows:
                raise Overloaded(
                    f"the queue is full ({self._queued_rows} rows waiting, max_queue_rows="
                    f"{self.max_queue_rows}); retry after a second"
                )
            self._ring.append(request)
            self._queued_rows += len(rows)
            self._queued_tokens += sum(tokens)
            self._cond.notify()
        return request

    def _drop(self, request: _Request) -> None:
        """Forget ``request``'s rows not yet taken (timed out, failed or abandoned)."""
        with self._cond:
            request.done = True
            if request in self._ring:
                self._ring.remove(request)
                self._queued_rows -= len(request.rows) - request.next
                self._queued_tokens -= sum(request.tokens[request.next :])

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job, batch = self._next_work()
            if job is None and batch is None:
                return
            try:
                if job is not None:
                    self._run_job(*job)
                else:
                    self._forward(batch or [])
            except Exception as exc:  # never let one forward stop the worker
                log.error("scheduler: %s: %s", type(exc).__name__, exc)
            self.resident = tuple(self.model.resident)

    def _next_work(self) -> tuple[Any, list[tuple[_Request, int]] | None]:
        """The next job, or the next batch once it is due; (None, None) when stopped."""
        with self._cond:
            while True:
                if self._jobs:
                    return self._jobs.popleft(), None
                if self._ring:
                    due = self._due_in()
                    if due <= 0 or self._stopping:
                        return None, self._take()
                    self._cond.wait(due)
                    continue
                if self._stopping:
                    return None, None
                self._cond.wait()

    def _due_in(self) -> float:
        """Seconds until the next forward is due (<= 0: now). Lock held."""
        if self._queued_rows >= self.max_batch_rows:
            return 0.0
        if self._queued_tokens >= self.max_batch_tokens:
            return 0.0
        oldest = min(r.arrived for r in self._ring)
        return oldest + self.max_wait_s - time.monotonic()

    def _take(self) -> list[tuple[_Request, int]]:
        """Rows for one forward, round-robin over the ring (see the module docstring)."""
        batch: list[tuple[_Request, int]] = []
        refs: set[str] = set()
        skipped: list[_Request] = []
        tokens = 0
        while self._ring and len(batch) < self.max_batch_rows:
            request = self._ring.popleft()
            i = request.next
            ref, cost = request.rows[i].ref, request.tokens[i]
            if ref not in refs and len(refs) >= self.model.max_resident:
                skipped.append(request)  # its next row needs one adapter too many
                continue
            if batch and tokens + cost > self.max_batch_tokens:
                self._ring.appendleft(request)
                break
            batch.append((request, i))
            refs.add(ref)
            tokens += cost
            request.next += 1
            self._queued_rows -= 1
            self._queued_tokens -= cost
            if request.next < len(request.rows):
                self._ring.append(request)
        self._ring.extendleft(reversed(skipped))  # first in line next time
        return batch

    def _run_job(self, job: Callable[[Any], Any], finish: Callable) -> None:
        try:
            result = job(self.model)
        except Exception as exc:
            result = exc
        self.resident = tuple(self.model.resident)  # as the job left it, before it answers
        finish(result)

    def _forward(self, batch: list[tuple[_Request, int]]) -> None:
        start = time.monotonic()
        waits = tuple(start - request.arrived for request, _ in batch)
        failed = self._load_all({request.rows[i].ref for request, i in batch})
        live = [(r, i) for r, i in batch if not r.done and r.rows[i].ref not in failed]
        for group in (
            [(r, i) for r, i in live if r.rows[i].text_pair is None],
            [(r, i) for r, i in live if r.rows[i].text_pair is not None],
        ):
            if group:
                self._predict(group)
        for request, i in batch:
            if request.rows[i].ref in failed:
                self._answer(request, i, failed[request.rows[i].ref])
        if self.observe is not None:
            stats = ForwardStats(
                rows=len(batch),
                adapters=len({r.rows[i].ref for r, i in batch}),
                tokens=sum(r.tokens[i] for r, i in batch),
                seconds=time.monotonic() - start,
                waits=waits,
                failed=sum(1 for r, i in batch if r.rows[i].ref in failed),
            )
            self.observe(stats)

    def _load_all(self, refs: set[str]) -> dict[str, Exception]:
        """Make ``refs`` resident; the error of each that failed to load."""
        failed: dict[str, Exception] = {}
        resident = set(self.model.resident)
        for ref in sorted(refs & resident):  # most recently used first: loading the others
            self.model.load(ref)  # must not evict what this forward needs
        for ref in sorted(refs - resident):
            start = time.monotonic()
            try:
                self.model.load(ref)
            except PeftkitError as exc:
                failed[ref] = exc
                log.warning("adapter %s failed to load: %s", ref, exc)
            if self.observe is not None:
                error = type(failed[ref]).__name__ if ref in failed else None
                self.observe(LoadStats(ref, time.monotonic() - start, error))
        self.resident = tuple(self.model.resident)
        return failed

    def _predict(self, group: list[tuple[_Request, int]]) -> None:
        rows = [request.rows[i] for request, i in group]
        pairs = [r.text_pair or "" for r in rows] if rows[0].text_pair is not None else None
        try:
            results: list[Any] = self.model.predict_mixed(
                [r.text for r in rows], [r.ref for r in rows], pairs
            )
        except PeftkitError as exc:
            results = [exc] * len(rows)
        except Exception as exc:  # a bug, not bad input: the rows fail, the worker goes on
            log.error("forward failed: %s: %s", type(exc).__name__, exc)
            results = [RuntimeError(f"the forward failed ({type(exc).__name__})")] * len(rows)
        for (request, i), result in zip(group, results, strict=True):
            self._answer(request, i, result)

    def _answer(self, request: _Request, i: int, result: Any) -> None:
        if request.done:
            return
        if isinstance(result, Exception):
            self._drop(request)
            request.finish(result)
            return
        request.results[i] = result
        request.left -= 1
        if request.left == 0:
            request.done = True
            request.finish(request.results)


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable[[Any], None]:
    """A callable for the worker thread that settles ``future`` on its loop: an exception
    becomes the future's exception, anything else its result."""

    def settle(value: Any) -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    def finish(value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
            loop.call_soon_threadsafe(settle, value)

    return finish
