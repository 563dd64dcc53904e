"""Request building shared by both clients: heads, priority, chunking, merging."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from client_fakes import make_samples
from hypothesis import given
from hypothesis import strategies as st

from align2.client import CallInfo, ProtocolError, Sample, ScoreReply, ScoreResult, Timing, Turn
from align2.client.calls import (
    ScoreCall,
    ScoreChunkReply,
    align_options,
    encode_chunk,
    merge_results,
    parse_heads,
    parse_priority,
    split_chunks,
)
from align2.v1 import curation_pb2 as pb


def test_parse_heads() -> None:
    assert parse_heads(("question", "answer")) == (pb.HEAD_QUESTION, pb.HEAD_ANSWER)
    assert parse_heads(["answer"]) == (pb.HEAD_ANSWER,)
    assert parse_heads("question") == (pb.HEAD_QUESTION,)
    assert parse_heads(["answer", "answer", "question"]) == (pb.HEAD_ANSWER, pb.HEAD_QUESTION)


@pytest.mark.parametrize("heads", [["questions"], ["question", "reward"], "both", []])
def test_bad_heads_list_the_valid_ones(heads: list[str]) -> None:
    with pytest.raises(ValueError, match=r"valid heads are \['answer', 'question'\]"):
        parse_heads(heads)


def test_parse_priority() -> None:
    assert parse_priority(None) == pb.PRIORITY_UNSPECIFIED
    assert parse_priority("bulk") == pb.PRIORITY_BULK
    with pytest.raises(ValueError, match=r"valid are \['bulk', 'interactive'\]"):
        parse_priority("urgent")


@given(count=st.integers(0, 50), size=st.integers(1, 20))
def test_chunks_cover_the_input_in_order(count: int, size: int) -> None:
    items = list(range(count))
    chunks = split_chunks(items, size)  # type: ignore[arg-type]
    assert [x for chunk in chunks for x in chunk] == items
    assert all(1 <= len(chunk) <= size for chunk in chunks)
    assert len(chunks) == -(-count // size)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        split_chunks([], 0)


def test_plan_validates_before_reading_images(tmp_path: pathlib.Path) -> None:
    samples = make_samples(1)
    samples[0].image = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="heads"):
        ScoreCall.plan(samples, ["nope"], chunk_size=4)


def test_request_fields() -> None:
    call = ScoreCall.plan(
        make_samples(5), "answer", chunk_size=2, priority="bulk", answer_model="am"
    )
    assert len(call.chunks) == 3
    request = call.encode(2).request
    assert request is not None
    assert [s.id for s in request.samples] == ["4"]
    assert list(request.heads) == [pb.HEAD_ANSWER]
    assert (request.priority, request.question_model, request.answer_model) == (
        pb.PRIORITY_BULK,
        "",
        "am",
    )


def test_merge_puts_local_errors_in_place(tmp_path: pathlib.Path) -> None:
    samples = make_samples(4)
    samples[0].image = samples[2].image = tmp_path / "missing.png"
    chunk = encode_chunk(samples)
    assert [s.id for s in chunk.sent] == ["1", "3"]
    merged = merge_results(chunk, ["r1", "r3"], ["1", "3"], lambda i, e: f"failed {i}")
    assert merged == ["failed 0", "r1", "failed 2", "r3"]


@pytest.mark.parametrize("ids", [["1"], ["1", "3", "4"], ["3", "1"]])
def test_merge_rejects_a_broken_contract(ids: list[str]) -> None:
    chunk = encode_chunk(make_samples(4)[1::2])
    with pytest.raises(ProtocolError):
        merge_results(chunk, ids, ids, lambda i, e: i)


def test_chunk_that_failed_locally_decodes_without_a_call(tmp_path: pathlib.Path) -> None:
    samples = make_samples(2)
    for sample in samples:
        sample.image = tmp_path / "missing.png"
    call = ScoreCall.plan(samples, "question", chunk_size=2)
    chunk = call.encode(0)
    assert chunk.request is None
    reply = call.decode(chunk, None)
    assert reply.info is None
    assert [r.error.code for r in reply.results if r.error] == [grpc.StatusCode.NOT_FOUND] * 2


def test_reply_concatenates_results_and_sums_timing() -> None:
    info = CallInfo(
        size=1, question_model=None, answer_model=None, template_version="t", timing=Timing(1, 2)
    )
    parts = [
        ScoreChunkReply([ScoreResult(id="a")], info),
        ScoreChunkReply([ScoreResult(id="b")], None),
        ScoreChunkReply([ScoreResult(id="c")], info),
    ]
    reply = ScoreCall.reply(parts)
    assert [r.id for r in reply.results] == ["a", "b", "c"]
    assert len(reply.calls) == 2
    assert reply.timing == Timing(2.0, 4.0)
    assert reply.template_version == "t"
    assert reply.question_model is None
    assert ScoreCall.reply([]) == ScoreReply(results=[])


def test_an_item_error_names_the_sample_by_its_place_in_the_callers_list(
    tmp_path: pathlib.Path,
) -> None:
    """The server counts the samples of the request it got: one chunk, without the samples
    that failed here. The caller reads the place in the list it passed."""
    samples = make_samples(7)
    samples[4].image = tmp_path / "missing.png"  # fails here: not sent
    call = ScoreCall.plan(samples, "question", chunk_size=4)
    chunk = call.encode(1)  # samples 4, 5, 6: the server gets 5 and 6 as its [0] and [1]
    assert chunk.request is not None and [s.id for s in chunk.request.samples] == ["5", "6"]
    response = pb.ScoreResponse(
        results=[
            pb.ScoreResult(id="5", question_score=1.0),
            pb.ScoreResult(id="6", error=pb.ItemError(code=3, message="samples[1].image: bad")),
        ]
    )
    missing, good, bad = call.decode(chunk, response).results
    assert missing.error is not None and missing.error.code == grpc.StatusCode.NOT_FOUND
    assert good.error is None
    assert bad.error is not None and bad.error.message == "samples[6].image: bad"


def test_a_sample_that_leaves_no_room_for_the_rest_of_the_message_fails_unsent() -> None:
    """One sample may take max_message_bytes less the request's other fields and framing
    (64 KiB): a 1,000,000-byte image fits 1 MiB by itself, not with that room."""
    near = Sample(id="near", image=b"x" * 1_000_000, turns=[Turn("Q?", "A.")])
    small = Sample(id="small", image=b"x" * 900_000, turns=[Turn("Q?", "A.")])
    encoded = encode_chunk([near, small], max_message_bytes=1 << 20)
    too_big, fits = encoded.local_errors
    assert too_big is not None and "more than one message carries" in too_big.message
    assert fits is None and [s.id for s in encoded.sent] == ["small"]


def test_a_chunk_may_weigh_exactly_its_byte_bound() -> None:
    assert split_chunks(["a", "b", "c"], 10, max_bytes=4, weigh=lambda _s: 2) == [
        ["a", "b"],
        ["c"],
    ]


def test_the_seed_range_is_checked_naming_the_argument() -> None:
    assert align_options(seed=2**64 - 1).decoding.seed == 2**64 - 1
    with pytest.raises(ValueError, match=r"^seed: 18446744073709551616 is not in 0\.\.2\*\*64-1"):
        align_options(seed=2**64)
