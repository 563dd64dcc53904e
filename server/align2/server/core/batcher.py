"""The dynamic batcher: one background task groups submitted items into batches.

Each caller gets a future. The loop forms a batch by count and by a padded-token budget.
Once the device is free it waits for batch-mates at most ``max_delay``, and only while more
are expected: items admitted and still being prepared, or, under closed-loop load, the
callers that were in flight during the last batch sending their next items. An idle server
runs a lone item at once.
Cancelled and expired items are dropped before compute; a caller whose deadline passes is
answered at once, even while its batch-mates run. A batch that fails (device out of memory,
or any other error short of a lost device) is split and its halves retried, down to single
items, so that an error one item causes (its decoding settings, its input) reaches that
item alone and its batch-mates get their results.

Admission is separate from submission: ``reserve(n)`` claims queue capacity for a call
before any of its items is decoded or tokenised, and fails at once with Overloaded when the
queue is full, asking the caller to come back when its turn comes (core/drain.py). The
items then ``submit`` against that reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from align2.server import metrics
from align2.server.core import deadlines
from align2.server.core.drain import DrainEstimate
from align2.server.core.priority import Priority, PriorityQueue
from align2.server.errors import (
    Align2Error,
    BackendError,
    Cancelled,
    DeadlineExpired,
    DeviceOutOfMemory,
    InvalidArgument,
    Unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """One item's result and where its time went."""

    value: R
    started: float  # time.monotonic() when its batch started
    queue_seconds: float  # submitted until its batch started
    compute_seconds: float  # wall time of the batch that carried it


