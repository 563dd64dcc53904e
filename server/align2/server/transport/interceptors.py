"""Server interceptors: the one mapping from core errors to gRPC statuses, plus metrics.

Every align2.v1 RPC passes through ``StatusInterceptor``: an Align2Error becomes its status
code with its message (which names the field and the limit) and google.rpc details (built
in align2.server.transport.errors); any other exception becomes INTERNAL (logged with its
traceback); request counts and durations are recorded by code, and each call gets a request
id for its log lines and its trailers.
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
from align2.server.errors import Align2Error
from align2.server.transport.errors import grpc_status

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/align2.v1."


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
        """Abort the RPC with the status that ``exc`` maps to (raises AbortError)."""
        if isinstance(exc, Align2Error):
            status = grpc_status(exc)
            self.code = status.code
            # abort (like abort_with_status) replaces the trailers set before: keep the id
            trailers = self.trailers + tuple(status.trailing_metadata)
            await self.context.abort(status.code, status.details, trailers)
        log.error("internal error in %s", self.rpc, exc_info=exc)
        self.code = grpc.StatusCode.INTERNAL
        await self.context.abort(self.code, f"internal error: {type(exc).__name__}: {exc}")

    def cancelled(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def aborted(self) -> None:
        code = self.context.code()
        if isinstance(code, grpc.StatusCode) and self.code is grpc.StatusCode.OK:
            self.code = code

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        metrics.REQUESTS.labels(rpc=self.rpc, code=self.code.name).inc()
        metrics.REQUEST_SECONDS.labels(rpc=self.rpc).observe(seconds)
        log.info(
            "rpc finished",
            extra={"rpc": self.rpc, "code": self.code.name, "seconds": round(seconds, 6)},
        )


@contextlib.asynccontextmanager
async def _mapped(rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Run one RPC's behavior: map its errors to a status, record its code and duration."""
    call = _Call(rpc, context)
    try:
        yield
    except grpc.aio.AbortError:
        call.aborted()
        raise
    except asyncio.CancelledError:
        call.cancelled()
        raise
    except Exception as exc:
        await call.fail(exc)
    finally:
        call.finish()


def _wrap_unary_response(rpc: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _mapped(rpc, context):
            return await behavior(request, context)

    return wrapped


def _wrap_stream_response(rpc: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _mapped(rpc, context):
            if inspect.isasyncgenfunction(behavior):
                async for response in behavior(request, context):
                    yield response
            else:
                await behavior(request, context)

    return wrapped


Wrap = Callable[[str, Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: grpc.RpcMethodHandler, rpc: str, unary: Wrap, stream: Wrap
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped by ``unary`` (unary response) or
    ``stream`` (streaming response)."""
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
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        return rewrap(handler, rpc, _wrap_unary_response, _wrap_stream_response)
