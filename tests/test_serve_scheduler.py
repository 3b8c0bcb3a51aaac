"""The serving scheduler alone (peftkit.serving.scheduler), on a stand-in model: batching
across concurrent submitters, round-robin fairness, the bounded queue, timeouts, and an
adapter that fails to load failing only its rows. The real model behind HTTP is in
tests/test_serve.py."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from peftkit.errors import IntegrityError
from peftkit.serving.scheduler import (
    ForwardStats,
    LoadStats,
    Overloaded,
    RequestTimeout,
    Row,
    Scheduler,
)


class StandIn:
    """What the scheduler needs of an AdaptedModel: it answers ``ref|text|pair`` per row,
    records every forward, and refuses to load refs starting with 'bad'."""

    def __init__(self, max_resident: int = 8):
        self.max_resident = max_resident
        self.resident: list[str] = []
        self.forwards: list[list[tuple[str, str, str | None]]] = []
        self.reloads: list[str] = []  # adapters a forward found evicted (AdaptedModel reloads)

    def load(self, ref: str) -> str:
        """Least recently used order, as AdaptedModel keeps it: a resident ref moves last."""
        if ref.startswith("bad"):
            raise IntegrityError(f"adapter {ref}: adapter_model.safetensors differs from the index")
        if ref in self.resident:
            self.resident.remove(ref)
        self.resident.append(ref)
        self.resident = self.resident[-self.max_resident :]
        return ref

    def predict_mixed(self, texts, adapters, text_pairs=None):
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        assert len(set(adapters)) <= self.max_resident
        for ref in dict.fromkeys(adapters):
            if ref not in self.resident:
                self.reloads.append(ref)
                self.load(ref)
        self.forwards.append(list(zip(adapters, texts, pairs, strict=True)))
        return [f"{a}|{t}|{p}" for a, t, p in zip(adapters, texts, pairs, strict=True)]


def rows(ref: str, n: int, prefix: str = "t") -> list[Row]:
    return [Row(f"{prefix}{i}", ref) for i in range(n)]


async def blocked(scheduler: Scheduler) -> threading.Event:
    """Hold the worker in a job until the returned event is set (requests pile up)."""
    gate = threading.Event()
    asyncio.get_running_loop().create_task(scheduler.call(lambda model: gate.wait(10)))
    await asyncio.sleep(0.05)
    return gate


async def admitted(*coros) -> list[asyncio.Task]:
    """Tasks for ``coros``, each run until its rows are queued."""
    tasks = []
    for coro in coros:
        tasks.append(asyncio.get_running_loop().create_task(coro))
        await asyncio.sleep(0)
    return tasks


def run(scheduler: Scheduler, body):
    scheduler.start()
    try:
        return asyncio.run(body())
    finally:
        scheduler.close(timeout=10)


def test_rows_of_concurrent_requests_share_one_forward_and_each_gets_its_own():
    model = StandIn()
    scheduler = Scheduler(model, max_batch_rows=32, max_wait_ms=20)

    async def body():
        gate = await blocked(scheduler)
        tasks = await admitted(
            *(scheduler.submit(rows(f"a{i % 3}@1", 1 + i % 2, f"r{i}-")) for i in range(8))
        )
        gate.set()
        return await asyncio.gather(*tasks)

    answers = run(scheduler, body)
    assert len(model.forwards) == 1 and len(model.forwards[0]) == 12
    for i, answer in enumerate(answers):
        assert answer == [f"a{i % 3}@1|r{i}-{j}|None" for j in range(1 + i % 2)]


def test_a_lone_row_waits_at_most_max_wait_ms_for_company():
    model = StandIn()
    scheduler = Scheduler(model, max_batch_rows=32, max_wait_ms=30)

    async def body():
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await scheduler.submit(rows("a@1", 1))
        return answer, loop.time() - start

    answer, took = run(scheduler, body)
    assert answer == ["a@1|t0|None"]
    assert 0.025 <= took < 1.0


def test_a_big_request_is_split_and_small_ones_behind_it_are_served_round_robin():
    model = StandIn()
    batch = 8
    scheduler = Scheduler(model, max_batch_rows=batch, max_wait_ms=0)

    async def body():
        gate = await blocked(scheduler)
        tasks = await admitted(
            scheduler.submit(rows("big@1", 200)),
            *(scheduler.submit(rows(f"s{i}@1", 2)) for i in range(5)),
        )
        gate.set()
        return await asyncio.gather(*tasks)

    answers = run(scheduler, body)
    assert [a.split("|")[1] for a in answers[0]] == [f"t{i}" for i in range(200)]
    assert all(len(f) <= batch for f in model.forwards)
    assert len(model.forwards) >= math.ceil(210 / batch)
    # 6 requests waiting: each gets floor(8 / 6) = 1 row per forward at least, so a 2-row
    # request is answered within 2 forwards, not after the 200 rows queued before it
    last = {ref: n for n, f in enumerate(model.forwards) for ref, _, _ in f}
    assert max(last[f"s{i}@1"] for i in range(5)) <= 1
    assert all(len(a) == 2 for a in answers[1:])
    first = model.forwards[0]
    assert sum(1 for ref, _, _ in first if ref == "big@1") <= math.ceil(batch / 6) + 1


def test_a_forward_never_needs_more_adapters_than_fit_in_memory():
    model = StandIn(max_resident=2)
    scheduler = Scheduler(model, max_batch_rows=16, max_wait_ms=0)

    async def body():
        gate = await blocked(scheduler)
        tasks = await admitted(*(scheduler.submit(rows(f"a{i}@1", 3)) for i in range(5)))
        gate.set()
        return await asyncio.gather(*tasks)

    answers = run(scheduler, body)
    assert all(len(a) == 3 for a in answers)
    assert all(len({ref for ref, _, _ in f}) <= 2 for f in model.forwards)
    assert sum(len(f) for f in model.forwards) == 15


def test_max_batch_tokens_caps_a_forward():
    model = StandIn()
    scheduler = Scheduler(model, max_batch_rows=32, max_batch_tokens=12, max_wait_ms=0)

    async def body():
        gate = await blocked(scheduler)
        task = (await admitted(scheduler.submit([Row("x" * 20, "a@1")] * 6)))[0]
        gate.set()
        return await task

    assert len(run(scheduler, body)) == 6
    assert [len(f) for f in model.forwards] == [2, 2, 2]  # 5 tokens a row (chars / 4)


def test_a_full_queue_refuses_at_once_with_overloaded():
    model = StandIn()
    scheduler = Scheduler(model, max_batch_rows=8, max_queue_rows=4, max_wait_ms=0)

    async def body():
        gate = await blocked(scheduler)
        first = (await admitted(scheduler.submit(rows("a@1", 3))))[0]
        with pytest.raises(Overloaded, match="max_queue_rows=4") as caught:
            await scheduler.submit(rows("a@1", 2))
        gate.set()
        return await first, caught.value.retry_after

    answer, retry_after = run(scheduler, body)
    assert len(answer) == 3 and retry_after >= 1


def test_a_request_not_answered_in_time_raises_and_its_rows_are_dropped():
    model = StandIn()
    scheduler = Scheduler(model, max_wait_ms=0, timeout_s=0.2)

    async def body():
        gate = await blocked(scheduler)
        with pytest.raises(RequestTimeout, match="request_timeout_s=0.2"):
            await scheduler.submit(rows("late@1", 3))
        gate.set()
        return await scheduler.submit(rows("on-time@1", 1))

    assert run(scheduler, body) == ["on-time@1|t0|None"]
    assert all(ref != "late@1" for f in model.forwards for ref, _, _ in f)
    assert scheduler.queued_rows == 0


def test_an_adapter_that_fails_to_load_fails_only_the_requests_that_asked_for_it():
    model = StandIn()
    seen: list = []
    scheduler = Scheduler(model, max_wait_ms=0, observe=seen.append)

    async def body():
        gate = await blocked(scheduler)
        tasks = await admitted(
            scheduler.submit(rows("good@1", 2)),
            scheduler.submit(rows("bad@1", 2)),
            scheduler.submit([Row("x", "good@1"), Row("y", "bad@1")]),
            scheduler.submit(rows("other@2", 1)),
        )
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    good, bad, mixed, other = run(scheduler, body)
    assert good == ["good@1|t0|None", "good@1|t1|None"]
    assert other == ["other@2|t0|None"]
    assert isinstance(bad, IntegrityError) and "bad@1" in str(bad)
    assert isinstance(mixed, IntegrityError)
    assert all(ref != "bad@1" for f in model.forwards for ref, _, _ in f)
    loads = [s for s in seen if isinstance(s, LoadStats)]
    assert {s.ref for s in loads if s.error} == {"bad@1"}
    assert {s.ref for s in loads if not s.error} == {"good@1", "other@2"}
    forwards = [s for s in seen if isinstance(s, ForwardStats)]
    assert sum(s.rows for s in forwards) == 7 and sum(s.failed for s in forwards) == 3


def test_loading_for_a_forward_never_evicts_an_adapter_the_same_forward_needs():
    model = StandIn(max_resident=2)
    seen: list = []
    scheduler = Scheduler(model, max_wait_ms=0, observe=seen.append)

    async def body():
        await scheduler.submit(rows("a@1", 1))
        await scheduler.submit(rows("x@1", 1))  # resident: a (least recent), x
        gate = await blocked(scheduler)
        tasks = await admitted(scheduler.submit([Row("p", "b@1"), Row("q", "a@1")]))
        gate.set()
        return await asyncio.gather(*tasks)

    (answer,) = run(scheduler, body)
    assert answer == ["b@1|p|None", "a@1|q|None"]
    assert model.reloads == []  # a was kept: x, not a, made room for b
    assert sorted(model.resident) == ["a@1", "b@1"]
    assert [s.ref for s in seen if isinstance(s, LoadStats)] == ["a@1", "x@1", "b@1"]


def test_rows_with_a_text_pair_go_through_their_own_predict_call():
    model = StandIn()
    scheduler = Scheduler(model, max_wait_ms=0)

    async def body():
        gate = await blocked(scheduler)
        tasks = await admitted(
            scheduler.submit([Row("a", "nli@1", "b"), Row("c", "nli@1")]),
            scheduler.submit([Row("d", "nli@1", "e")]),
        )
        gate.set()
        return await asyncio.gather(*tasks)

    first, second = run(scheduler, body)
    assert first == ["nli@1|a|b", "nli@1|c|None"] and second == ["nli@1|d|e"]
    assert sorted(len(f) for f in model.forwards) == [1, 2]
    assert {p is None for f in model.forwards for _, _, p in f} == {True, False}
    assert all(len({p is None for _, _, p in f}) == 1 for f in model.forwards)


def test_close_answers_what_is_queued_then_refuses_new_requests():
    model = StandIn()
    scheduler = Scheduler(model, max_wait_ms=1000)

    async def body():
        gate = await blocked(scheduler)
        task = (await admitted(scheduler.submit(rows("a@1", 3))))[0]
        closing = asyncio.get_running_loop().run_in_executor(None, scheduler.close, 10)
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="stopping"):
            await scheduler.submit(rows("a@1", 1))
        gate.set()
        answer = await task  # answered at once: a stopping scheduler does not wait
        await closing
        return answer

    scheduler.start()
    assert len(asyncio.run(body())) == 3
    assert not scheduler.running
