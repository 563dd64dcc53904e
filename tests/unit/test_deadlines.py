"""core/deadlines.py: the one way the core waits for a deadline and reports missing it."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import metric

from align2.server.core import deadlines
from align2.server.errors import DeadlineExpired


def expired_count() -> float:
    return metric("align2_items_rejected_total", reason="expired")


async def test_a_missed_deadline_cancels_the_body_counts_and_says_where() -> None:
    before = expired_count()
    body_cancelled = False

    async def body() -> None:
        nonlocal body_cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            body_cancelled = True
            raise

    with pytest.raises(DeadlineExpired, match=r"^deadline exceeded while testing$"):
        async with deadlines.within(time.monotonic() + 0.05, "while testing"):
            await body()
    assert body_cancelled
    assert expired_count() == before + 1


async def test_no_deadline_and_a_met_deadline_leave_the_body_alone() -> None:
    before = expired_count()
    async with deadlines.within(None, "unused"):
        await asyncio.sleep(0.01)
    async with deadlines.within(time.monotonic() + 10, "unused"):
        await asyncio.sleep(0.01)
    assert expired_count() == before


async def test_a_deadline_already_past_expires_at_the_first_await() -> None:
    with pytest.raises(DeadlineExpired):
        async with deadlines.within(time.monotonic() - 1, "late"):
            await asyncio.sleep(0)


async def test_the_bodys_own_timeout_error_is_not_the_deadlines() -> None:
    """A TimeoutError raised inside the body (a backend's, say) is not reported as this
    request's deadline, nor counted as expired."""
    before = expired_count()
    with pytest.raises(TimeoutError) as raised:
        async with deadlines.within(time.monotonic() + 10, "unused"):
            raise TimeoutError("the backend's own")
    assert not isinstance(raised.value, DeadlineExpired)
    assert str(raised.value) == "the backend's own"
    assert expired_count() == before


async def test_a_callable_where_is_read_when_the_deadline_is_missed() -> None:
    state = {"held": 1}
    calls = 0

    def where() -> str:
        nonlocal calls
        calls += 1
        return f"while {state['held']} held"

    async with deadlines.within(time.monotonic() + 10, where):
        await asyncio.sleep(0)
    assert calls == 0  # a met deadline never builds the message
    with pytest.raises(DeadlineExpired, match="while 2 held"):
        async with deadlines.within(time.monotonic() + 0.02, where):
            state["held"] = 2
            await asyncio.sleep(10)


def test_check_and_passed() -> None:
    now = time.monotonic()
    assert not deadlines.passed(None)
    assert not deadlines.passed(now + 10)
    assert deadlines.passed(now - 1)
    assert deadlines.passed(now, now)  # due is past: nothing can start at its deadline
    deadlines.check(None, "unused")
    before = expired_count()
    with pytest.raises(DeadlineExpired, match="before it started"):
        deadlines.check(now - 1, "before it started")
    assert expired_count() == before + 1
