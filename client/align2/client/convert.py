"""Conversion between the domain types and the align2.v1 proto messages.

Both sides use it: the client to build requests and read replies, the server transport to
turn request samples into :class:`Sample` (``sample_from_proto``). Importing it has no side
effects beyond building constant lookup tables.
"""

from __future__ import annotations

import dataclasses

import grpc

from align2.client.results import (
    AlignCallInfo,
    AlignedTurn,
    AlignResult,
    CallInfo,
    CandidateScores,
    CurateResult,
    ItemError,
    ModelRef,
    ProtocolError,
    ScoreResult,
    TemplateRef,
    Timing,
    TokenCounts,
)
from align2.client.types import ImageMarker, Sample, Turn, choose_candidates
from align2.v1 import curation_pb2 as pb

_MARKER_TO_PROTO: dict[ImageMarker, pb.ImageMarker.ValueType] = {
    ImageMarker.START: pb.IMAGE_MARKER_START,
    ImageMarker.END: pb.IMAGE_MARKER_END,
    ImageMarker.NONE: pb.IMAGE_MARKER_NONE,
}
_MARKER_FROM_PROTO: dict[pb.ImageMarker.ValueType, ImageMarker] = {
    v: k for k, v in _MARKER_TO_PROTO.items()
}
# The proto documents UNSPECIFIED as START (the LLaVA default).
_MARKER_FROM_PROTO[pb.IMAGE_MARKER_UNSPECIFIED] = ImageMarker.START

_STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def image_marker_to_proto(marker: ImageMarker) -> pb.ImageMarker.ValueType:
    return _MARKER_TO_PROTO[marker]


def image_marker_from_proto(value: pb.ImageMarker.ValueType) -> ImageMarker:
    """Unknown values (a newer server) read as START, like UNSPECIFIED."""
    return _MARKER_FROM_PROTO.get(value, ImageMarker.START)


def sample_to_proto(sample: Sample) -> pb.Sample:
    """Reads the image now when ``sample.image`` is a path (raises ``OSError`` if it can't)."""
    return pb.Sample(
        id=sample.id,
        image=sample.image_bytes(),
        turns=[turn_to_proto(t) for t in sample.turns],
        task=sample.task,
        image_marker=image_marker_to_proto(sample.image_marker),
    )


def turn_to_proto(turn: Turn) -> pb.Turn:
    return pb.Turn(question=turn.question, answer=turn.answer, answer_candidates=turn.candidates)


def sample_from_proto(message: pb.Sample) -> Sample:
    """A :class:`Sample` with the image as bytes; ``image_file`` and ``extra`` stay empty."""
    return Sample(
        id=message.id,
        image=bytes(message.image),
        turns=[turn_from_proto(t) for t in message.turns],
        task=message.task,
        image_marker=image_marker_from_proto(message.image_marker),
    )


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number; UNKNOWN for numbers gRPC doesn't define."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def item_error_from_proto(message: pb.ItemError) -> ItemError:
    return ItemError(code=status_code(message.code), message=message.message)


def score_result_from_proto(message: pb.ScoreResult) -> ScoreResult:
    if message.HasField("error"):
        # The contract: no scores with an error; don't surface partial ones.
        return ScoreResult(id=message.id, error=item_error_from_proto(message.error))
    return ScoreResult(
        id=message.id,
        question_score=message.question_score if message.HasField("question_score") else None,
        answer_scores=tuple(message.answer_scores),
        answer_score=message.answer_score if message.HasField("answer_score") else None,
        question_truncated=message.question_truncated,
        answer_truncated=tuple(message.answer_truncated),
        answer_candidates=tuple(
            candidate_scores_from_proto(c, message.id) for c in message.answer_candidates
        ),
    )


def candidate_scores_from_proto(message: pb.CandidateScores, sample_id: str) -> CandidateScores:
    """ProtocolError when ``best`` is not one of the candidates."""
    if message.best >= len(message.scores):
        raise ProtocolError(
            f"sample {sample_id!r}: best candidate {message.best} of {len(message.scores)}"
        )
    return CandidateScores(
        scores=tuple(message.scores), best=message.best, truncated=tuple(message.truncated)
    )


def model_ref_from_proto(message: pb.ModelRef) -> ModelRef:
    return ModelRef(
        name=message.name,
        model_id=message.model_id,
        revision=message.revision,
        backend=message.backend,
        settings=message.settings,
    )


def timing_from_proto(message: pb.Timing) -> Timing:
    return Timing(queue_seconds=message.queue_seconds, compute_seconds=message.compute_seconds)


def call_info_from_proto(response: pb.ScoreResponse) -> CallInfo:
    question_model = None
    if response.HasField("question_model"):
        question_model = model_ref_from_proto(response.question_model)
    answer_model = None
    if response.HasField("answer_model"):
        answer_model = model_ref_from_proto(response.answer_model)
    return CallInfo(
        size=len(response.results),
        question_model=question_model,
        answer_model=answer_model,
        template_version=response.template_version,
        timing=timing_from_proto(response.timing),
    )


