"""Server interceptors: the one mapping from core errors to gRPC statuses, plus metrics.

Every align2.v1 RPC passes through ``StatusInterceptor``: an Align2Error becomes its status
code with its message (which names the field and the limit) and google.rpc details (built
in align2.server.transport.errors); any other exception becomes INTERNAL (logged with its
traceback); request counts and durations are recorded by code, and each call gets a request
id for its log lines and its trailers.

Request bytes that do not parse (corrupt wire format, a ``string`` field that is not UTF-8)
are the caller's fault: INVALID_ARGUMENT (MalformedRequest). grpc runs the deserializer
outside the servicer, and an exception there answers UNKNOWN (unary) or escapes from the
request iterator (streams) with an ERROR traceback; so the deserializer is wrapped to hand
the failure on as a value, which the wrapped behavior raises as MalformedRequest
(``ParseInterceptor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from align2.server import logs, metrics
from align2.server.errors import (
    Align2Error,
    DeadlineExpired,
    MalformedRequest,
    Unavailable,
    detached,
)
from align2.server.transport.bad_utf8 import bad_utf8_path
from align2.server.transport.errors import abort, status_code
from align2.server.transport.inflight import InFlightCalls

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/align2.v1."

DEADLINE_SLACK_SECONDS = 0.05
"""A call ended this close to its deadline ended by it. The client's deadline timer fires
before the server's by the transport delay (3.6-5.6 ms measured on loopback), and gRPC's
client then cancels the call: the server sees a cancellation, or the end of a request
stream, a little before its own deadline."""


class _Call:
    """Status bookkeeping for one RPC."""

    def __init__(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        self.rpc = rpc
        self.context = context
        self.started = time.monotonic()
        self.code = grpc.StatusCode.OK
        given = dict(context.invocation_metadata() or ()).get("x-request-id")
        self.request_id = logs.new_request_id(given if isinstance(given, str) else None)
        self.trailers: tuple[tuple[str, str | bytes], ...] = (("x-request-id", self.request_id),)
        context.set_trailing_metadata(self.trailers)

    async def fail(self, exc: BaseException) -> None:
        """Abort the RPC with the status that ``exc`` maps to, and return: the behavior then
        ends without an error, and grpc.aio raises the call's AbortError itself once it has
        (see :func:`_aborted`)."""
        if isinstance(exc, Align2Error):
            self.code = status_code(exc)
            aborting = abort(self.context, exc, self.trailers)
        else:
            log.error("internal error in %s", self.rpc, exc_info=exc)
            self.code = grpc.StatusCode.INTERNAL
            aborting = self.context.abort(self.code, f"internal error: {type(exc).__name__}: {exc}")
        del exc  # not held by this frame while the status is sent
        await _aborted(aborting)

    def expired(self, slack: float = DEADLINE_SLACK_SECONDS) -> bool:
        """The call has a deadline, and at most ``slack`` seconds of it are left."""
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= slack

    def cancelled(self) -> None:
        self.code = (
            grpc.StatusCode.DEADLINE_EXCEEDED if self.expired() else grpc.StatusCode.CANCELLED
        )

    def returned(self, request_stream: bool) -> None:
        """The behavior ended without an error. gRPC ends the request stream of a call whose
        client gave up as if the client had half-closed: a Curate stream then ends
        normally, though its caller got DEADLINE_EXCEEDED; count it as that."""
        if request_stream and self.expired():
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED

    def aborted(self) -> None:
        code = self.context.code()
        if isinstance(code, grpc.StatusCode) and self.code is grpc.StatusCode.OK:
            self.code = code

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        metrics.REQUESTS.labels(rpc=self.rpc, code=self.code.name).inc()
        metrics.REQUEST_SECONDS.labels(rpc=self.rpc, code=self.code.name).observe(seconds)
        log.info(
            "rpc finished",
            extra={"rpc": self.rpc, "code": self.code.name, "seconds": round(seconds, 6)},
        )


async def _aborted(aborting: Awaitable[None]) -> None:
    """Await ``aborting`` (ServicerContext.abort: it sends the status, then raises an
    AbortError it keeps on the call's state) and let that error go, detached.

    grpc.aio (1.85) raises the kept AbortError again itself once the behavior returns, so
    the call ends as aborted with or without it propagating here. Raised up through our
    frames, its traceback held them, and they hold the ServicerContext, which holds the
    call's state, which holds the error: every failed call was a reference cycle, and
    through the error's ``__context__`` (the core error, whose traceback held the core's
    frames) it kept the call's request messages (a refused Curate stream: its options and
    seeds) until the cyclic GC ran. Detached (no traceback, no context), the error holds
    nothing of ours, and a failed call is freed when it ends."""
    try:
        await aborting
    except grpc.aio.AbortError as aborted:
        detached(aborted)


@contextlib.asynccontextmanager
async def _mapped(
    rpc: str, context: grpc.aio.ServicerContext, calls: InFlightCalls, request_stream: bool
) -> AsyncIterator[None]:
    """Run one RPC's behavior: map its errors to a status, record its code and duration.
    A call that shutdown ends (``calls.end_all``) is answered UNAVAILABLE with its reason."""
    call = _Call(rpc, context)
    task = calls.enter()
    try:
        if request_stream:  # a stream may run for hours: its id is sent at once too
            with contextlib.suppress(Exception):  # a call already gone: nothing to tell
                await call.context.send_initial_metadata(call.trailers)
        yield
        # A unary call whose work raced its deadline (its items failed "deadline exceeded"
        # as the answer was built): its client has stopped waiting (its timer fires
        # first), so it is answered, and counted, DEADLINE_EXCEEDED, not OK.
        if not request_stream and call.expired(slack=0):
            await call.fail(DeadlineExpired("deadline exceeded before the answer was ready"))
        call.returned(request_stream)
    except grpc.aio.AbortError as aborted:  # the behavior aborted the call itself
        call.aborted()
        detached(aborted)  # and not raised on: grpc.aio raises it (see _aborted)
    except GeneratorExit:  # gRPC closed the response stream: its client went away, or
        if calls.ended_by_shutdown(task) is not None:  # shutdown ended it (end_all)
            call.code = grpc.StatusCode.UNAVAILABLE
        else:
            call.cancelled()
        raise
    except asyncio.CancelledError:
        reason = calls.ended_by_shutdown(task)
        if reason is None or task is None:
            call.cancelled()
            raise
        task.uncancel()  # our own cancellation, turned into an answer
        await call.fail(Unavailable(reason))
    except Exception as exc:
        await call.fail(exc)
    finally:
        calls.leave(task)
        call.finish()


class _Unparsed:
    """What the wrapped deserializer returns for bytes that are not a message of its type:
    why, and the path of the first string that is not UTF-8, when that is why."""

    def __init__(self, error: Exception, bad_utf8: str | None = None) -> None:
        self.error = error
        self.bad_utf8 = bad_utf8

    def why(self) -> str:
        if self.bad_utf8 is not None:
            return f"{self.bad_utf8} is not valid UTF-8, as a proto3 string must be"
        return str(self.error)


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an _Unparsed instead of raising (see the module doc)."""
    if deserializer is None:
        return None

    message_type = getattr(deserializer, "__self__", None)  # a generated class's FromString
    descriptor = getattr(message_type, "DESCRIPTOR", None)

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, whatever the implementation
            # detached: its traceback holds this frame, whose caller (_checked_stream) holds
            # what is returned here
            bad_utf8 = None if descriptor is None else bad_utf8_path(raw, descriptor)
            return _Unparsed(detached(exc), bad_utf8)

    return parse


