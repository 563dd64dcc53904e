"""The calls a drain waits for (transport/inflight.py)."""

from __future__ import annotations

import asyncio

from align2.server.transport.inflight import InFlightCalls


async def test_shutdown_stops_waiting_as_soon_as_the_last_call_ends() -> None:
    """wait_idle (the grace period of a drain) returns when the last running call leaves,
    not at the end of the grace period."""
    calls = InFlightCalls()
    release = asyncio.Event()

    async def call() -> None:
        task = calls.enter()
        try:
            await release.wait()
        finally:
            calls.leave(task)

    running = asyncio.ensure_future(call())
    await asyncio.sleep(0)
    assert len(calls) == 1
    waiting = asyncio.ensure_future(calls.wait_idle(60))
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.wait_for(waiting, 10) is True
    await running
