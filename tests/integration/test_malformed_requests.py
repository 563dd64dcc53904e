"""Request bytes that are not a valid message (corrupt wire format, invalid UTF-8 in a
``string`` field) are the caller's fault: INVALID_ARGUMENT saying the request could not be
parsed, for unary calls and in a Curate stream, and no ERROR traceback in the log. Sent as
raw bytes through a generic channel call, as a broken or hostile client would."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support import ServerThread, error_details, png, score_config
from wire import length_delimited as field

from align2.v1 import curation_pb2 as pb

SERVICE = "/align2.v1.CurationService/"


BAD_UTF8 = b"\xff"
# Sample: id = 1, image = 2, turns = 3; Turn: question = 1; ScoreRequest.samples = 1.
BAD_ID = field(1, field(1, BAD_UTF8) + field(3, field(1, b"Q?")))
BAD_QUESTION = field(1, field(1, b"s1") + field(2, png()) + field(3, field(1, BAD_UTF8)))
# A JavaScript string with a lone surrogate (half an emoji), as protobufjs encodes it, in
# the second turn's answer of the second sample (Turn: answer = 2).
SECOND_SAMPLE_BAD = field(1, field(1, b"s0")) + field(
    1, field(1, b"s1") + field(3, field(1, b"Q?")) + field(3, field(2, b"ok \xed\xa0\xbd"))
)
CORRUPT = b"\x0a\x05\x0a\x01"  # a field longer than the message
GARBAGE = b"\xff\xff\xff\xff"


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    server = ServerThread(config).start()  # Score and Curate; Align off (no LLM)
    yield server
    server.stop()


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def assert_unparsed(
    error: grpc.RpcError, where: str = "the request", bad_utf8: str | None = None
) -> None:
    """``bad_utf8``: the string field the message must name as not UTF-8 (and BadRequest)."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert f"{where} could not be parsed: " in error.details(), error.details()
    details = error_details(error)
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MALFORMED_REQUEST"
    if bad_utf8 is None:
        assert "BadRequest" not in details  # no field can be named
        return
    assert f": {bad_utf8} is not valid UTF-8" in error.details(), error.details()
    bad_request = details["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [bad_utf8]


@pytest.mark.parametrize(
    ("rpc", "raw", "bad_utf8"),
    [
        ("Score", GARBAGE, None),
        ("Score", CORRUPT, None),
        ("Score", BAD_ID, "samples[0].id"),
        ("Score", BAD_QUESTION, "samples[0].turns[0].question"),
        ("Score", SECOND_SAMPLE_BAD, "samples[1].turns[1].answer"),
        ("Align", BAD_QUESTION, "samples[0].turns[0].question"),  # Align is off: refused first
        ("GetServerInfo", GARBAGE, None),
    ],
)
def test_unary_calls_with_unparseable_bytes_are_invalid_argument(
    channel: grpc.Channel,
    rpc: str,
    raw: bytes,
    bad_utf8: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fails on: a message that does not name the string that is not UTF-8 (protobuf's own
    says "String field had bad UTF-8" and no more)."""
    call = channel.unary_unary(SERVICE + rpc, request_serializer=None, response_deserializer=None)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=30)
    assert_unparsed(info.value, bad_utf8=bad_utf8)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def curate(channel: grpc.Channel, messages: list[bytes]) -> tuple[list[pb.CurateResponse], Any]:
    call = channel.stream_stream(
        SERVICE + "Curate", request_serializer=None, response_deserializer=None
    )
    answers: list[pb.CurateResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        for raw in call(iter(messages), timeout=60):
            answers.append(pb.CurateResponse.FromString(raw))
    return answers, info.value


def test_a_curate_stream_ends_invalid_argument_at_a_message_that_does_not_parse(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    good = pb.CurateRequest(
        sample=pb.Sample(id="ok", image=png(), turns=[pb.Turn(question="Q?", answer="A.")])
    ).SerializeToString()
    bad_sample = field(2, field(1, b"s1") + field(3, field(1, BAD_UTF8)))  # CurateRequest.sample
    with caplog.at_level(logging.INFO):
        answers, error = curate(channel, [good, bad_sample, good])
        assert_unparsed(
            error,
            "message 1 of the stream (counting from 0, options included)",
            "sample.turns[0].question",
        )
        assert [a.id for a in answers] == ["ok"]  # what was accepted first is answered
        assert answers[0].decision == pb.DECISION_KEPT
        answers, error = curate(channel, [GARBAGE])
        assert_unparsed(error, "message 0 of the stream (counting from 0, options included)")
        assert answers == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
