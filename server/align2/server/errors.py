"""The one error family of the server core.

Core code raises these (it never imports grpc); the transport maps each to a gRPC status by
its `code` in one place (align2.server.transport.errors). Messages name the offending field
and, where one applies, the limit, e.g. ``samples[3].image: 25165824 bytes exceeds
max_image_bytes 16777216``.

Besides the message, an error carries plain data that the transport turns into
machine-readable details (google.rpc.Status): the ``field`` it is about (by default the
message's prefix before the first ": ", when that prefix is a field path), the resource a
NotFound did not find, and how long to wait before a retry (``retry_after``).
"""

from __future__ import annotations

import enum
import re
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


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


class _Infer(enum.Enum):
    FROM_MESSAGE = enum.auto()


FROM_MESSAGE = _Infer.FROM_MESSAGE
"""The default ``field`` of an error: the message's ``FIELD: `` prefix, if it has one."""

# A request field path: identifiers joined by dots, each with optional [n] indexes
# ("samples[3].turns[0].answer", "options.decoding.top_p").
_FIELD_PATH = re.compile(r"[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*", re.ASCII)


def field_of(message: str) -> str | None:
    """The field path a message starts with (``"samples[3].image: ..."`` -> ``samples[3].image``),
    or None when the text before its first ": " is not a field path."""
    prefix, colon, _ = message.partition(": ")
    return prefix if colon and _FIELD_PATH.fullmatch(prefix) else None


def detached(error: E) -> E:
    """``error``, to be kept as a value (a sample's or a decision's error), without its
    traceback and the errors it was raised while handling or from (``__context__``,
    ``__cause__``). Those held every frame it was raised through, with their locals (a
    sample, its image), among them often the object that keeps the error: a reference
    cycle that only the cyclic GC frees."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


class Align2Error(Exception):
    """Base of every error the core raises on purpose.

    ``field``: the request field the error is about (None: the call as a whole); by
    default inferred from the message. ``retry_after``: seconds a client should wait
    before retrying (None: retrying the same call will not help); subclasses set defaults.
    """

    code: Code = Code.INTERNAL
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        field: str | _Infer | None = FROM_MESSAGE,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field_of(message) if field is FROM_MESSAGE else field
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidArgument(Align2Error):
    code = Code.INVALID_ARGUMENT


class MalformedRequest(InvalidArgument):
    """The request's bytes are not a valid message of its type (corrupt wire format, a
    ``string`` field that is not UTF-8): the caller's fault. ``field``: the string that is
    not UTF-8, where that is why (else no field can be named)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)


class NotFound(Align2Error):
    """A name in the request (a model, a template set) names nothing the server has:
    ``resource_type`` ("model", "template") and ``resource_name`` say which."""

    code = Code.NOT_FOUND

    def __init__(
        self,
        message: str,
        *,
        resource_type: str = "",
        resource_name: str = "",
        field: str | _Infer | None = FROM_MESSAGE,
    ) -> None:
        super().__init__(message, field=field)
        self.resource_type = resource_type
        self.resource_name = resource_name


OVERLOADED_RETRY_SECONDS = 0.1
"""What an Overloaded refusal asks a client to wait when there is nothing better to go by:
the request-bytes budget, or a queue before its first batch (a full queue otherwise gives
each refused call its turn, core/drain.py)."""

UNAVAILABLE_RETRY_SECONDS = 1.0
"""What a not-serving refusal asks a client to wait: warm-up takes seconds, and a
draining replica's traffic goes elsewhere."""


class Overloaded(Align2Error):
    """Admission refused: the queue is full. Raised before any work is done."""

    code = Code.RESOURCE_EXHAUSTED
    retry_after: float | None = OVERLOADED_RETRY_SECONDS


class NoTurnBeforeDeadline(Overloaded):
    """Admission refused, and at the queue's present pace the call's turn would come only
    after its deadline: retrying will not help (no RetryInfo; the client is told not to
    retry)."""

    retry_after = None


class TooManySelectionKeys(Align2Error):
    """A Curate stream names a new selection key while the server already holds its limit
    of live keys; ``retry_after``: when a key can expire at the soonest."""

    code = Code.RESOURCE_EXHAUSTED


STORED_SCORES_RETRY_SECONDS = 10.0
"""What a StoredScoresFull refusal asks a client to wait: scores are given back only as
streams end and idle selection keys expire, so not soon."""


class StoredScoresFull(Align2Error):
    """The selection windows of the whole server hold limits.max_stored_scores scores: a
    stream's seeds, or a sample that would add a score to a window not yet full, are
    refused until streams end or selection keys expire."""

    code = Code.RESOURCE_EXHAUSTED
    retry_after: float | None = STORED_SCORES_RETRY_SECONDS


class DeadlineExpired(Align2Error):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(Align2Error):
    code = Code.CANCELLED


class Unavailable(Align2Error):
    """Not serving (warming up, draining, or a backend marked unhealthy)."""

    code = Code.UNAVAILABLE
    retry_after = UNAVAILABLE_RETRY_SECONDS


class Unimplemented(Align2Error):
    code = Code.UNIMPLEMENTED


class Unauthenticated(Align2Error):
    """No accepted bearer token (security.auth_tokens_file)."""

    code = Code.UNAUTHENTICATED


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
