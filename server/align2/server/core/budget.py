"""Admission by request bytes: the bytes of the calls admitted and not finished are bounded.

The model queues bound forward passes, not memory: twenty calls of 48 MB of images each
were all held (their request, its parsed copy, the samples built from it) while five of
them ran. A ``ByteBudget`` claims a call's request bytes before any of its work starts and
gives them back when the call ends; a call that does not fit is refused at once with
Overloaded (RESOURCE_EXHAUSTED), so the request bytes held by admitted calls never exceed
``limits.max_inflight_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable

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
    memory back to the OS, align2.server.memory)."""

    def __init__(self, limit: int, on_drained: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self._on_drained = on_drained
        self._released = 0
        self._gauge = metrics.INFLIGHT_REQUEST_BYTES

    def fits(self, nbytes: int) -> bool:
        return not self.limit or self.in_flight + nbytes <= self.limit

    def claim(self, nbytes: int) -> ByteClaim:
        """Claim ``nbytes``, or raise Overloaded naming the limit without claiming any."""
        if not self.fits(nbytes):
            raise self.refusal(nbytes)
        self.in_flight += nbytes
        self._gauge.set(self.in_flight)
        return ByteClaim(self, nbytes)

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
        if not self.in_flight and self._on_drained is not None:
            released, self._released = self._released, 0
            self._on_drained(released)