_KEPT_NAMES: dict[int, str] = {pb.KEPT_ORIGINAL: "original", pb.KEPT_REWRITE: "rewrite"}


def turn_from_proto(message: pb.Turn) -> Turn:
    return Turn(
        question=message.question,
        answer=message.answer,
        candidates=tuple(message.answer_candidates),
    )


def aligned_turn_from_proto(message: pb.AlignedTurn) -> AlignedTurn:
    """An unknown ``kept`` (a newer server) reads as "original": never use a rewrite the
    server did not say it kept."""
    return AlignedTurn(
        original=turn_from_proto(message.original),
        rewrite=turn_from_proto(message.rewrite),
        kept=_KEPT_NAMES.get(message.kept, "original"),
        reason=message.reason,
        margin=message.margin if message.HasField("margin") else None,
    )


def align_result_from_proto(message: pb.AlignResult, original: Sample) -> AlignResult:
    """The result for ``original`` (the sample as the caller sent it), with ``sample``
    rebuilt from it and the kept turns. ProtocolError when the turn count differs."""
    if message.HasField("error"):
        return AlignResult(id=message.id, error=item_error_from_proto(message.error))
    turns = tuple(aligned_turn_from_proto(t) for t in message.turns)
    if len(turns) != len(original.turns):
        raise ProtocolError(
            f"sample {message.id!r}: {len(turns)} aligned turns for {len(original.turns)}"
        )
    kept = dataclasses.replace(original, turns=[t.turn for t in turns])
    return AlignResult(id=message.id, turns=turns, sample=kept)


def align_call_info_from_proto(response: pb.AlignResponse) -> AlignCallInfo:
    model = model_ref_from_proto(response.model) if response.HasField("model") else None
    template = None
    if response.HasField("template"):
        template = TemplateRef(name=response.template.name, sha256=response.template.sha256)
    return AlignCallInfo(
        size=len(response.results),
        model=model,
        template=template,
        tokens=TokenCounts(
            prompt_tokens=response.tokens.prompt_tokens,
            generated_tokens=response.tokens.generated_tokens,
        ),
        timing=timing_from_proto(response.timing),
    )


_DECISION_NAMES: dict[int, str] = {
    pb.DECISION_KEPT: "kept",
    pb.DECISION_KEPT_ALIGN_FAILED: "kept",  # aligned.error says why it is not restyled
    pb.DECISION_DROPPED_QUESTION: "dropped_question",
    pb.DECISION_DROPPED_ANSWER: "dropped_answer",
    pb.DECISION_ERROR: "error",
}


def curate_result_from_proto(message: pb.CurateResponse, original: Sample) -> CurateResult:
    """The decision on ``original`` (the sample as the caller gave it, matched by the
    response's sequence number). An unknown decision (a newer server) or
    an error reads as "error": never keep what the server did not say it kept. A kept
    sample whose alignment failed is kept as the original (``aligned.error`` says why). A
    kept sample with candidate answers is kept with each turn's best candidate (as the
    server aligned it)."""
    error = item_error_from_proto(message.error) if message.HasField("error") else None
    decision = _DECISION_NAMES.get(message.decision, "error")
    if decision != "error" and error is not None:
        decision = "error"
    if decision == "error" and error is None:
        error = ItemError(grpc.StatusCode.UNKNOWN, f"decision: unknown value {message.decision}")
    aligned = None
    if message.HasField("aligned"):
        aligned = dataclasses.replace(
            align_result_from_proto(message.aligned, original), id=original.id
        )
    scores = dataclasses.replace(score_result_from_proto(message.scores), id=original.id)
    kept = None
    if decision == "kept":
        if aligned is not None and aligned.sample is not None:
            kept = aligned.sample  # one answer per turn: the server aligned the best
        else:
            kept = original
            if original.has_candidates:
                kept = choose_candidates(original, _best(scores, original))
    return CurateResult(
        id=original.id,
        decision=decision,
        scores=scores,
        question_threshold=(
            message.question_threshold if message.HasField("question_threshold") else None
        ),
        answer_threshold=message.answer_threshold if message.HasField("answer_threshold") else None,
        aligned=aligned,
        error=error,
        sample=kept,
        question_window_size=message.question_window_size,
        answer_window_size=message.answer_window_size,
        warm_up=message.warm_up,
    )


def _best(scores: ScoreResult, sample: Sample) -> tuple[int, ...]:
    """The best candidate of each turn of a kept ``sample``; ProtocolError when the scores
    do not say, one per turn and within the turn's candidates."""
    best, turns = scores.best_candidates, sample.turns
    if len(best) != len(turns) or any(
        b >= len(t.answers) for b, t in zip(best, turns, strict=True)
    ):
        raise ProtocolError(
            f"sample {sample.id!r}: kept with candidate answers, and best candidates "
            f"{list(best)} do not fit its {len(turns)} turns"
        )
    return best
