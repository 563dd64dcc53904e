"""The dynamic batcher, with a fake runner gated by asyncio.Event (no sleeps as sync)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from support import metric, spin

from align2.server.core.batcher import Batcher, Outcome, busy_seconds
from align2.server.core.priority import Priority
from align2.server.errors import (
    BackendError,
    Cancelled,
    DeadlineExpired,
    DeviceOutOfMemory,
    InvalidArgument,
    NoTurnBeforeDeadline,
    Overloaded,
    Unavailable,
)


class FakeRunner:
    """Records every batch; returns item * 10. Optionally blocks until ``gate`` is set."""

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.entered = asyncio.Event()
        self.fail_above: int | None = None  # OOM for batches larger than this
        self.raise_once: Exception | None = None
        self.poison: int | None = None  # an item that fails any batch it is in, with:
        self.poison_error: Exception = RuntimeError(
            "probability tensor contains either inf, nan or element < 0"
        )
        self.failed: list[list[int]] = []  # batches that raised
        self.wrong_count = False

    async def __call__(self, items: Sequence[int]) -> list[float]:
        self.entered.set()
        await self.gate.wait()
        if self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc
        if self.fail_above is not None and len(items) > self.fail_above:
            raise DeviceOutOfMemory("fake OOM")
        if self.poison is not None and self.poison in items:
            self.failed.append(list(items))
            raise self.poison_error
        self.batches.append(list(items))
        if self.wrong_count:
            return [1.0]
        return [float(i) * 10 for i in items]

    @property
    def computed(self) -> list[int]:
        return [i for b in self.batches for i in b]


def make(runner: FakeRunner, **kw: float) -> Batcher[int, float]:
    options: dict = dict(
        name="fake", max_batch_size=4, max_batch_tokens=10_000, max_delay=30.0, max_queue=16
    )
    options.update(kw)
    batcher: Batcher[int, float] = Batcher(runner, **options)
    batcher.start()
    return batcher


async def submit_all(batcher: Batcher[int, float], items: list[int], **kw) -> list[float]:
    reservation = batcher.reserve(len(items))
    outcomes = await asyncio.gather(
        *(batcher.submit(i, cost=kw.pop("cost", 1), reservation=reservation, **kw) for i in items)
    )
    return [o.value for o in outcomes]


async def test_one_result_per_item_in_order_and_batches_bounded() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_delay=0.01)
    assert await submit_all(batcher, list(range(10))) == [i * 10.0 for i in range(10)]
    assert all(len(b) <= 4 for b in runner.batches)
    assert sorted(runner.computed) == list(range(10))
    await batcher.close()


async def test_lone_item_runs_at_once_despite_long_max_delay() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_delay=60.0)
    started = time.monotonic()
    assert await submit_all(batcher, [7]) == [70.0]
    assert time.monotonic() - started < 5.0  # far below max_delay: it did not wait
    await batcher.close()


async def test_waits_for_reserved_batch_mates_then_runs_them_together() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_delay=60.0)
    reservation = batcher.reserve(3)
    first = asyncio.create_task(batcher.submit(1, cost=1, reservation=reservation))
    await asyncio.sleep(0)  # let the loop see the first item; two more are reserved
    assert runner.batches == []
    rest = [asyncio.create_task(batcher.submit(i, cost=1, reservation=reservation)) for i in (2, 3)]
    await asyncio.gather(first, *rest)
    assert runner.batches == [[1, 2, 3]]
    await batcher.close()


async def test_released_reservation_stops_the_wait() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_delay=60.0)
    reservation = batcher.reserve(2)
    task = asyncio.create_task(batcher.submit(1, cost=1, reservation=reservation))
    await asyncio.sleep(0)
    reservation.release()  # the second item failed before it was submitted
    assert (await task).value == 10.0
    await batcher.close()


async def test_token_budget_limits_padded_batch_cost() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_batch_tokens=100, max_delay=0.0)
    reservation = batcher.reserve(5)
    tasks = [
        asyncio.create_task(batcher.submit(i, cost=c, reservation=reservation))
        for i, c in [(0, 10), (1, 40), (2, 40), (3, 10), (4, 10)]
    ]
    await runner.entered.wait()
    runner.gate.set()
    await asyncio.gather(*tasks)
    # padded cost = size x longest: [0] alone first (idle), then 40*2=80 fits, 40*3=120 not.
    for batch in runner.batches:
        costs = [{0: 10, 1: 40, 2: 40, 3: 10, 4: 10}[i] for i in batch]
        assert len(batch) == 1 or max(costs) * len(batch) <= 100
    assert sorted(runner.computed) == [0, 1, 2, 3, 4]
    await batcher.close()


async def test_full_queue_fails_at_once_without_claiming() -> None:
    batcher = make(FakeRunner(gated=True), max_queue=4)
    held = batcher.reserve(3)
    with pytest.raises(Overloaded, match="full: 3 of 4"):
        batcher.reserve(2)
    assert batcher.load == 3
    held.release()
    assert batcher.load == 0
    with pytest.raises(InvalidArgument, match=r"more than limits\.max_queue_items 4"):
        batcher.reserve(5)
    await batcher.close()


async def test_a_refusal_asks_to_come_back_when_its_turn_comes() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_queue=4, max_delay=0.0)
    assert await submit_all(batcher, [1, 2, 3, 4]) == [10.0, 20.0, 30.0, 40.0]
    per_item = batcher.drain.seconds_per_item  # measured from those batches
    assert per_item is not None and per_item > 0
    held = batcher.reserve(4)
    with pytest.raises(Overloaded) as first:
        batcher.reserve(2)
    with pytest.raises(Overloaded) as second:
        batcher.reserve(2)
    assert first.value.retry_after is not None and second.value.retry_after is not None
    assert second.value.retry_after >= first.value.retry_after  # the next turn, not the same
    with pytest.raises(NoTurnBeforeDeadline):  # its turn would come after its deadline
        batcher.reserve(2, deadline=time.monotonic())
    held.release()
    await batcher.close()


async def test_deadline_fires_while_a_batch_runs_and_item_is_never_computed() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(2)
    running = asyncio.create_task(batcher.submit(1, cost=1, reservation=r))
    await runner.entered.wait()  # batch [1] is on the device and blocked
    with pytest.raises(DeadlineExpired):
        await batcher.submit(2, cost=1, reservation=r, deadline=time.monotonic() + 0.05)
    assert not runner.gate.is_set()  # answered while the batch was still running
    runner.gate.set()
    assert (await running).value == 10.0
    await batcher.close()
    assert runner.computed == [1]


async def test_an_item_whose_deadline_passed_before_its_timer_ran_is_not_computed() -> None:
    """The loop is blocked past the deadline: the batch is taken before the item's timer
    runs (ready callbacks go before due timers), and the batch's own check drops it."""
    runner = FakeRunner()
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(1)
    call = asyncio.create_task(
        batcher.submit(1, cost=1, reservation=r, deadline=time.monotonic() + 0.02)
    )
    await asyncio.sleep(0)  # queued, the batcher woken
    time.sleep(0.05)  # noqa: ASYNC251 - holds the event loop past the deadline, on purpose
    with pytest.raises(DeadlineExpired):
        await call
    await batcher.close()
    assert runner.computed == []


