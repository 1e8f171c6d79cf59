"""Micro-batching: concurrent callers share one model call, with a bounded queue."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from supportqa_server.errors import Cancelled, Overloaded

BATCH_TIMES = 15  # recent batch times the wait estimate takes the median of

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    queued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for benchmarks and Stats."""

    batches: int = 0
    items: int = 0
    dropped: int = 0  # cancelled or expired before their batch ran
    rejected: int = 0  # refused: the queue was full, or its wait too long for the caller
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    busy_s: float = 0.0  # seconds `fn` ran, summed over batches
    waited_s: float = 0.0  # seconds items queued before their batch ran, summed over items


class MicroBatcher(Generic[T, R]):
    """Groups items from concurrent callers into one call of `fn` on an executor.

    A batch closes when it holds `max_batch` items or `max_wait_ms` after its first item
    arrived, whichever comes first; items that arrive while the model runs wait for the next
    batch, so under load batches fill without waiting. The wait is only spent while callers
    are concurrent, that is after a batch of more than one item: a lone caller's item goes
    at once (a voice utterance alone was held 20 ms for company that never came). At most
    `max_queue` items wait; more are refused at once with Overloaded (back-pressure, never an
    unbounded wait). So is an item whose estimated wait (batches queued before it times the
    measured batch time) passes `max_queue_ms` or its own deadline: it would only queue to
    fail, and its place makes every later caller slower. Items whose caller went away or whose
    deadline passed are dropped before they cost model time.

    `fn` takes a list of items and returns one result per item, in order. It runs on
    `executor`, one batch at a time, so a model needs no lock.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        executor: Executor,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 512,
        max_queue_ms: float = 0.0,
        name: str = "model",
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._fn = fn
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0  # seconds
        self.max_queue = max_queue
        self.max_queue_s = max_queue_ms / 1000.0  # 0: no limit but the caller's deadline
        self.name = name
        self.on_batch = on_batch  # (name, items) of every batch run, for metrics
        # Seconds of model time per item: the median over the last BATCH_TIMES batches but
        # the first (it warms the model up: lazy initialisation, a speech language model
        # built), so one slow batch (a language-model rebuild, a GC pause) does not turn
        # callers away. 0 until measured.
        self.item_s = 0.0
        self._times: collections.deque[float] = collections.deque(maxlen=BATCH_TIMES)
        self._warm = False
        self._running_n = 0  # items in the batch running now
        self._running_since: float | None = None  # monotonic start of the batch running now
        self.stats = BatchStats()
        self._last_size = 0  # items in the batch before: > 1 means callers are concurrent
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    async def submit(self, item: T, *, timeout: float | None = None) -> R:
        """Queues one item and waits for its result.

        Args:
            item: One model input.
            timeout: Seconds after which the item is dropped if its batch has not started.

        Raises:
            Overloaded: The queue already holds max_queue items.
            Cancelled: The deadline passed before the item ran.
        """
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue} waiting); retry with backoff"
            )
        wait = self.expected_wait()
        limits = [x for x in (self.max_queue_s or None, timeout) if x is not None]
        if limits and wait > min(limits):
            self.stats.rejected += 1
            raise Overloaded(
                f"the {self.name} is busy: this would start in about {wait:.1f} s, past "
                + ("its deadline" if timeout is not None and wait > timeout
                   else f"the {self.max_queue_s:g} s queue limit")
                + "; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = _Pending(item, loop.create_future(), deadline)
        self._queue.append(pending)
        assert self._arrived is not None
        self._arrived.set()
        return await pending.future

    def expected_wait(self) -> float:
        """Seconds a new item would wait before its batch starts, from the measured time per
        item: what is left of the running batch, plus the full batches queued before it (a
        partly filled last batch runs together with the new item)."""
        if not self.item_s:
            return 0.0
        left = 0.0
        if (since := self._running_since) is not None:
            left = max(0.0, self._running_n * self.item_s - (time.monotonic() - since))
        ahead = len(self._queue) - len(self._queue) % self.max_batch
        return left + ahead * self.item_s

    async def close(self) -> None:
        """Stops the worker; queued items get Cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(Cancelled(f"the {self.name} batcher is shutting down"))

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.name}")

    def _take_live(self, batch: list[_Pending[T, R]]) -> None:
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            if p.future.done():
                self.stats.dropped += 1
            elif p.deadline is not None and now > p.deadline:
                self.stats.dropped += 1
                p.future.set_exception(Cancelled("the deadline passed while the item was queued"))
            else:
                batch.append(p)

    def _timed(self, items: list[T]) -> Sequence[R]:
        t0 = time.perf_counter()
        try:
            return self._fn(items)
        finally:
            took = time.perf_counter() - t0
            self.stats.busy_s += took
            if self._warm:
                self._times.append(took / max(1, len(items)))
                self.item_s = statistics.median(self._times)
            self._warm = True
            self._running_since = None

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch: list[_Pending[T, R]] = []
            self._take_live(batch)
            if batch and self.max_wait > 0 and self._last_size > 1:
                close_at = loop.time() + self.max_wait
                while len(batch) < self.max_batch:
                    remaining = close_at - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        pass
                    self._take_live(batch)
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            self._last_size = len(batch)
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] += 1
            if self.on_batch is not None:
                self.on_batch(self.name, len(batch))
            self._running_n = len(batch)
            started = self._running_since = time.monotonic()
            self.stats.waited_s += sum(started - p.queued for p in batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._timed, [p.item for p in batch]
                )
            except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            if len(results) != len(batch):
                err = RuntimeError(
                    f"{self.name} returned {len(results)} results for {len(batch)} items"
                )
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
