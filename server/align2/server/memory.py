"""Handing freed heap memory back to the operating system after a burst (glibc).

Python, protobuf and PIL allocate a large request's buffers with malloc. glibc serves
blocks above its mmap threshold with mmap and unmaps them when freed, but the threshold
rises to the largest block freed so far (up to 32 MiB), so after the first burst the
megabyte-sized image buffers come from the heap arenas, and freeing them does not shrink
the process: measured (docs/operating.md, "Memory"), seven bursts of 48 MB calls left the
server 900 MB above its idle size for good. ``malloc_trim(0)`` releases the free pages of
every arena. It takes the arenas' locks while it runs, so it runs only once the admitted
request bytes have drained and nothing new has come for ``idle_seconds``, in a worker
thread. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_RELEASED_BYTES = 64 * MiB
"""Trim only after at least this many request bytes passed through since the last trim:
smaller bursts leave little to give back, and a trim has its cost (arena locks)."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    try:
        function: Callable[[int], int] | None = (
            getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        )
    except OSError:
        return None
    return function


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), or None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` ``idle_seconds`` after a burst ends (see the module doc).

    ``drained(nbytes)``: the request bytes in flight fell to zero, ``nbytes`` having passed
    since the previous drain; ``is_idle()``: whether still nothing runs when the delay is
    over (else the next drain schedules it again). ``idle_seconds`` < 0: never."""

    def __init__(self, idle_seconds: float, is_idle: Callable[[], bool]) -> None:
        self.idle_seconds = idle_seconds
        self._is_idle = is_idle
        self._trim = _malloc_trim() if idle_seconds >= 0 else None
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[Any] | None = None

    def drained(self, nbytes: int) -> None:
        if self._trim is None:
            return
        self._pending += nbytes
        if self._pending < MIN_RELEASED_BYTES:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.idle_seconds, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self._is_idle() or (self._running is not None and not self._running.done()):
            return
        self._pending = 0
        self._running = asyncio.get_running_loop().run_in_executor(None, self._run)

    def _run(self) -> None:
        assert self._trim is not None
        before, started = rss_bytes(), time.monotonic()
        self._trim(0)
        after = rss_bytes()
        log.info(
            "returned freed heap memory to the OS (malloc_trim): RSS %s -> %s MB in %.0f ms",
            None if before is None else before // 1_000_000,
            None if after is None else after // 1_000_000,
            (time.monotonic() - started) * 1000,
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