def busy_seconds(outcomes: Iterable[Outcome[Any]]) -> float:
    """Length of the union of the device intervals that carried these items: batch-mates
    share one interval, and batches that ran at once (two models, engine requests) overlap,
    so this is wall time, never more than the span they cover."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((o.started, o.started + o.compute_seconds) for o in outcomes):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    cost: int
    future: asyncio.Future[Outcome[R]]
    priority: Priority
    deadline: float | None = None
    submitted: float = field(default_factory=time.monotonic)


class Reservation:
    """Queue capacity claimed by one call; each submit uses one slot, release() the rest."""

    def __init__(self, batcher: Batcher[Any, Any], count: int) -> None:
        self._batcher = batcher
        self.remaining = count

    def release(self, count: int | None = None) -> None:
        """Give back ``count`` unused slots (default: all that remain); never more."""
        count = self.remaining if count is None else min(count, self.remaining)
        if count > 0:
            self.remaining -= count
            self._batcher._unreserve(count)


RunBatch = Callable[[Sequence[T]], Awaitable[Sequence[R]]]


class Batcher(Generic[T, R]):
    """Batches items for one runner.

    Contract: ``run_batch`` receives a non-empty sequence and returns exactly one result
    per input, in input order. ``submit`` resolves to that item's result wrapped in an
    Outcome, or raises the item's error.
    """

    def __init__(
        self,
        run_batch: RunBatch[T, R],
        *,
        name: str,
        max_batch_size: int,
        max_batch_tokens: int,
        max_delay: float,
        max_queue: int,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._on_fatal = on_fatal
        self._queue: PriorityQueue[_Entry[T, R]] = PriorityQueue()
        self._reserved = 0  # claimed by reservations, not yet submitted
        self._in_flight = 0  # submitted, not yet finished (queued or running)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._free_since = 0.0  # when the device last finished a batch
        self._high_water = 0  # most items in flight since the current batch started
        self._expected = 0  # batch size the current load suggests
        self._gauge = metrics.QUEUE_DEPTH.labels(model=name)
        self.drain = DrainEstimate()  # the retry delay of a refusal

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    async def close(self) -> None:
        """Refuse new work, fail what is still queued with UNAVAILABLE, stop the loop."""
        self._closing = True
        for entry in self._queue.drain():
            _resolve_error(entry.future, Unavailable("server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- admission -----------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Items admitted and not finished: reserved, queued or running."""
        return self._reserved + self._in_flight

    def reserve(self, count: int, deadline: float | None = None) -> Reservation:
        """Claim ``count`` queue slots at once, or raise Overloaded without claiming any, with
        the delay after which the caller's turn comes (NoTurnBeforeDeadline: not before
        ``deadline``, a ``time.monotonic()`` instant)."""
        if self._closing:
            raise Unavailable("server is shutting down")
        if count > self.max_queue:
            raise InvalidArgument(
                f"samples: the call needs {count} forward passes of model {self.name!r}, "
                f"more than limits.max_queue_items {self.max_queue}; split it"
            )
        if self.load + count > self.max_queue:
            metrics.refused(count)
            full = (
                f"queue of model {self.name!r} is full: {self.load} of {self.max_queue} items "
                f"in flight (limits.max_queue_items), the call needs {count}"
            )
            raise self.drain.refusal(full, self.load, count, self.max_queue, deadline)
        self._reserved += count
        self._update_gauge()
        return Reservation(self, count)

    def _unreserve(self, count: int) -> None:
        self._reserved -= count
        self._update_gauge()
        self._wakeup.set()  # fewer items are on their way: a waiting batch may go now

    def _update_gauge(self) -> None:
        self._gauge.set(self.load)
        self._high_water = max(self._high_water, self.load)

    # -- submission ----------------------------------------------------------------------
    async def submit(
        self,
        item: T,
        *,
        cost: int,
        reservation: Reservation,
        deadline: float | None = None,
        priority: Priority = Priority.BULK,
    ) -> Outcome[R]:
        """Queue one item and wait for its result.

        ``deadline`` is a ``time.monotonic()`` instant: past it the call raises
        DeadlineExpired at once and the item is skipped if it has not started.
        Cancelling the caller drops the item the same way.
        """
        if reservation.remaining < 1:
            raise RuntimeError("submit without a reserved slot")
        reservation.remaining -= 1
        self._reserved -= 1
        if self._closing:
            self._update_gauge()
            raise Unavailable("server is shutting down")
        future: asyncio.Future[Outcome[R]] = asyncio.get_running_loop().create_future()
        entry = _Entry(item, cost, future, priority, deadline)
        if deadlines.passed(deadline):
            self._update_gauge()
            raise deadlines.expired("before the item was queued")
        self._in_flight += 1
        self._queue.push(entry, priority)
        self._update_gauge()
        self._wakeup.set()
        try:
            async with deadlines.within(deadline, "while queued or running"):
                return await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                metrics.REJECTED.labels(reason="cancelled").inc()
            raise
        finally:
            # A timed-out or cancelled await cancels the future (only a caller does: the
            # loop answers with results and errors), and the loop skips it. If it is still
            # queued, it leaves now with its prepared input, not when the loop next looks
            # (that may be after a long batch); an answered item is not looked for.
            if not future.done():
                future.cancel()
            if future.cancelled():
                self._queue.remove(entry, priority)
            self._in_flight -= 1
            self._update_gauge()

    # -- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)
                self._free_since = time.monotonic()

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        """Execute ``batch``; when the loop is cancelled (close), every item of it not yet
        answered is answered, a failed batch's halves not yet run included."""
        try:
            await self._execute(batch)
        except asyncio.CancelledError:
            for entry in batch:
                _resolve_error(entry.future, Cancelled("batch cancelled: server stopping"))
            raise

    async def _next_batch(self) -> list[_Entry[T, R]]:
        """Wait for work, give expected batch-mates a moment, take a batch."""
        while True:
            self._queue.drop(lambda e: e.future.done())
            if len(self._queue):
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        while len(self._queue) < self.max_batch_size and self._expecting_more():
            # A batch could start from here on: the device is free and an item is queued.
            ready = max(self._free_since, self._queue.oldest_submitted())
            remaining = ready + self.max_delay - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            self._queue.drop(lambda e: e.future.done())
            if not len(self._queue):
                return []
        return self._queue.take(self._fits)

    def _expecting_more(self) -> bool:
        """Are batch-mates on their way? Yes while admitted items are still being prepared,
        and while fewer items wait than were in flight during the last batch: under
        closed-loop load its callers are sending their next items. A lone caller on an idle
        server (one item in flight, nothing reserved) never waits."""
        return self._reserved > 0 or len(self._queue) < self._expected

    def _fits(self, batch: Sequence[_Entry[T, R]], entry: _Entry[T, R]) -> bool:
        """May ``entry`` join ``batch``? Padded cost: size x longest item."""
        if not batch:
            return True
        if len(batch) >= self.max_batch_size:
            return False
        longest = max(entry.cost, *(e.cost for e in batch))
        return longest * (len(batch) + 1) <= self.max_batch_tokens

    async def _execute(self, batch: list[_Entry[T, R]], isolating: bool = False) -> None:
        """Run one batch and resolve its futures. ``isolating``: a half of a failed batch."""
        # An item's timer runs on this loop and may be due but not yet run: its deadline is
        # read here too, so nothing is handed to the device after it.
        now = time.monotonic()
        for entry in batch:
            if deadlines.passed(entry.deadline, now) and not entry.future.done():
                entry.future.set_exception(deadlines.expired("while queued"))
        batch = [e for e in batch if not e.future.done()]
        if not batch:
            return
        # Callers seen in flight while the previous batch ran: under closed-loop load they
        # return with their next items, so the next batch waits (briefly) for them.
        self._expected = min(self.max_batch_size, self._high_water)
        self._high_water = self.load
        started = time.monotonic()
        metrics.observe_batch(self.name, len(batch), max(e.cost for e in batch) * len(batch))
        try:
            results = await self._run_batch([e.item for e in batch])
        except asyncio.CancelledError:
            for entry in batch:
                _resolve_error(entry.future, Cancelled("batch cancelled: server stopping"))
            raise
        except Exception as exc:  # one bad batch must never stop the loop
            if len(batch) > 1 and _may_be_one_items(exc):
                await self._split(batch, exc, isolating)
            else:
                self._fail_batch(batch, exc)
            return
        finished = time.monotonic()
        metrics.COMPUTE_SECONDS.labels(model=self.name).observe(finished - started)
        self.drain.observe(len(batch), finished - started)
        if len(results) != len(batch):
            self._fail_batch(
                batch, BackendError(f"backend returned {len(results)} results for {len(batch)}")
            )
            return
        for entry, value in zip(batch, results, strict=True):
            if not entry.future.done():
                queued = started - entry.submitted
                metrics.QUEUE_SECONDS.labels(model=self.name).observe(queued)
                entry.future.set_result(Outcome(value, started, queued, finished - started))

    async def _split(self, batch: list[_Entry[T, R]], exc: Exception, isolating: bool) -> None:
        """Retry the halves of a failed batch, down to single items. Out of memory: smaller
        batches may fit. Any other non-fatal error: it may come from one item (its decoding
        settings, its input) rather than the device, and that item alone must get it; an
        error every item causes costs at most 2n - 1 runs, one that a single item causes
        about 2 log2(n) extra runs. A fatal error is the device's: never retried."""
        reason = "out_of_memory" if isinstance(exc, DeviceOutOfMemory) else "error"
        metrics.BATCH_SPLITS.labels(model=self.name, reason=reason).inc()
        if not isolating:  # once per failed batch, not once per half
            log.warning(
                "model %s failed on a batch of %d (%s); retrying halves so that only the "
                "items at fault fail",
                self.name,
                len(batch),
                exc if isinstance(exc, Align2Error) else type(exc).__name__,
            )
        half = len(batch) // 2
        await self._execute(batch[:half], isolating=True)
        await self._execute(batch[half:], isolating=True)

    def _fail_batch(self, batch: Sequence[_Entry[T, R]], exc: Exception) -> None:
        if not isinstance(exc, Align2Error):
            log.exception("backend %s failed on a batch of %d", self.name, len(batch))
            exc = BackendError(f"model {self.name!r} failed on this batch: {exc}")
        if isinstance(exc, BackendError) and exc.fatal and self._on_fatal is not None:
            self._on_fatal(exc)
        for entry in batch:
            _resolve_error(entry.future, exc)


def _may_be_one_items(exc: Exception) -> bool:
    """Could one item of a batch have caused ``exc``, or could smaller batches succeed?
    Not for a lost device (fatal), nor for the server stopping (Unavailable, Cancelled)."""
    if isinstance(exc, BackendError):
        return not exc.fatal
    return not isinstance(exc, (Unavailable, Cancelled, DeadlineExpired))


def _resolve_error(future: asyncio.Future[Outcome[R]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
