"""Sample <-> proto and proto results -> values."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from align2.client import ImageMarker, ItemError, ProtocolError, Sample, ScoreResult, Turn
from align2.client.convert import (
    call_info_from_proto,
    curate_result_from_proto,
    sample_from_proto,
    sample_to_proto,
    score_result_from_proto,
    status_code,
)
from align2.client.results import CandidateScores
from align2.v1 import curation_pb2 as pb


@pytest.mark.parametrize(
    ("marker", "value"),
    [
        (ImageMarker.START, pb.IMAGE_MARKER_START),
        (ImageMarker.END, pb.IMAGE_MARKER_END),
        (ImageMarker.NONE, pb.IMAGE_MARKER_NONE),
    ],
)
def test_sample_round_trip(marker: ImageMarker, value: int) -> None:
    sample = Sample(
        id="1",
        image=b"img",
        turns=[Turn("q1", "a1"), Turn("q2")],
        task="detail",
        image_marker=marker,
    )
    message = sample_to_proto(sample)
    assert message.image_marker == value
    assert [(t.question, t.answer) for t in message.turns] == [("q1", "a1"), ("q2", "")]
    assert sample_from_proto(message) == sample


def test_candidate_answers_round_trip() -> None:
    sample = Sample(
        id="1",
        image=b"img",
        turns=[Turn("q1", candidates=["a", "b"]), Turn("q2", "c")],  # a list is kept as a tuple
    )
    message = sample_to_proto(sample)
    assert [list(t.answer_candidates) for t in message.turns] == [["a", "b"], []]
    assert [t.answer for t in message.turns] == ["", "c"]
    assert sample_from_proto(message) == sample
    assert sample.turns[0].candidates == ("a", "b")
    with pytest.raises(TypeError, match="not one string"):
        Turn("q", candidates="ab")  # type: ignore[arg-type]


def test_candidate_scores_are_read_and_a_best_outside_them_is_a_protocol_error() -> None:
    message = pb.ScoreResult(
        id="1",
        answer_scores=[2.0, 0.5],
        answer_score=1.25,
        answer_truncated=[False, False],
        answer_candidates=[
            pb.CandidateScores(scores=[1.0, 2.0, 2.0], best=1, truncated=[False] * 3),
            pb.CandidateScores(scores=[0.5], best=0, truncated=[False]),
        ],
    )
    result = score_result_from_proto(message)
    assert result.answer_candidates == (
        CandidateScores((1.0, 2.0, 2.0), 1, (False, False, False)),
        CandidateScores((0.5,), 0, (False,)),
    )
    assert result.best_candidates == (1, 0)
    assert result.answer_candidates[0].best_score == 2.0
    assert result.to_dict()["answer_candidates"][0] == {
        "scores": [1.0, 2.0, 2.0],
        "best": 1,
        "truncated": [False, False, False],
    }
    message.answer_candidates[1].best = 1
    with pytest.raises(ProtocolError, match="best candidate 1 of 1"):
        score_result_from_proto(message)


def test_a_kept_curate_sample_keeps_each_turns_best_candidate() -> None:
    original = Sample(id="s", image=b"", turns=[Turn("q1", candidates=("a", "b")), Turn("q2", "c")])
    scores = pb.ScoreResult(
        id="s",
        answer_scores=[3.0, 1.0],
        answer_candidates=[
            pb.CandidateScores(scores=[2.0, 3.0], best=1),
            pb.CandidateScores(scores=[1.0], best=0),
        ],
    )
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, scores=scores)
    kept = curate_result_from_proto(response, original).sample
    assert kept is not None and kept.turns == [Turn("q1", "b"), Turn("q2", "c")]
    dropped = pb.CurateResponse(id="s", decision=pb.DECISION_DROPPED_ANSWER, scores=scores)
    assert curate_result_from_proto(dropped, original).sample is None
    del scores.answer_candidates[1]  # the server must say the best of every turn
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, scores=scores)
    with pytest.raises(ProtocolError, match="do not fit its 2 turns"):
        curate_result_from_proto(response, original)


def test_unspecified_or_unknown_marker_reads_as_start() -> None:
    assert sample_from_proto(pb.Sample(id="1")).image_marker is ImageMarker.START
    assert sample_from_proto(pb.Sample(id="1", image_marker=99)).image_marker is ImageMarker.START


def test_sample_to_proto_reads_a_path(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.png").write_bytes(b"png")
    sample = Sample(id="1", image=tmp_path / "a.png", turns=[], image_file="a.png")
    assert sample_to_proto(sample).image == b"png"


def test_question_only_result() -> None:
    message = pb.ScoreResult(id="1", question_score=0.5, question_truncated=True)
    assert score_result_from_proto(message) == ScoreResult(
        id="1", question_score=0.5, question_truncated=True
    )


def test_both_heads_result() -> None:
    message = pb.ScoreResult(
        id="1",
        question_score=-1.5,
        answer_scores=[1.0, 2.0],
        answer_score=1.5,
        answer_truncated=[False, True],
    )
    result = score_result_from_proto(message)
    assert result.answer_scores == (1.0, 2.0)
    assert result.answer_score == 1.5
    assert result.answer_truncated == (False, True)
    assert result.question_score == -1.5
    assert result.ok


def test_zero_scores_are_not_missing() -> None:
    result = score_result_from_proto(pb.ScoreResult(id="1", question_score=0.0, answer_score=0.0))
    assert (result.question_score, result.answer_score) == (0.0, 0.0)


def test_error_result_has_code_and_no_scores() -> None:
    message = pb.ScoreResult(
        id="1", question_score=3.0, error=pb.ItemError(code=8, message="samples[0].image: big")
    )
    result = score_result_from_proto(message)
    assert result == ScoreResult(
        id="1", error=ItemError(grpc.StatusCode.RESOURCE_EXHAUSTED, "samples[0].image: big")
    )
    assert not result.ok


def test_status_code_numbers() -> None:
    assert status_code(3) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(0) is grpc.StatusCode.OK
    assert status_code(999) is grpc.StatusCode.UNKNOWN


def test_call_info() -> None:
    response = pb.ScoreResponse(
        results=[pb.ScoreResult(id="1")],
        question_model=pb.ModelRef(name="q", model_id="m", revision="r", backend="transformers"),
        template_version="v2",
        timing=pb.Timing(queue_seconds=0.25, compute_seconds=0.5),
    )
    info = call_info_from_proto(response)
    assert info.size == 1
    assert info.question_model is not None and info.question_model.backend == "transformers"
    assert info.answer_model is None
    assert info.template_version == "v2"
    assert (info.timing.queue_seconds, info.timing.compute_seconds) == (0.25, 0.5)


def test_to_dict_is_json_ready() -> None:
    failed = ScoreResult(id="2", error=ItemError(grpc.StatusCode.NOT_FOUND, "image: gone"))
    assert failed.to_dict()["error"] == {"code": "NOT_FOUND", "message": "image: gone"}
    scored = ScoreResult(id="1", answer_scores=(1.0,), answer_truncated=(False,)).to_dict()
    assert scored["answer_scores"] == [1.0] and scored["error"] is None


ORIGINAL = Sample(id="s", image=b"", turns=[Turn("q?", "a.")])


def test_a_kept_decision_with_an_error_reads_as_an_error() -> None:
    """Never keep what carries an error. Fails on: removing the kept-with-error rule."""
    error = pb.ItemError(code=grpc.StatusCode.INTERNAL.value[0], message="boom")
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, error=error)
    result = curate_result_from_proto(response, ORIGINAL)
    assert (result.decision, result.sample) == ("error", None)


def test_a_kept_sample_is_the_aligned_one_when_aligned() -> None:
    """Fails on: ignoring ``aligned.sample`` (the restyle would be lost)."""
    rewrite = pb.Turn(question="q?", answer="A rewritten answer.")
    aligned = pb.AlignResult(
        id="s",
        turns=[
            pb.AlignedTurn(
                original=pb.Turn(question="q?", answer="a."), rewrite=rewrite, kept=pb.KEPT_REWRITE
            )
        ],
    )
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, aligned=aligned)
    result = curate_result_from_proto(response, ORIGINAL)
    assert result.sample is not None and result.sample.turns == [Turn("q?", "A rewritten answer.")]


def test_a_best_candidate_beyond_the_turns_candidates_is_a_protocol_error() -> None:
    """Fails on: ``b > len(...)`` for ``b >= len(...)`` in _best (then an IndexError)."""
    original = Sample(id="s", image=b"", turns=[Turn("q?", candidates=("a", "b"))])
    scores = pb.ScoreResult(
        id="s", answer_candidates=[pb.CandidateScores(scores=[1.0, 2.0, 3.0], best=2)]
    )
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, scores=scores)
    with pytest.raises(ProtocolError, match="do not fit"):
        curate_result_from_proto(response, original)


def test_an_absent_threshold_is_none_not_zero() -> None:
    """A decision without a question threshold (an error before selection) reports None,
    not 0.0. Fails on: HasField dropped for question_threshold."""
    error = pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="image: bad")
    response = pb.CurateResponse(id="s", decision=pb.DECISION_ERROR, error=error)
    assert curate_result_from_proto(response, ORIGINAL).question_threshold is None