async def test_already_expired_item_is_refused_before_queueing() -> None:
    runner = FakeRunner()
    batcher = make(runner)
    r = batcher.reserve(1)
    with pytest.raises(DeadlineExpired):
        await batcher.submit(1, cost=1, reservation=r, deadline=time.monotonic() - 1)
    assert batcher.load == 0
    await batcher.close()
    assert runner.computed == []


async def test_cancelled_caller_is_dropped_before_compute() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(2)
    running = asyncio.create_task(batcher.submit(1, cost=1, reservation=r))
    await runner.entered.wait()
    queued = asyncio.create_task(batcher.submit(2, cost=1, reservation=r))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    runner.gate.set()
    await running
    await batcher.close()
    assert runner.computed == [1]
    assert batcher.load == 0


async def test_callers_that_give_up_while_a_batch_runs_take_their_items_out_at_once() -> None:
    """Each caller gives up (deadline) while one long batch runs: its item (and prepared
    input) leaves the queue then, not when the loop next looks, so what the queue holds
    stays within limits.max_queue_items however many come and go meanwhile."""
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0, max_batch_size=1, max_queue=3)
    running = asyncio.create_task(batcher.submit(1, cost=1, reservation=batcher.reserve(1)))
    await runner.entered.wait()
    for i in range(2, 12):
        reservation = batcher.reserve(1)
        with pytest.raises(DeadlineExpired):
            await batcher.submit(i, cost=1, reservation=reservation, deadline=time.monotonic())
        reservation = batcher.reserve(1)
        with pytest.raises(DeadlineExpired):
            deadline = time.monotonic() + 0.01
            await batcher.submit(i, cost=1, reservation=reservation, deadline=deadline)
        assert len(batcher._queue) == 0 and batcher.load == 1
    runner.gate.set()
    assert (await running).value == 10.0
    await batcher.close()
    assert runner.computed == [1]


