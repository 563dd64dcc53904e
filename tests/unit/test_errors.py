"""The error family's plain data (field, resource, retry) and the google.rpc details the
transport builds from it."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from support import unpack_details

from align2.server.errors import (
    BackendError,
    DeviceOutOfMemory,
    InvalidArgument,
    NotFound,
    NoTurnBeforeDeadline,
    Overloaded,
    Unavailable,
    field_of,
)
from align2.server.transport import errors


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("samples[3].image: 25165824 bytes exceeds limits.max_image_bytes", "samples[3].image"),
        ("samples: 9 samples exceeds limits.max_samples_per_call 8", "samples"),
        ("heads[1]: unknown head 7; valid: ...", "heads[1]"),
        ("options.decoding.top_p: 2.0 is not in (0, 1]", "options.decoding.top_p"),
        ("samples[0].turns[12].answer: empty", "samples[0].turns[12].answer"),
        ("x-align2-priority metadata: unknown value 'urgent'", None),
        ("model 'llm' refused the request: too long", None),
        ("server is shutting down", None),
        ("samples[x]: not an index", None),
        ("samples[3].image:no space after the colon", None),
        ("", None),
    ],
)
def test_field_is_the_message_prefix_when_it_is_a_field_path(
    message: str, field: str | None
) -> None:
    assert field_of(message) == field
    assert InvalidArgument(message).field == field


def test_an_explicit_field_wins_even_when_none() -> None:
    assert InvalidArgument("item: message 2 is empty", field="sample").field == "sample"
    assert InvalidArgument("item: message 2 is empty", field=None).field is None


def test_retry_after_defaults_by_class_and_can_be_given() -> None:
    assert Overloaded("full").retry_after == pytest.approx(0.1)
    assert Unavailable("draining").retry_after == pytest.approx(1.0)
    assert Unavailable("draining", retry_after=5).retry_after == 5
    assert InvalidArgument("x: y").retry_after is None
    assert DeviceOutOfMemory("oom").retry_after is None


def test_invalid_argument_carries_bad_request_naming_the_field() -> None:
    exc = InvalidArgument("samples[3].image: not a readable JPEG, PNG or WebP image")
    status = errors.rich_status(exc)
    assert (status.code, status.message) == (3, exc.message)
    found = unpack_details(status)
    assert set(found) == {"ErrorInfo", "BadRequest"}
    bad = found["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    [violation] = bad.field_violations
    assert (violation.field, violation.description) == ("samples[3].image", exc.message)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "align2.v1")


def test_invalid_argument_without_a_field_has_no_bad_request() -> None:
    status = errors.rich_status(InvalidArgument("x-align2-priority metadata: unknown value"))
    assert set(unpack_details(status)) == {"ErrorInfo"}


def test_not_found_carries_resource_info() -> None:
    exc = NotFound(
        "question_model: unknown model 'nope'; loaded: a, b",
        resource_type="model",
        resource_name="nope",
    )
    found = unpack_details(errors.rich_status(exc))
    assert set(found) == {"ErrorInfo", "ResourceInfo"}
    resource = found["ResourceInfo"]
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("model", "nope")
    assert resource.description == exc.message


@pytest.mark.parametrize(
    ("exc", "code", "reason", "nanos"),
    [
        (Overloaded("queue is full"), 8, "OVERLOADED", 100_000_000),
        (Unavailable("server is warming up"), 14, "UNAVAILABLE", 1_000_000_000),
    ],
)
def test_refusals_carry_retry_info(exc: Exception, code: int, reason: str, nanos: int) -> None:
    assert isinstance(exc, Overloaded | Unavailable)
    status = errors.rich_status(exc)
    assert status.code == code
    found = unpack_details(status)
    assert set(found) == {"ErrorInfo", "RetryInfo"}
    retry = found["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == nanos
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == reason


def test_reason_is_the_class_name_in_screaming_snake() -> None:
    assert errors.reason(DeviceOutOfMemory("oom")) == "DEVICE_OUT_OF_MEMORY"
    assert errors.reason(BackendError("failed")) == "BACKEND_ERROR"
    assert errors.reason(NotFound("x: y")) == "NOT_FOUND"


def test_grpc_status_puts_the_status_in_the_details_trailer() -> None:
    exc = InvalidArgument("heads[1]: unknown head 7")
    status = errors.grpc_status(exc)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == exc.message
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    assert status_pb2.Status.FromString(value) == errors.rich_status(exc)

    class Call:  # what rpc_status.from_call reads of a finished call
        def code(self) -> grpc.StatusCode:
            return status.code

        def details(self) -> str:
            return status.details

        def trailing_metadata(self) -> object:
            return status.trailing_metadata

    assert rpc_status.from_call(Call()) == errors.rich_status(exc)


@pytest.mark.parametrize(
    ("exc", "pushback"),
    [
        (Overloaded("queue is full", retry_after=0.0374), "37"),
        (Overloaded("budget"), "100"),
        (NoTurnBeforeDeadline("queue is full; no turn before the deadline"), "-1"),
        (DeviceOutOfMemory("oom"), "-1"),
        (Unavailable("draining"), None),
        (InvalidArgument("x: y"), None),
    ],
)
def test_resource_exhausted_pushes_back_its_retry_delay(
    exc: Exception, pushback: str | None
) -> None:
    """gRFC A6: the client's next attempt waits exactly grpc-retry-pushback-ms; a negative
    value stops its retries."""
    assert isinstance(exc, Overloaded | DeviceOutOfMemory | Unavailable | InvalidArgument)
    trailers = dict(errors.grpc_status(exc).trailing_metadata)
    assert trailers.get("grpc-retry-pushback-ms") == pushback
    assert "grpc-status-details-bin" in trailers
    if isinstance(exc, NoTurnBeforeDeadline):
        assert "RetryInfo" not in unpack_details(errors.rich_status(exc))
