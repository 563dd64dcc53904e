"""The asyncio client's Curate call: the twin of the sync client's, on ``grpc.aio``.

Per stream, a writer task sends the options, the samples to send again, then each sample as
the caller's iterable produces it (images read in a worker thread), while the caller
iterates the decisions. The bookkeeping (sequence numbers, what to send again, when to
resume) is :class:`~align2.client.curate.CurateStream`'s; here only the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from align2.client.curate import CurateStream, Sent
from align2.client.health import HEALTH_CHECK_SECONDS, NOT_SERVING_POLL_SECONDS, SERVING
from align2.client.results import CurateResult
from align2.client.resume import status_of
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb


class AsyncCurateCall:
    """One ``curate`` call: its streams in turn (a new one after each resumable failure).
    :meth:`cancel` ends it; iterating then raises CANCELLED as ``grpc.RpcError``, as the
    sync client does.

    ``open_stream(timeout)`` starts a Curate stream-stream call; ``check_health(timeout)``
    an awaitable health check that waits for a connection;
    ``timeout``: the whole call's deadline in seconds."""

    def __init__(
        self,
        open_stream: Callable[[float | None], Any],
        check_health: Callable[[float], Any],
        stream: CurateStream,
        timeout: float | None,
    ) -> None:
        self._open = open_stream
        self._check_health = check_health
        self._stream = stream
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._call: Any = None
        self._waiting: asyncio.Future[bool] | None = None  # the wait before a resume
        self._cancelled = False  # by cancel(), not by our caller's task being cancelled

    def cancel(self) -> None:
        self._cancelled = True
        self._stream.cancelled = True
        for pending in (self._call, self._waiting):
            if pending is not None:
                pending.cancel()

    async def results(
        self, samples: Iterable[Sample] | AsyncIterable[Sample]
    ) -> AsyncIterator[CurateResult]:
        """The decisions as they arrive, each after the local failures queued before it; the
        producer's error, if any, after the last decision."""
        stream = self._stream
        producer = _Producer(stream, samples)
        try:
            while True:
                call = self._call = self._open(self._time_left())
                writer = asyncio.ensure_future(self._write(call, producer, stream.streams))
                try:
                    async for response in call:
                        for result in stream.answer(response):
                            yield result
                    await writer
                    for result in stream.finish():
                        yield result
                    break
                except asyncio.CancelledError:
                    if not self._cancelled or _task_cancelling():
                        raise  # our caller is being cancelled: let it
                    # grpc.aio reports a local cancel() as CancelledError; callers get what
                    # the sync client raises
                    raise _cancelled_error() from None
                except grpc.RpcError as error:
                    for result in stream.local_results():
                        yield result  # they failed here, before the stream did
                    if not await self._wait_to_resume(error):
                        raise
                finally:
                    writer.cancel()
                    call.cancel()
                stream.restart()
        finally:
            producer.close()
        if stream.producer_error is not None:  # after every accepted sample's decision
            raise stream.producer_error

    async def _write(self, call: Any, producer: _Producer, number: int) -> None:
        stream = self._stream
        if not await _send(call, pb.CurateRequest(options=stream.options)):
            return
        while True:
            request = stream.queued(number)
            if request is None:
                if stream.exhausted or number != stream.streams:
                    break
                sent = await producer.next()
                if sent is None:
                    continue  # an unreadable image, or the end: checked above
                request = stream.send(number, sent)
                if request is None:
                    break  # a later stream sends it
            if not await _send(call, request):
                return
        await call.done_writing()

    async def _wait_to_resume(self, error: grpc.RpcError) -> bool:
        """Back off, then wait until the server says SERVING; False when the call fails."""
        plan = self._stream.next_try(*status_of(error), self._time_left())
        if plan is None:
            return False
        self._waiting = asyncio.ensure_future(self._wait_for_serving(*plan))
        try:
            return await self._waiting
        except asyncio.CancelledError:
            if not self._cancelled or _task_cancelling():
                raise
            raise _cancelled_error() from None
        finally:
            self._waiting = None

    async def _wait_for_serving(self, backoff: float, limit: float) -> bool:
        """After ``backoff`` seconds, as the sync twin's: True once a health check says
        SERVING (or there is no health service), False when ``limit`` seconds pass."""
        await asyncio.sleep(backoff)
        end = time.monotonic() + limit
        while (left := end - time.monotonic()) > 0:
            try:
                reply = await self._check_health(min(left, HEALTH_CHECK_SECONDS))
                if reply.status == SERVING:
                    return True
            except grpc.RpcError as failure:
                if failure.code() not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    return True  # no health service, or no access to it: try the stream
            await asyncio.sleep(min(NOT_SERVING_POLL_SECONDS, max(end - time.monotonic(), 0)))
        return False

    def _time_left(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()


async def _send(call: Any, request: pb.CurateRequest) -> bool:
    """Write ``request``; False when the server has already ended the call. grpc.aio then
    fails the write with its own error (INTERNAL, "Failed execute_batch"), which would hide
    the call's status (e.g. RESOURCE_EXHAUSTED for a refused stream): the reader gets that
    status instead, and samples written to no one are sent again on a resumed stream.
    (grpc.aio then also overwrites the call's status with that INTERNAL: align2 servers
    read what a client still sends before a failing stream's status goes out, so that the
    write completes; see the Curate rpc in the proto.)"""
    try:
        await call.write(request)
    except (grpc.RpcError, asyncio.InvalidStateError):
        # The write may fail before the call's status has arrived: wait for it.
        if await call.code() != grpc.StatusCode.OK:
            return False
        raise
    return True


class _Producer:
    """The caller's samples, drawn one at a time and encoded in a worker thread. A draw
    outlives the writer that started it: a writer cancelled when its stream fails must not
    cancel the caller's generator, and the sample it was drawing goes to the next stream."""

    def __init__(
        self, stream: CurateStream, samples: Iterable[Sample] | AsyncIterable[Sample]
    ) -> None:
        self._stream = stream
        self._samples = _aiter(samples)
        self._pending: asyncio.Future[Sent | None] | None = None

    async def next(self) -> Sent | None:
        """The next sample to send; None for one whose image can't be read (its local
        result is queued) and at the end (then ``stream.exhausted`` is set)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._draw())
        sent = await asyncio.shield(self._pending)
        self._pending = None
        return sent

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()

    async def _draw(self) -> Sent | None:
        """When the producer raises, the samples end normally (the accepted ones are still
        answered) and the error is kept in ``stream.producer_error``."""
        try:
            sample = await anext(self._samples)
            return await asyncio.to_thread(self._stream.prepare, sample)
        except StopAsyncIteration:
            self._stream.exhausted = True
        except asyncio.CancelledError as error:
            if _task_cancelling():  # this draw is cancelled (close()): not the producer
                raise
            # The producer's own (it awaited something that was cancelled): the writer
            # waited on it, ended cancelled without done_writing, and the call hung.
            self._stream.producer_error, self._stream.exhausted = error, True
        except Exception as error:  # the producer's
            self._stream.producer_error, self._stream.exhausted = error, True
        return None


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancelled_error() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="cancelled by the client",
    )


async def _aiter(samples: Iterable[Sample] | AsyncIterable[Sample]) -> AsyncIterator[Sample]:
    if isinstance(samples, AsyncIterable):
        async for sample in samples:
            yield sample
    else:
        for sample in samples:
            yield sample