async def test_close_while_a_failed_batch_is_retried_in_halves_answers_every_item() -> None:
    """The first half is on the device when close() comes: the second half, taken out of
    the queue with it, is answered too (Cancelled), not left waiting."""
    entered = asyncio.Event()

    async def run(items: Sequence[int]) -> list[float]:
        if len(items) > 1:
            raise DeviceOutOfMemory("fake OOM")
        entered.set()
        await asyncio.Event().wait()  # the first half never ends by itself
        return [0.0]

    batcher: Batcher[int, float] = Batcher(
        run, name="fake", max_batch_size=4, max_batch_tokens=10_000, max_delay=30.0, max_queue=4
    )
    batcher.start()
    reservation = batcher.reserve(2)
    calls = [
        asyncio.create_task(batcher.submit(i, cost=1, reservation=reservation)) for i in (1, 2)
    ]
    await entered.wait()
    await batcher.close()
    for call in calls:
        with pytest.raises(Cancelled):
            await asyncio.wait_for(call, 5)
    assert batcher.load == 0


async def test_out_of_memory_splits_the_batch_and_retries_halves() -> None:
    runner = FakeRunner(gated=True)
    runner.fail_above = 1
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(5)
    first = asyncio.create_task(batcher.submit(0, cost=1, reservation=r))
    await runner.entered.wait()
    rest = [asyncio.create_task(batcher.submit(i, cost=1, reservation=r)) for i in range(1, 5)]
    await asyncio.sleep(0)
    runner.gate.set()
    values = [o.value for o in await asyncio.gather(first, *rest)]
    assert values == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert all(len(b) == 1 for b in runner.batches)
    await batcher.close()


async def test_a_failing_batch_fails_only_its_items_and_the_loop_goes_on() -> None:
    runner = FakeRunner()
    runner.raise_once = RuntimeError("kernel exploded")
    batcher = make(runner)
    r = batcher.reserve(1)
    with pytest.raises(BackendError, match="kernel exploded"):
        await batcher.submit(1, cost=1, reservation=r)
    assert await submit_all(batcher, [2, 3]) == [20.0, 30.0]
    await batcher.close()


async def start_gated_batch(runner: FakeRunner, batcher: Batcher[int, float], items: list[int]):
    """Submit ``items`` so that they run as one batch: the first holds the device (gated)
    while the rest queue behind it; returns the tasks, the first one's batch still gated."""
    r = batcher.reserve(len(items) + 1)
    blocker = asyncio.create_task(batcher.submit(-1, cost=1, reservation=r))
    await runner.entered.wait()
    tasks = [asyncio.create_task(batcher.submit(i, cost=1, reservation=r)) for i in items]
    await asyncio.sleep(0)
    runner.gate.set()
    await blocker
    return tasks


async def test_an_item_that_fails_its_batch_fails_alone_and_its_batch_mates_succeed() -> None:
    runner = FakeRunner(gated=True)
    runner.poison = 3
    batcher = make(runner, max_delay=0.0, max_batch_size=8)
    tasks = await start_gated_batch(runner, batcher, [1, 2, 3, 4, 5])
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r.value for r in results if isinstance(r, Outcome)] == [10.0, 20.0, 40.0, 50.0]
    [error] = [r for r in results if not isinstance(r, Outcome)]
    assert results.index(error) == 2
    assert isinstance(error, BackendError) and "probability tensor" in error.message
    assert runner.failed[0] == [1, 2, 3, 4, 5]  # the whole batch failed once
    assert runner.failed[-1] == [3]  # then only the item at fault
    assert sorted(runner.computed) == [-1, 1, 2, 4, 5]  # each other item computed once
    await batcher.close()


async def test_a_fatal_error_is_not_retried_in_halves() -> None:
    runner = FakeRunner(gated=True)
    seen: list[BaseException] = []
    batcher = make(runner, max_delay=0.0)
    batcher._on_fatal = seen.append
    runner.poison, runner.poison_error = 2, BackendError("device lost", fatal=True)
    tasks = await start_gated_batch(runner, batcher, [1, 2, 3])
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BackendError) and r.fatal for r in results)
    assert runner.failed == [[1, 2, 3]] and runner.computed == [-1] and len(seen) == 1
    await batcher.close()


