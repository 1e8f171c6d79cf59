"""The micro-batcher's grouping, bound, back-pressure and cancellation; no timing asserts."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from supportqa_server.errors import Cancelled, Overloaded
from supportqa_server.runtime.batching import MicroBatcher


class Gate:
    """A model call that records its batches and blocks until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        return [i * 10 for i in items]


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


async def _wait_entered(gate: Gate) -> None:
    await asyncio.to_thread(gate.entered.wait, 10)


async def _holding_first(executor, **kwargs) -> tuple[Gate, MicroBatcher, asyncio.Task]:
    """A batcher (max_wait 0) whose model is running batch [0], held until gate.release."""
    gate = Gate()
    b = MicroBatcher(gate, executor=executor, max_wait_ms=0, **kwargs)
    first = asyncio.create_task(b.submit(0))
    await _wait_entered(gate)
    return gate, b, first


async def test_items_queued_while_model_runs_share_one_call(executor):
    # batch [0] is running; the next 5 items queue behind it
    gate, b, first = await _holding_first(executor, max_batch=8, max_queue=100)
    rest = [asyncio.create_task(b.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    gate.release.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]
    assert gate.batches == [[0], [1, 2, 3, 4, 5]]
    assert b.stats.batches == 2 and b.stats.items == 6
    await b.close()


async def test_batches_never_exceed_max_batch(executor):
    gate, b, first = await _holding_first(executor, max_batch=3, max_queue=100)
    rest = [asyncio.create_task(b.submit(i)) for i in range(1, 8)]
    await asyncio.sleep(0)
    gate.release.set()
    await asyncio.gather(first, *rest)
    assert [len(x) for x in gate.batches] == [1, 3, 3, 1]
    assert sorted(i for batch in gate.batches for i in batch) == list(range(8))
    await b.close()


async def test_full_queue_refuses_at_once(executor):
    gate, b, running = await _holding_first(executor, max_batch=2, max_queue=3)
    queued = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert len(b) == 3
    with pytest.raises(Overloaded, match="queue is full"):
        await b.submit(99)
    assert b.stats.rejected == 1
    gate.release.set()
    assert await asyncio.gather(running, *queued) == [0, 10, 20, 30]
    assert 99 not in [i for batch in gate.batches for i in batch]
    await b.close()


async def test_cancelled_and_expired_items_never_reach_the_model(executor):
    gate, b, running = await _holding_first(executor, max_batch=8, max_queue=100)
    cancelled = asyncio.create_task(b.submit(1))
    expired = asyncio.create_task(b.submit(2, timeout=0.0))
    kept = asyncio.create_task(b.submit(3))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    gate.release.set()
    assert await running == 0
    assert await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(Cancelled, match="deadline"):
        await expired
    assert gate.batches == [[0], [3]]
    assert b.stats.dropped == 2
    await b.close()


async def test_model_error_reaches_every_caller_of_the_batch(executor):
    def boom(items):
        raise ValueError("model exploded")

    b = MicroBatcher(boom, executor=executor, max_batch=4, max_wait_ms=1, max_queue=10)
    results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    ok = MicroBatcher(lambda xs: [x + 1 for x in xs], executor=executor, max_batch=4,
                      max_wait_ms=1, max_queue=10)
    assert await ok.submit(1) == 2  # a fresh batcher on the same executor still works
    await b.close()
    await ok.close()


async def test_max_wait_gathers_concurrent_arrivals(executor):
    seen: list[list[int]] = []

    def record(items):
        seen.append(list(items))
        return items

    b = MicroBatcher(record, executor=executor, max_batch=16, max_wait_ms=50, max_queue=100)
    out = await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert out == list(range(10))
    assert seen == [list(range(10))]  # all submitted in one loop turn -> one call
    await b.close()


async def test_max_wait_is_spent_only_once_callers_are_concurrent(executor):
    """A lone item goes at once (the hour-long wait would otherwise time the test out);
    after a batch of two, a lone item waits for company, and the batch closes when full."""
    seen: list[list[int]] = []

    def record(items):
        seen.append(list(items))
        return items

    b = MicroBatcher(record, executor=executor, max_batch=2, max_wait_ms=3_600_000,
                     max_queue=100)
    assert await asyncio.wait_for(b.submit(1), 10) == 1  # nothing before it: no wait
    assert await asyncio.gather(b.submit(2), b.submit(3)) == [2, 3]  # one turn: one batch
    waiting = asyncio.ensure_future(b.submit(4))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # after a batch of two it waits for a second item
    assert await asyncio.wait_for(b.submit(5), 10) == 5
    assert await waiting == 4
    assert seen == [[1], [2, 3], [4, 5]]
    await b.close()


def test_rejects_bad_bounds(executor):
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, executor=executor, max_batch=0)


async def test_stats_add_up_model_time_and_queueing(executor):
    gate, b, first = await _holding_first(executor, max_batch=8, max_queue=100)
    rest = [asyncio.create_task(b.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0.05)  # the model holds batch [0] at least this long; 1-3 queue
    gate.release.set()
    await first
    await asyncio.gather(*rest)
    assert b.stats.busy_s >= 0.05
    assert b.stats.waited_s >= 3 * 0.04  # lower bounds only: the sleep guarantees them
    await b.close()


async def test_an_item_that_would_wait_past_its_limit_is_refused_at_once(executor):
    """With a measured batch time, the batcher refuses what could only start after the queue
    limit or the caller's deadline, and takes what fits; no clock is asserted: the batch time
    is set, as if measured."""
    gate, b, first = await _holding_first(executor, max_batch=2, max_queue=100,
                                          max_queue_ms=2500)
    b.item_s = 0.5  # as if every item took half a second: a batch of two, a second
    # Three queued: the running item's rest (<= 0.5 s) and one full batch before a new item.
    queued = [asyncio.create_task(b.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0)
    assert 1.0 <= b.expected_wait() <= 1.5
    with pytest.raises(Overloaded, match="past its deadline"):
        await b.submit(9, timeout=0.5)
    queued.append(asyncio.create_task(b.submit(4)))  # fits: it joins item 3's batch
    await asyncio.sleep(0)
    assert 2.0 <= b.expected_wait() <= 2.5
    b.item_s = 0.75  # slower items: a new item now waits 3-3.75 s
    with pytest.raises(Overloaded, match="2.5 s queue limit"):
        await b.submit(6)
    assert b.stats.rejected == 2
    gate.release.set()
    assert await asyncio.gather(first, *queued) == [0, 10, 20, 30, 40]
    await b.close()
