"""The align2 RPCs being handled, so that shutdown can wait for them and, at its deadline,
end them with an answer.

StatusInterceptor registers each call's task while it runs. At the end of the grace period
the app calls ``end_all(reason)``: every call still running is cancelled, and
StatusInterceptor answers it UNAVAILABLE with ``reason`` (instead of grpc cancelling it
with a bare "Cancelling all calls" once the port closes).
"""

from __future__ import annotations

import asyncio


class InFlightCalls:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._ended: set[asyncio.Task[object]] = set()
        self._reason = ""
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    def enter(self) -> asyncio.Task[object] | None:
        """Register the running call's task (returned, for ``leave``)."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        self._tasks.discard(task)
        self._ended.discard(task)
        if not self._tasks and self._idle is not None:
            self._idle.set()

    def ended_by_shutdown(self, task: asyncio.Task[object] | None) -> str | None:
        """Why ``end_all`` cancelled ``task``; None when something else cancelled it."""
        return self._reason if task in self._ended else None

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until no call runs, at most ``seconds``; whether none runs."""
        if not self._tasks:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._idle.wait()
        except TimeoutError:
            return not self._tasks
        return True

    def end_all(self, reason: str) -> int:
        """Cancel every call still running, to be answered UNAVAILABLE ``reason``."""
        self._reason = reason
        for task in self._tasks - self._ended:
            self._ended.add(task)
            task.cancel()
        return len(self._ended)
