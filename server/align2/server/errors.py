"""The one error family of the server core.

Core code raises these (it never imports grpc); the transport maps each to a gRPC status by
its `code` in one place (align2.server.transport.errors). Messages name the offending field
and, where one applies, the limit, e.g. ``samples[3].image: 25165824 bytes exceeds
max_image_bytes 16777216``.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Status codes; names and numbers are those of gRPC / google.rpc.Code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    FAILED_PRECONDITION = 9
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class Align2Error(Exception):
    """Base of every error the core raises on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(Align2Error):
    code = Code.INVALID_ARGUMENT


class NotFound(Align2Error):
    code = Code.NOT_FOUND


class Overloaded(Align2Error):
    """Admission refused: the queue is full. Raised before any work is done."""

    code = Code.RESOURCE_EXHAUSTED


class DeadlineExpired(Align2Error):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(Align2Error):
    code = Code.CANCELLED


class Unavailable(Align2Error):
    """Not serving (warming up, draining, or a backend marked unhealthy)."""

    code = Code.UNAVAILABLE


class Unimplemented(Align2Error):
    code = Code.UNIMPLEMENTED


class DeviceOutOfMemory(Align2Error):
    """The device ran out of memory for a batch; the batcher retries smaller batches."""

    code = Code.RESOURCE_EXHAUSTED


class BackendError(Align2Error):
    """A backend failed on a batch; only that batch's items fail.

    ``fatal`` marks errors the process cannot recover from (a lost device): health then
    goes NOT_SERVING so that the orchestrator restarts the server.
    """

    code = Code.INTERNAL

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class ConfigError(Exception):
    """Invalid configuration, reported at start-up (not a request error)."""
