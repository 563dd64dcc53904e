"""The blocking client's Curate call: its streams in turn, a new one after each resumable
failure. The twin of :mod:`align2.client.aio_curate`; the bookkeeping (sequence numbers,
what to send again, when to resume) is :class:`~align2.client.curate.CurateStream`'s, and
gRPC draws each stream's requests in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from align2.client.curate import CurateStream
from align2.client.health import HEALTH_CHECK_SECONDS, NOT_SERVING_POLL_SECONDS, SERVING
from align2.client.results import CurateResult
from align2.client.resume import status_of
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb

OpenStream = Callable[[Iterator[pb.CurateRequest], float | None], Any]


class CurateCall:
    """One ``curate`` call. ``open_stream(requests, timeout)`` starts a Curate stream (its
    responses, iterable and cancellable); ``check_health(timeout)`` a health check (a
    cancellable future) that waits for a connection; ``timeout``: the whole call's deadline
    in seconds. :meth:`cancel` ends it (during a resume too: the failure it resumed from is
    raised)."""

    def __init__(
        self,
        open_stream: OpenStream,
        check_health: Callable[[float], Any],
        stream: CurateStream,
        samples: Iterable[Sample],
        timeout: float | None,
    ) -> None:
        self._open = open_stream
        self._check_health = check_health
        self._stream = stream
        self._samples = iter(samples)  # one iterator drawn by every stream in turn
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._responses: Any = None  # the current stream's call
        self._check: Any = None  # the health check of a resume
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._stream.cancelled = True
        self._cancelled.set()
        for pending in (self._responses, self._check):
            if pending is not None:
                pending.cancel()

    def results(self) -> Iterator[CurateResult]:
        """The decisions as they arrive, each after the local failures queued before it; the
        producer's error, if any, after the last decision."""
        stream = self._stream
        try:
            while True:
                self._responses = self._open(stream.requests(self._samples), self._time_left())
                try:
                    for response in self._responses:
                        yield from stream.answer(response)
                    yield from stream.finish()
                    break
                except grpc.RpcError as error:
                    yield from stream.local_results()  # they failed here, before the stream
                    if not self._wait_to_resume(error):
                        raise
                stream.restart()
        finally:
            if self._responses is not None:
                self._responses.cancel()  # a consumer that stops early ends the stream
        if stream.producer_error is not None:  # after every accepted sample's decision
            raise stream.producer_error

    def _wait_to_resume(self, error: grpc.RpcError) -> bool:
        """Back off, then wait until the server says SERVING; False when the call fails."""
        plan = self._stream.next_try(*status_of(error), self._time_left())
        if plan is None:
            return False
        backoff, limit = plan
        if self._cancelled.wait(backoff):
            return False
        return self._wait_for_serving(limit)

    def _wait_for_serving(self, limit: float) -> bool:
        """True once a health check says SERVING (or the server has no health service: the
        next stream will tell), False when ``limit`` seconds pass or the call is cancelled.
        Each check waits for a connection; while the answer is NOT_SERVING it is asked
        again, and through a balanced channel another replica may answer."""
        end = time.monotonic() + limit
        while not self._cancelled.is_set() and (left := end - time.monotonic()) > 0:
            self._check = self._check_health(min(left, HEALTH_CHECK_SECONDS))
            try:
                if self._check.result().status == SERVING:
                    return True
            except grpc.FutureCancelledError:
                return False  # cancel()
            except grpc.RpcError as failure:
                code = failure.code()
                if code == grpc.StatusCode.CANCELLED:
                    return False
                if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    return True  # no health service, or no access to it: try the stream
            finally:
                self._check = None
            self._cancelled.wait(min(NOT_SERVING_POLL_SECONDS, max(end - time.monotonic(), 0)))
        return False

    def _time_left(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()
