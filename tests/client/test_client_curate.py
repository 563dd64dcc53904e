"""The client's Curate stream bookkeeping: decisions out of order, repeated ids, local
failures, and what is left unanswered."""

from __future__ import annotations

import inspect
import pathlib

import grpc
import pytest

from align2.client.calls import align_options
from align2.client.curate import CurateArgs, CurateStream, selection_options
from align2.client.results import ProtocolError
from align2.client.types import Sample, Turn
from align2.v1 import curation_pb2 as pb


def sample(sample_id: str, answer: str) -> Sample:
    return Sample(id=sample_id, image=b"png", turns=[Turn("What is it?", answer)])


def decision(sequence: int, sample_id: str, kept: bool) -> pb.CurateResponse:
    return pb.CurateResponse(
        id=sample_id,
        sequence=sequence,
        decision=pb.DECISION_KEPT if kept else pb.DECISION_DROPPED_QUESTION,
        scores=pb.ScoreResult(id=sample_id, question_score=1.0),
    )


def test_decisions_out_of_order_on_repeated_ids_go_to_their_own_samples() -> None:
    stream = CurateStream.plan()
    first, second = sample("img-7", "A cat."), sample("img-7", "A dog.")
    requests = list(stream.requests([first, second]))
    assert requests[0].WhichOneof("item") == "options"
    assert [r.sample.id for r in requests[1:]] == ["img-7", "img-7"]  # the caller's ids
    # The server decides the second one (sequence 1) first.
    late = stream.decode(decision(1, "img-7", kept=True))
    early = stream.decode(decision(0, "img-7", kept=False))
    assert late.sample == second and late.id == "img-7" and late.scores.id == "img-7"
    assert early.sample is None and early.decision == "dropped_question"
    assert (early.index, late.index) == (0, 1)  # their places in the caller's samples
    assert stream.finish() == [] and stream.unanswered == []


def test_an_unknown_or_repeated_answer_is_a_protocol_error() -> None:
    stream = CurateStream.plan()
    list(stream.requests([sample("a", "x")]))
    stream.decode(decision(0, "a", kept=True))
    with pytest.raises(ProtocolError, match=r"sequence 0 .* not outstanding"):
        stream.decode(decision(0, "a", kept=True))
    with pytest.raises(ProtocolError, match=r"sequence 7 .* not outstanding"):
        stream.decode(decision(7, "a", kept=True))


def test_unanswered_samples_are_listed_and_fail_a_finished_stream() -> None:
    stream = CurateStream.plan()
    list(stream.requests([sample("a", "x"), sample("b", "y")]))
    assert stream.unanswered == ["a", "b"]
    with pytest.raises(ProtocolError, match="2 samples unanswered"):
        stream.finish()


def test_an_unreadable_image_is_a_local_error_result_and_is_not_sent(
    tmp_path: pathlib.Path,
) -> None:
    stream = CurateStream.plan()
    missing = Sample(id="m", image=tmp_path / "gone.png", turns=[Turn("Q?", "A.")])
    requests = list(stream.requests([missing]))
    assert len(requests) == 1  # the options only
    [local] = stream.local_results()
    assert local.decision == "error" and local.error is not None
    assert local.error.code == grpc.StatusCode.NOT_FOUND


def test_a_failing_producer_ends_the_requests_normally_and_is_kept() -> None:
    def produce():  # type: ignore[no-untyped-def]
        yield sample("a", "x")
        raise RuntimeError("broke")

    stream = CurateStream.plan()
    requests = list(stream.requests(produce()))
    assert len(requests) == 2
    assert isinstance(stream.producer_error, RuntimeError)


@pytest.mark.parametrize("fraction", [0.0, -1.0, 1.01])
def test_fractions_outside_zero_one_are_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"answer_keep_fraction: .* not in \(0, 1\]"):
        CurateStream.plan(answer_keep_fraction=fraction)


def test_the_typed_curate_arguments_are_the_plans() -> None:
    # CurateArgs types the clients' **options for type checkers; it must not drift from
    # CurateStream.plan and align_options, which hold the defaults (annotations as written).
    plan = inspect.signature(CurateStream.plan).parameters
    align = inspect.signature(align_options).parameters
    written = {name: p.annotation for name, p in plan.items() if name != "align_settings"}
    written |= {name: p.annotation for name, p in align.items()}
    typed = {k: getattr(v, "__forward_arg__", v) for k, v in CurateArgs.__annotations__.items()}
    assert typed == written


def test_a_selection_key_of_exactly_256_characters_is_sent() -> None:
    """As the server checks it. Fails on: ``>=`` for ``>``."""
    assert selection_options(selection_key="k" * 256).selection_key == "k" * 256
    names_the_limit = r"257 characters exceeds 256 \(the server's limits.max_name_length\)"
    with pytest.raises(ValueError, match=names_the_limit):
        selection_options(selection_key="k" * 257)
