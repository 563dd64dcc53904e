"""Admission by request bytes: the bytes of the calls admitted and not finished are bounded.

The model queues bound forward passes, not memory: twenty calls of 48 MB of images each
were all held (their request, its parsed copy, the samples built from it) while five of
them ran. A ``ByteBudget`` claims a call's request bytes before any of its work starts and
gives them back when the call ends; a call that does not fit is refused at once with
Overloaded (RESOURCE_EXHAUSTED), so the request bytes held by admitted calls never exceed
``limits.max_inflight_bytes``.

A Curate stream claims each sample's bytes from the same budget with
:meth:`ByteBudget.claim_when_free`: instead of a refusal it waits its turn (first come,
first served), and the stream reads no further meanwhile, so gRPC's flow control slows its
producer. While a stream waits, unary calls are refused rather than served ahead of it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from prometheus_client import Gauge

from align2.server import metrics
from align2.server.errors import Overloaded


class ByteClaim:
    """Bytes claimed by one call; ``release`` (or leaving the ``with`` block) gives them
    back, once."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def release(self) -> None:
        if self.nbytes:
            self._budget._give_back(self.nbytes)
            self.nbytes = 0

    def __enter__(self) -> ByteClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ByteBudget:
    """At most ``limit`` request bytes claimed at once (0: no limit, only counted).

    Every call fits when nothing else is in flight only if ``limit`` is at least the largest
    message the server accepts: the config check (``limits.max_inflight_bytes`` at least
    ``limits.max_message_bytes``) guarantees it.

    ``on_drained(nbytes)`` is called each time the bytes in flight fall to zero, with the
    bytes given back since the previous time: the end of a burst (the app then hands freed
    memory back to the OS, align2.server.memory). ``gauge`` shows the bytes in flight.

    The Scorer bounds decoded images with a budget of its own, the same way
    (limits.max_decoded_image_bytes)."""

    def __init__(
        self,
        limit: int,
        on_drained: Callable[[int], None] | None = None,
        gauge: Gauge = metrics.INFLIGHT_REQUEST_BYTES,
    ) -> None:
        self.limit = limit
        self.in_flight = 0
        self._on_drained = on_drained
        self._released = 0
        self._gauge = gauge
        self._waiters: collections.deque[tuple[int, asyncio.Future[ByteClaim]]] = (
            collections.deque()
        )

    def fits(self, nbytes: int) -> bool:
        """Whether a claim of ``nbytes`` would be granted now (never while others wait)."""
        return not self.limit or (not self._waiters and self.in_flight + nbytes <= self.limit)

    def claim(self, nbytes: int) -> ByteClaim:
        """Claim ``nbytes``, or raise Overloaded naming the limit without claiming any."""
        if not self.fits(nbytes):
            raise self.refusal(nbytes)
        return self._take(nbytes)

    async def claim_when_free(
        self, nbytes: int, on_wait: Callable[[], None] | None = None
    ) -> ByteClaim:
        """Claim ``nbytes``, waiting behind earlier waiters until they fit (``on_wait`` is
        called once it waits). A claim larger than the limit waits until nothing else is in
        flight. Cancelled: nothing claimed."""
        if not self._waiters and self._has_room(nbytes):
            return self._take(nbytes)
        waiter = (nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        if on_wait is not None:
            on_wait()
        try:
            return await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():
                waiter[1].result().release()  # granted as the wait was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._wake()  # the next one may fit now
            raise

    @property
    def waiting(self) -> int:
        """Claims waiting for room."""
        return len(self._waiters)

    def _has_room(self, nbytes: int) -> bool:
        """Room for a waiting claim: it fits, or nothing else is in flight (a claim larger
        than the limit then goes alone rather than wait forever)."""
        return not self.limit or not self.in_flight or self.in_flight + nbytes <= self.limit

    def _take(self, nbytes: int) -> ByteClaim:
        self.in_flight += nbytes
        self._gauge.set(self.in_flight)
        return ByteClaim(self, nbytes)

    def _wake(self) -> None:
        """Grant the waiting claims that fit now, in order."""
        while self._waiters:
            nbytes, future = self._waiters[0]
            if not self._has_room(nbytes):
                return
            self._waiters.popleft()
            if not future.done():
                future.set_result(self._take(nbytes))

    def refusal(self, nbytes: int) -> Overloaded:
        """The error for a request of ``nbytes`` that does not fit now."""
        return Overloaded(
            f"the request's {nbytes} bytes do not fit: {self.in_flight} bytes of admitted "
            f"requests are in flight, limits.max_inflight_bytes {self.limit}; retry with "
            f"backoff",
            field=None,
        )

    def _give_back(self, nbytes: int) -> None:
        self.in_flight -= nbytes
        self._released += nbytes
        self._gauge.set(self.in_flight)
        self._wake()
        if not self.in_flight and self._on_drained is not None:
            released, self._released = self._released, 0
            self._on_drained(released)
