"""A request's deadline inside the core: one way to wait for it and one way to miss it.

A deadline is a ``time.monotonic()`` instant, or None for none. Missing it counts
``align2_items_rejected_total{reason="expired"}`` and raises DeadlineExpired, whose message
says where the time ran out, so every wait that honours a deadline reports it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from align2.server import metrics
from align2.server.errors import DeadlineExpired


def expired(where: str) -> DeadlineExpired:
    """Count one expired item; the error to raise or hand to its future."""
    metrics.REJECTED.labels(reason="expired").inc()
    return DeadlineExpired(f"deadline exceeded {where}")


def passed(deadline: float | None, now: float | None = None) -> bool:
    """Whether the deadline is already behind us."""
    return deadline is not None and deadline <= (time.monotonic() if now is None else now)


def check(deadline: float | None, where: str) -> None:
    """Raise DeadlineExpired if the deadline has already passed."""
    if passed(deadline):
        raise expired(where)


@contextlib.asynccontextmanager
async def within(deadline: float | None, where: str | Callable[[], str]) -> AsyncIterator[None]:
    """Run the body until the deadline; past it the body is cancelled and DeadlineExpired
    raised. ``where`` may be a callable, read only when the deadline is missed (to report the
    state at that moment)."""
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    timer = asyncio.timeout(left)
    try:
        async with timer:
            yield
    except TimeoutError:
        if not timer.expired():  # the body's own TimeoutError is not the deadline's
            raise
        raise expired(where if isinstance(where, str) else where()) from None