def _checked(request: Any) -> Any:
    """A unary request, or MalformedRequest when its bytes did not parse."""
    if isinstance(request, _Unparsed):
        raise MalformedRequest(
            f"the request could not be parsed: {request.why()}", field=request.bad_utf8
        )
    return request


async def _checked_stream(context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The call's request stream, ending with MalformedRequest at a message that did not
    parse. Read with ``context.read()``, not through gRPC's request iterator: that one
    (grpc 1.85) holds its last message while it waits for the next, so an idle Curate
    stream kept its last sample, image included, outside the byte budget. Here a message
    is let go before the next read."""
    position = 0
    while True:
        request = await context.read()
        if request is grpc.aio.EOF:
            return
        if isinstance(request, _Unparsed):
            raise MalformedRequest(
                f"message {position} of the stream (counting from 0, options included) could "
                f"not be parsed: {request.why()}",
                field=request.bad_utf8,
            )
        yield request
        del request
        position += 1


def _is_stream(request: Any) -> bool:
    """Whether a behavior's request is a stream of messages (a client- or bidi-streaming RPC)."""
    return hasattr(request, "__aiter__")


def _requests(request: Any, context: grpc.aio.ServicerContext) -> Any:
    """The request (unary) or the request stream (streaming), checked as it is read."""
    if isinstance(request, _Unparsed) or not _is_stream(request):
        return _checked(request)
    return _checked_stream(context)  # gRPC's iterator (``request``) is never read


def _check_unary_response(_rpc: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_requests(request, context), context)

    return checked


def _check_stream_response(_rpc: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        requests = _requests(request, context)
        if inspect.isasyncgenfunction(behavior):
            async with contextlib.aclosing(behavior(requests, context)) as responses:
                async for response in responses:
                    yield response
        else:
            await behavior(requests, context)

    return checked


Wrap = Callable[[str, Callable[..., Any]], Callable[..., Any]]


def _wrap_unary_response(calls: InFlightCalls) -> Wrap:
    def wrap(rpc: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _mapped(rpc, context, calls, _is_stream(request)):
                return await behavior(request, context)

        return wrapped

    return wrap


def _wrap_stream_response(calls: InFlightCalls) -> Wrap:
    def wrap(rpc: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _mapped(rpc, context, calls, _is_stream(request)):
                if inspect.isasyncgenfunction(behavior):
                    # closed with this one, at once: its work in flight is cancelled now
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                else:
                    await behavior(request, context)

        return wrapped

    return wrap


def rewrap(
    handler: grpc.RpcMethodHandler,
    rpc: str,
    unary: Wrap,
    stream: Wrap,
    deserializer: Callable[[Any], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped by ``unary`` (unary response) or
    ``stream`` (streaming response), and its request deserializer by ``deserializer``."""
    parse = handler.request_deserializer
    if deserializer is not None:
        parse = deserializer(parse)
    kinds = {
        "unary_unary": (unary, grpc.unary_unary_rpc_method_handler),
        "stream_unary": (unary, grpc.stream_unary_rpc_method_handler),
        "unary_stream": (stream, grpc.unary_stream_rpc_method_handler),
        "stream_stream": (stream, grpc.stream_stream_rpc_method_handler),
    }
    for attr, (wrap, make) in kinds.items():
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(
                wrap(rpc, behavior),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to statuses and records each call (see the module doc); ``calls``: the
    registry of running calls that shutdown waits for and ends."""

    def __init__(self, calls: InFlightCalls | None = None) -> None:
        self.calls = calls if calls is not None else InFlightCalls()
        self._unary = _wrap_unary_response(self.calls)
        self._stream = _wrap_stream_response(self.calls)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return await _align2_handler(continuation, handler_call_details, self._unary, self._stream)


class ParseInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse become MalformedRequest (see the module doc).

    Goes last, next to the servicer: the checks of the interceptors before it (a bearer
    token) come first, and StatusInterceptor maps the error like any other."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return await _align2_handler(
            continuation,
            handler_call_details,
            _check_unary_response,
            _check_stream_response,
            _lenient,
        )


async def _align2_handler(
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
    handler_call_details: grpc.HandlerCallDetails,
    *wrappers: Any,
) -> grpc.RpcMethodHandler:
    """The next handler, rewrapped by ``wrappers`` (see :func:`rewrap`) for align2.v1 RPCs;
    health, reflection and unknown methods pass as they are."""
    handler = await continuation(handler_call_details)
    method: str = handler_call_details.method
    if handler is None or not method.startswith(SERVICE_PREFIX):
        return handler
    return rewrap(handler, method.rsplit("/", 1)[-1], *wrappers)
