"""When a call refused by a full queue should come back (the retry delay of its refusal).

gRPC's client waits exactly the delay a server pushes back (``grpc-retry-pushback-ms``,
gRFC A6), without jitter: telling every refused caller the same "try again in 100 ms" makes
them all come back at once, to the same full queue. So each refusal gets its own turn. The
queue drains at the device's pace: ``seconds_per_item``, the recent compute time of a batch
divided by its size. A call of ``count`` items that finds ``load`` of ``capacity`` taken
has room once ``load + count - capacity`` items have finished; the callers refused before
it, which have been told to come back, are served first: each turn starts where the one
before it ends (``count`` items later). The delay is bounded: at least ``floor`` (a shorter
gRPC retry timer can race the failed attempt, grpc/grpc#41036), at most ``ceiling``, and
turns are never promised further ahead than that. A call whose turn would come after its
deadline is promised none: it is told not to retry, since it could only time out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from align2.server.errors import OVERLOADED_RETRY_SECONDS, NoTurnBeforeDeadline, Overloaded

MIN_RETRY_SECONDS = 0.02
"""The shortest delay asked for."""
MAX_RETRY_SECONDS = 5.0
"""The longest delay asked for; a burst that would take longer to serve is re-queued then."""


class DrainEstimate:
    """The retry delay of each refusal of one queue (see the module doc).

    ``observe`` after each batch; ``retry_after`` at each refusal (it promises that caller
    a turn). Before any batch has run: :data:`OVERLOADED_RETRY_SECONDS`."""

    def __init__(
        self,
        *,
        smoothing: float = 0.2,
        floor: float = MIN_RETRY_SECONDS,
        ceiling: float = MAX_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.smoothing = smoothing
        self.floor = floor
        self.ceiling = ceiling
        self._clock = clock
        self.seconds_per_item: float | None = None
        self._turns_end = 0.0  # when the last promised turn ends (clock time)

    def observe(self, items: int, seconds: float) -> None:
        """A batch of ``items`` took ``seconds`` of compute."""
        if items < 1 or seconds < 0:
            return
        per_item = seconds / items
        previous = self.seconds_per_item
        self.seconds_per_item = (
            per_item if previous is None else previous + self.smoothing * (per_item - previous)
        )

    def drain_seconds(self, load: int, count: int, capacity: int) -> float | None:
        """How long until ``count`` more items fit a queue holding ``load`` of ``capacity``,
        at the recent pace (None: no batch observed yet)."""
        if self.seconds_per_item is None:
            return None
        return max(0, load + count - capacity) * self.seconds_per_item

    def retry_after(
        self, load: int, count: int, capacity: int, deadline: float | None = None
    ) -> float | None:
        """The delay for a refused call of ``count`` items, promising it the next turn; None
        when that turn would start after ``deadline`` (a clock instant), and then no turn is
        promised."""
        drain = self.drain_seconds(load, count, capacity)
        if drain is None or self.seconds_per_item is None:
            return OVERLOADED_RETRY_SECONDS
        now = self._clock()
        start = max(now + drain, self._turns_end)
        delay = min(max(start - now, self.floor), self.ceiling)
        if deadline is not None and now + delay >= deadline:
            return None
        self._turns_end = min(start + count * self.seconds_per_item, now + self.ceiling)
        return delay

    def refusal(
        self, full: str, load: int, count: int, capacity: int, deadline: float | None
    ) -> Overloaded:
        """The error refusing a call of ``count`` items (``full`` says what is full): its
        turn (:meth:`retry_after`), or NoTurnBeforeDeadline."""
        delay = self.retry_after(load, count, capacity, deadline)
        if delay is None:
            return NoTurnBeforeDeadline(
                f"{full}; at the present pace its turn would come after its deadline"
            )
        return Overloaded(f"{full}; retry with backoff", retry_after=delay)