async def test_a_batch_stopped_by_shutdown_is_not_retried_in_halves() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    runner.poison, runner.poison_error = 2, Unavailable("stopped mid-batch: shutting down")
    tasks = await start_gated_batch(runner, batcher, [1, 2, 3])
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert runner.failed == [[1, 2, 3]]
    await batcher.close()


async def test_fatal_backend_error_is_reported() -> None:
    runner = FakeRunner()
    runner.raise_once = BackendError("device lost", fatal=True)
    seen: list[BaseException] = []
    batcher = Batcher(
        runner,
        name="f",
        max_batch_size=2,
        max_batch_tokens=99,
        max_delay=0,
        max_queue=4,
        on_fatal=seen.append,
    )
    batcher.start()
    with pytest.raises(BackendError, match="device lost"):
        await submit_all(batcher, [1])
    assert len(seen) == 1
    await batcher.close()


async def test_wrong_result_count_is_a_backend_error() -> None:
    runner = FakeRunner(gated=True)
    runner.wrong_count = True
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(3)
    first = asyncio.create_task(batcher.submit(1, cost=1, reservation=r))
    await runner.entered.wait()
    rest = [asyncio.create_task(batcher.submit(i, cost=1, reservation=r)) for i in (2, 3)]
    await asyncio.sleep(0)
    runner.gate.set()
    await first  # a batch of one: one result is right
    for task in rest:
        with pytest.raises(BackendError, match="1 results for 2"):
            await task
    await batcher.close()


async def test_interactive_goes_ahead_of_queued_bulk() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_batch_size=2, max_delay=0.0)
    r = batcher.reserve(5)
    blocker = asyncio.create_task(batcher.submit(0, cost=1, reservation=r))
    await runner.entered.wait()
    bulk = [
        asyncio.create_task(batcher.submit(i, cost=1, reservation=r, priority=Priority.BULK))
        for i in (1, 2)
    ]
    urgent = [
        asyncio.create_task(batcher.submit(i, cost=1, reservation=r, priority=Priority.INTERACTIVE))
        for i in (3, 4)
    ]
    await asyncio.sleep(0)
    runner.gate.set()
    await asyncio.gather(blocker, *bulk, *urgent)
    assert runner.batches == [[0], [3, 4], [1, 2]]
    await batcher.close()


async def test_close_fails_queued_items_and_refuses_new_ones() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    r = batcher.reserve(2)
    running = asyncio.create_task(batcher.submit(1, cost=1, reservation=r))
    await runner.entered.wait()
    queued = asyncio.create_task(batcher.submit(2, cost=1, reservation=r))
    await asyncio.sleep(0)
    await batcher.close()
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        batcher.reserve(1)
    running.cancel()


async def test_after_a_full_batch_a_lone_item_waits_for_the_returning_callers() -> None:
    """Closed-loop load: the callers of the last batch are about to send again."""
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=60.0)
    r = batcher.reserve(3)
    first = [asyncio.create_task(batcher.submit(i, cost=1, reservation=r)) for i in (1, 2, 3)]
    await runner.entered.wait()
    runner.gate.set()
    await asyncio.gather(*first)
    assert runner.batches == [[1, 2, 3]]
    runner.gate.clear()
    runner.entered.clear()
    r = batcher.reserve(1)  # each caller admits its own next item, one at a time
    early = asyncio.create_task(batcher.submit(4, cost=1, reservation=r))
    await asyncio.sleep(0.05)
    assert runner.computed == [1, 2, 3]  # [4] waits: the last batch carried more than 1
    r = batcher.reserve(2)
    late = [asyncio.create_task(batcher.submit(i, cost=1, reservation=r)) for i in (5, 6)]
    await runner.entered.wait()
    runner.gate.set()
    await asyncio.gather(early, *late)
    assert runner.batches[-1] == [4, 5, 6]
    await batcher.close()


async def test_the_wait_for_returning_callers_is_bounded_by_max_delay() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_delay=0.05)
    assert await submit_all(batcher, [1, 2, 3]) == [10.0, 20.0, 30.0]
    started = time.monotonic()
    assert await submit_all(batcher, [4]) == [40.0]
    assert 0.04 <= time.monotonic() - started < 5.0
    await batcher.close()


