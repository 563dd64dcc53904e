"""The retry delay of a full queue's refusals: the drain-time estimate and the turns it
promises (core/drain.py)."""

from __future__ import annotations

import pytest

from align2.server.core.drain import MAX_RETRY_SECONDS, MIN_RETRY_SECONDS, DrainEstimate
from align2.server.errors import OVERLOADED_RETRY_SECONDS


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def estimate(seconds_per_item: float = 0.01) -> tuple[DrainEstimate, Clock]:
    clock = Clock()
    made = DrainEstimate(clock=clock)
    made.observe(8, 8 * seconds_per_item)  # a batch of 8 items
    return made, clock


def test_nothing_observed_asks_for_the_default() -> None:
    made = DrainEstimate()
    assert made.drain_seconds(16, 2, 16) is None
    assert made.retry_after(16, 2, 16) == OVERLOADED_RETRY_SECONDS


def test_per_item_time_is_batch_time_over_batch_size_smoothed() -> None:
    made = DrainEstimate(smoothing=0.5)
    made.observe(4, 0.2)
    assert made.seconds_per_item == pytest.approx(0.05)
    made.observe(10, 0.1)  # 0.01 per item: halfway there
    assert made.seconds_per_item == pytest.approx(0.03)
    made.observe(0, 1.0)  # no items: ignored
    assert made.seconds_per_item == pytest.approx(0.03)


def test_drain_time_is_the_items_that_must_finish_first_times_the_per_item_time() -> None:
    made, _ = estimate(0.01)
    assert made.drain_seconds(load=16, count=2, capacity=16) == pytest.approx(0.02)
    assert made.drain_seconds(load=20, count=4, capacity=16) == pytest.approx(0.08)
    assert made.drain_seconds(load=3, count=2, capacity=16) == 0


def test_each_refusal_gets_the_turn_after_the_previous_ones() -> None:
    made, clock = estimate(0.01)
    first = made.retry_after(16, 2, 16)
    second = made.retry_after(16, 2, 16)
    third = made.retry_after(16, 4, 16)
    assert (first, second, third) == pytest.approx((0.02, 0.04, 0.06))
    clock.now += 0.05  # time passes: the turns promised so far are 0.01 s from ending
    assert made.retry_after(16, 2, 16) == pytest.approx(0.05)


def test_turns_end_when_time_catches_up() -> None:
    made, clock = estimate(0.01)
    for _ in range(10):
        made.retry_after(16, 2, 16)
    clock.now += 10
    assert made.retry_after(16, 2, 16) == pytest.approx(0.02)


def test_the_delay_is_bounded() -> None:
    made, _ = estimate(0.0001)
    assert made.retry_after(16, 1, 16) == MIN_RETRY_SECONDS
    slow, _ = estimate(1.0)
    delays = [slow.retry_after(16, 2, 16) for _ in range(5)]
    assert delays == [2.0, 4.0, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS]


def test_no_turn_before_the_deadline_promises_none() -> None:
    made, clock = estimate(0.01)
    assert made.retry_after(16, 2, 16, deadline=clock.now + 0.015) is None
    # ... and takes no turn: the next caller gets the first one.
    assert made.retry_after(16, 2, 16, deadline=clock.now + 1) == pytest.approx(0.02)


def test_turns_are_never_promised_beyond_the_ceiling() -> None:
    """A burst promised turns far ahead: each is told the ceiling (5 s), and no turn is
    booked past it, so once the ceiling has passed a refusal gets the real drain time
    again, not the tail of the burst's (unbounded) bookings."""
    made, clock = estimate(1.0)  # 1 s per item
    delays = [made.retry_after(16, 4, 16) for _ in range(20)]  # 80 items' worth of turns
    assert delays[-1] == MAX_RETRY_SECONDS
    clock.now += MAX_RETRY_SECONDS + 0.5
    assert made.retry_after(16, 2, 16) == pytest.approx(2.0)
