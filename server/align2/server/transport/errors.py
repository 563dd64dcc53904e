"""The one mapping from the core's errors to gRPC statuses, with machine-readable details.

A whole-call error keeps its code and message, and carries a ``google.rpc.Status`` with the
same code and message in the ``grpc-status-details-bin`` trailer, which any gRPC library
decodes (Python: ``grpc_status.rpc_status.from_call``). Its details:

- every Align2Error: ``ErrorInfo`` (reason: the error class in SCREAMING_SNAKE, e.g.
  ``OVERLOADED``, ``DEVICE_OUT_OF_MEMORY``; domain ``align2.v1``);
- INVALID_ARGUMENT with a field: ``BadRequest`` with one FieldViolation (field path and the
  message);
- NOT_FOUND of a named resource: ``ResourceInfo`` (type ``model`` or ``template``, name);
- an error with ``retry_after`` (RESOURCE_EXHAUSTED from a full queue, UNAVAILABLE):
  ``RetryInfo``.

A RESOURCE_EXHAUSTED error also carries ``grpc-retry-pushback-ms`` trailing metadata (gRFC
A6): its ``retry_after`` in milliseconds, which gRPC's own client retry waits exactly
instead of its jittered backoff, so that the server paces the retries of a burst
(align2.server.core.drain); or -1 when it has none (retrying will not help: the call's turn
would come after its deadline, a device out of memory), which stops gRPC's retries.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from align2.server.errors import Align2Error, Code, NotFound

DOMAIN = "align2.v1"


def status_code(exc: Align2Error) -> grpc.StatusCode:
    """The gRPC code of ``exc`` (same name and number as its core code)."""
    return grpc.StatusCode[exc.code.name]


def reason(exc: Align2Error) -> str:
    """``ErrorInfo.reason``: the class name in SCREAMING_SNAKE (``NotFound`` -> ``NOT_FOUND``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).upper()


def details(exc: Align2Error) -> list[message.Message]:
    """The google.rpc detail messages for ``exc`` (see the module docstring)."""
    found: list[message.Message] = [error_details_pb2.ErrorInfo(reason=reason(exc), domain=DOMAIN)]
    if exc.code is Code.INVALID_ARGUMENT and exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        found.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(exc, NotFound) and exc.resource_type:
        found.append(
            error_details_pb2.ResourceInfo(
                resource_type=exc.resource_type,
                resource_name=exc.resource_name,
                description=exc.message,
            )
        )
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(_milliseconds(exc.retry_after))  # as the pushback says it
        found.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return found


def rich_status(exc: Align2Error) -> status_pb2.Status:
    """``exc`` as a google.rpc.Status: its code, its message unchanged, its details."""
    packed = []
    for detail in details(exc):
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=int(exc.code), message=exc.message, details=packed)


PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback(exc: Align2Error) -> tuple[tuple[str, str], ...]:
    """The pushback trailer of a RESOURCE_EXHAUSTED ``exc`` (see the module doc): its
    ``retry_after`` in milliseconds, or -1 (do not retry) when it has none."""
    if exc.code is not Code.RESOURCE_EXHAUSTED:
        return ()
    delay = -1 if exc.retry_after is None else _milliseconds(exc.retry_after)
    return ((PUSHBACK_KEY, str(delay)),)


def _milliseconds(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[Any, ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailers


def grpc_status(exc: Align2Error) -> grpc.Status:
    """The status to abort with: code, message, the details trailer
    (``grpc-status-details-bin``) and, for a retry-able RESOURCE_EXHAUSTED, the pushback."""
    status = rpc_status.to_status(rich_status(exc))
    trailers = tuple(status.trailing_metadata) + pushback(exc)
    return _Status(status.code, status.details, trailers)


async def abort(
    context: grpc.aio.ServicerContext, exc: Align2Error, kept: tuple[Any, ...] = ()
) -> None:
    """End the call with ``exc``'s status (raises grpc's AbortError). ``kept``: trailers set
    before (the call's x-request-id), which abort would otherwise replace."""
    status = grpc_status(exc)
    await context.abort(status.code, status.details, kept + tuple(status.trailing_metadata))