def test_busy_seconds_counts_overlapping_batches_once_and_batch_mates_once() -> None:
    def outcome(started: float, seconds: float) -> Outcome[None]:
        return Outcome(None, started, 0.0, seconds)

    # Two batch-mates (one interval), a batch on another model overlapping it, a gap, one more.
    outcomes = [outcome(0.0, 2.0), outcome(0.0, 2.0), outcome(1.0, 2.0)]
    outcomes.append(outcome(5.0, 1.0))
    assert busy_seconds(outcomes) == pytest.approx(4.0)  # [0, 3] and [5, 6]; a sum says 7
    assert busy_seconds([]) == 0.0


async def test_waits_for_the_last_reserved_batch_mate() -> None:
    """One item of a two-item call is queued, one is still being prepared: the batch waits
    for it (a call's items run together), not only while two or more are on their way."""
    runner = FakeRunner()
    batcher = make(runner, max_delay=60.0)
    reservation = batcher.reserve(2)
    first = asyncio.create_task(batcher.submit(1, cost=1, reservation=reservation))
    await spin()
    assert runner.batches == []  # waiting for its batch-mate
    second = asyncio.create_task(batcher.submit(2, cost=1, reservation=reservation))
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert runner.batches == [[1, 2]]
    await batcher.close()


async def test_releasing_the_reservation_wakes_a_batch_already_waiting() -> None:
    """The loop is already waiting for a reserved batch-mate when the call gives that slot
    back (its item failed validation): the queued item runs at once, not after max_delay."""
    runner = FakeRunner()
    batcher = make(runner, max_delay=60.0)
    reservation = batcher.reserve(2)
    task = asyncio.create_task(batcher.submit(1, cost=1, reservation=reservation))
    await spin()
    assert runner.batches == []  # the loop waits (up to 60 s) for the second item
    reservation.release()
    assert (await asyncio.wait_for(task, 10)).value == 10.0
    await batcher.close()


async def test_a_batch_exactly_at_the_token_budget_runs_as_one() -> None:
    """max_batch_tokens is inclusive: two items of 50 padded tokens fit a budget of 100."""
    runner = FakeRunner()
    batcher = make(runner, max_batch_tokens=100, max_delay=1.0)
    reservation = batcher.reserve(2)
    tasks = [
        asyncio.create_task(batcher.submit(i, cost=50, reservation=reservation)) for i in (1, 2)
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert runner.batches == [[1, 2]]
    await batcher.close()


async def test_queue_seconds_end_when_the_batch_starts() -> None:
    """Outcome.queue_seconds (reported as Timing.queue_seconds) is the wait before the
    batch started; the batch's own run is compute_seconds, not counted twice."""
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    before = time.monotonic()
    task = asyncio.create_task(batcher.submit(3, cost=1, reservation=batcher.reserve(1)))
    await runner.entered.wait()
    await asyncio.sleep(0.2)  # the batch runs (compute) for at least 0.2 s
    runner.gate.set()
    outcome = await task
    assert outcome.compute_seconds >= 0.2
    assert outcome.queue_seconds <= outcome.started - before
    await batcher.close()


async def test_an_item_whose_deadline_passes_in_the_queue_counts_as_expired() -> None:
    runner = FakeRunner(gated=True)
    batcher = make(runner, max_delay=0.0)
    before = metric("align2_items_rejected_total", reason="expired")
    busy = asyncio.create_task(batcher.submit(1, cost=1, reservation=batcher.reserve(1)))
    await runner.entered.wait()  # the device is busy with item 1
    late = batcher.submit(
        2, cost=1, reservation=batcher.reserve(1), deadline=time.monotonic() + 0.05
    )
    with pytest.raises(DeadlineExpired):
        await asyncio.wait_for(late, 10)
    assert metric("align2_items_rejected_total", reason="expired") == before + 1
    runner.gate.set()
    await busy
    await batcher.close()


async def test_a_reservation_gives_back_at_most_what_it_holds() -> None:
    """release(count) beyond the slots left gives back only those: the queue's load never
    drops below what is really admitted (else it admits past max_queue_items)."""
    runner = FakeRunner()
    batcher = make(runner, max_queue=4)
    reservation = batcher.reserve(2)
    held = batcher.reserve(2)
    reservation.release(5)
    assert (reservation.remaining, batcher.load) == (0, 2)
    held.release()
    assert batcher.load == 0
    await batcher.close()
