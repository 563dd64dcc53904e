"""The request-bytes budget: claims, refusals that name the limit, release, the config check."""

from __future__ import annotations

import asyncio

import pytest
from support import spin

from align2.server.config import Config
from align2.server.core.budget import ByteBudget
from align2.server.errors import ConfigError, Overloaded


def test_claims_up_to_the_limit_and_releases_once() -> None:
    budget = ByteBudget(100)
    first = budget.claim(60)
    refusal = r"41 bytes do not fit: 60 bytes .* limits\.max_inflight_bytes 100"
    with pytest.raises(Overloaded, match=refusal):
        budget.claim(41)
    assert budget.in_flight == 60  # a refusal claims nothing
    with budget.claim(40):
        assert budget.in_flight == 100 and not budget.fits(1)
    first.release()
    first.release()
    assert budget.in_flight == 0 and budget.fits(100)


def test_a_refusal_asks_for_a_retry() -> None:
    assert ByteBudget(1).refusal(2).retry_after is not None


def test_zero_is_unbounded_but_still_counted() -> None:
    budget = ByteBudget(0)
    with budget.claim(1 << 40):
        assert budget.in_flight == 1 << 40 and budget.fits(1 << 40)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, r"limits\.max_inflight_bytes: must be >= 0"),
        (1000, r"limits\.max_inflight_bytes: 1000 is less than limits\.max_message_bytes"),
    ],
)
def test_config_refuses_a_budget_a_lone_call_cannot_fit(value: int, message: str) -> None:
    config = Config()
    config.limits.max_inflight_bytes = value
    with pytest.raises(ConfigError, match=message):
        config.validate()
    config.limits.max_inflight_bytes = 0
    config.validate()


def test_reports_each_drain_with_the_bytes_since_the_last() -> None:
    drains: list[int] = []
    budget = ByteBudget(100, on_drained=drains.append)
    first, second = budget.claim(30), budget.claim(20)
    first.release()
    assert drains == []  # 20 bytes still in flight
    second.release()
    budget.claim(5).release()
    assert drains == [50, 5]


async def test_waiting_claims_are_granted_in_order_and_a_cancelled_one_claims_nothing() -> None:
    """A stream's claim waits instead of failing; waiters go first come, first served (a
    big claim is not overtaken by small ones), a cancelled waiter leaves nothing claimed,
    and one larger than the limit is granted once nothing else is in flight. Fails on: a
    waiter woken out of order, or a cancelled waiter's bytes left claimed."""
    budget = ByteBudget(100)
    held = budget.claim(90)
    big = asyncio.ensure_future(budget.claim_when_free(60))
    cancelled = asyncio.ensure_future(budget.claim_when_free(5))
    small = asyncio.ensure_future(budget.claim_when_free(5))
    await spin()
    assert budget.waiting == 3 and not any(t.done() for t in (big, small))
    assert not budget.fits(5)  # 10 bytes are free, but claims wait: none overtakes them
    cancelled.cancel()
    await spin()
    assert budget.waiting == 2 and budget.in_flight == 90
    held.release()
    await spin()
    assert big.done() and small.done() and budget.in_flight == 65
    big.result().release()
    small.result().release()
    huge = budget.claim(10)
    too_big = asyncio.ensure_future(budget.claim_when_free(150))
    await spin()
    assert not too_big.done()
    huge.release()
    await spin()
    assert budget.in_flight == 150  # alone, it may exceed the limit rather than wait forever
    too_big.result().release()
    assert budget.in_flight == 0 and budget.waiting == 0
    # ... and at once when nothing is in flight (Fails on: waiting for a release never due)
    alone = await asyncio.wait_for(budget.claim_when_free(150), timeout=5)
    assert budget.in_flight == 150 and budget.waiting == 0
    alone.release()
