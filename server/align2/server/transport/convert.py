"""Proto <-> domain conversion for the server side of align2.v1.

Request fields that the domain cannot hold (an unknown enum number from a newer client)
become InvalidArgument naming the field and the valid values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from align2.client.convert import image_marker_from_proto, turn_from_proto, turn_to_proto
from align2.client.types import Sample, Turn
from align2.server.backends.base import ModelDescription
from align2.server.config import Config, LimitsConfig
from align2.server.core.align_types import (
    AlignCall,
    AlignedTurn,
    AlignOutcome,
    DecodingOptions,
    Kept,
    Parts,
    SampleAlignment,
)
from align2.server.core.curation import Curated, CurateOptions, Decision
from align2.server.core.priority import Priority
from align2.server.core.scoring import Head, SampleScore, ScoreCall, ScoreOutcome
from align2.server.core.selection_keys import MAX_NAME_LENGTH
from align2.server.core.templates import TEMPLATE_VERSION
from align2.server.errors import Align2Error, InvalidArgument
from align2.server.formats import as_float32
from align2.v1 import curation_pb2 as pb

_HEADS = {pb.HEAD_QUESTION: Head.QUESTION, pb.HEAD_ANSWER: Head.ANSWER}
_PRIORITIES = {
    pb.PRIORITY_UNSPECIFIED: Priority.BULK,
    pb.PRIORITY_BULK: Priority.BULK,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
}


ANSWER_MARGIN_SECONDS = 0.1
"""How long before a call's deadline its work's deadline falls (at most a tenth of the time
the call has): an item whose time runs out then ends as its own DEADLINE_EXCEEDED, in a
response (or, in Curate, a decision) the caller still receives, instead of the call
failing at its deadline with the answers owed lost."""


def deadline_from(time_remaining: float | None) -> float | None:
    """The deadline of a call's work, a time.monotonic() instant: the call's, less the
    answer margin (ANSWER_MARGIN_SECONDS, or a tenth of the time remaining if less)."""
    if time_remaining is None:
        return None
    margin = min(ANSWER_MARGIN_SECONDS, max(0.0, time_remaining) / 10)
    return time.monotonic() + time_remaining - margin


PRIORITY_METADATA = "x-align2-priority"
_PRIORITY_NAMES = {"interactive": Priority.INTERACTIVE, "bulk": Priority.BULK}


def priority_from_proto(
    value: int, metadata: str | None = None, field: str = "priority"
) -> Priority:
    """The request field (``field``, for its errors) decides; when unspecified, the
    ``x-align2-priority`` call metadata (interactive | bulk); else bulk."""
    if value == pb.PRIORITY_UNSPECIFIED and metadata:
        try:
            return _PRIORITY_NAMES[metadata.strip().lower()]
        except KeyError:
            raise InvalidArgument(
                f"{PRIORITY_METADATA} metadata: unknown value {metadata!r}; "
                "valid: interactive, bulk"
            ) from None
    try:
        return _PRIORITIES[value]
    except KeyError:
        raise InvalidArgument(
            f"{field}: unknown value {value}; valid: PRIORITY_INTERACTIVE, PRIORITY_BULK"
        ) from None


def metadata_value(metadata: object, key: str) -> str | None:
    """One value of a call's invocation metadata (None when absent)."""
    for k, v in metadata or ():  # type: ignore[attr-defined]
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode(errors="replace")
    return None


def heads_from_proto(values: Sequence[int]) -> frozenset[Head]:
    if not values:
        return frozenset(Head)
    if len(values) > len(_HEADS):  # before reading them: a 60 MB list is not copied
        raise InvalidArgument(
            f"heads: {len(values)} entries exceeds {len(_HEADS)}; name each head at most once"
        )
    heads = set()
    for i, value in enumerate(values):
        if value not in _HEADS:
            raise InvalidArgument(
                f"heads[{i}]: unknown head {value}; valid: HEAD_QUESTION (1), HEAD_ANSWER (2)"
            )
        heads.add(_HEADS[value])
    return frozenset(heads)


def samples_from_request(messages: Sequence[pb.Sample], limits: LimitsConfig) -> list[Sample]:
    """A request's samples (see :func:`sample_from_proto`)."""
    return [sample_from_proto(m, limits) for m in messages]


_UNREAD_TURN = Turn(question="", answer="")


def sample_from_proto(message: pb.Sample, limits: LimitsConfig) -> Sample:
    """One sample, without reading what the core refuses by its count alone: a sample over
    limits.max_turns gets one shared placeholder per turn, a turn over
    limits.max_candidates an empty text per candidate, so that the refusal still names the
    count. A 16 MB message of 8 million empty turns took 17 s of conversion on the event
    loop (and 0.9 GB) to be refused; now it costs a list of references.

    ``image_marker`` is not checked: the server does not use it (a value from a newer
    client fails nothing; the client's own reading maps it to START)."""
    count = len(message.turns)
    if count > limits.max_turns:
        turns = [_UNREAD_TURN] * count
    else:
        turns = [_turn_from_proto(t, limits.max_candidates) for t in message.turns]
    return Sample(
        id=message.id,
        image=bytes(message.image),
        turns=turns,
        task=message.task,
        image_marker=image_marker_from_proto(message.image_marker),
    )


def _turn_from_proto(message: pb.Turn, max_candidates: int) -> Turn:
    count = len(message.answer_candidates)
    if count <= max_candidates:
        return turn_from_proto(message)
    return Turn(question=message.question, answer=message.answer, candidates=("",) * count)


def score_call_from_proto(
    request: pb.ScoreRequest,
    limits: LimitsConfig,
    deadline: float | None,
    priority_metadata: str | None = None,
) -> ScoreCall:
    return ScoreCall(
        samples=samples_from_request(request.samples, limits),
        heads=heads_from_proto(request.heads),
        question_model=request.question_model,
        answer_model=request.answer_model,
        priority=priority_from_proto(request.priority, priority_metadata),
        deadline=deadline,
    )


_PARTS = {
    pb.REWRITE_PARTS_UNSPECIFIED: Parts.BOTH,
    pb.REWRITE_PARTS_QUESTIONS: Parts.QUESTIONS,
    pb.REWRITE_PARTS_ANSWERS: Parts.ANSWERS,
    pb.REWRITE_PARTS_BOTH: Parts.BOTH,
}
_KEPT = {Kept.ORIGINAL: pb.KEPT_ORIGINAL, Kept.REWRITE: pb.KEPT_REWRITE}


def parts_from_proto(value: int, field: str = "options.parts") -> Parts:
    try:
        return _PARTS[value]
    except KeyError:
        raise InvalidArgument(
            f"{field}: unknown value {value}; valid: REWRITE_PARTS_QUESTIONS, "
            "REWRITE_PARTS_ANSWERS, REWRITE_PARTS_BOTH"
        ) from None


def decoding_from_proto(message: pb.DecodingOptions) -> DecodingOptions:
    """Unset fields stay None (the server's defaults apply)."""
    return DecodingOptions(
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else None,
        temperature=(
            shortest_float32(message.temperature) if message.HasField("temperature") else None
        ),
        top_p=shortest_float32(message.top_p) if message.HasField("top_p") else None,
        seed=message.seed if message.HasField("seed") else None,
    )


def shortest_float32(value: float) -> float:
    """The shortest decimal that a proto ``float`` field's value rounds from: what the caller
    most likely wrote. A float32 0.01 reads as 0.009999999776482582, which a range check
    against 0.01 would refuse and an error message would show unlike the sent value."""
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        candidate = float(f"{value:.{digits}g}")
        with contextlib.suppress(OverflowError):  # rounded up past the float32 range
            if as_float32(candidate) == value:
                return candidate
    return value  # NaN: equal to nothing


def align_call_from_proto(
    request: pb.AlignRequest,
    limits: LimitsConfig,
    deadline: float | None,
    priority_metadata: str | None = None,
) -> AlignCall:
    return dataclasses.replace(
        align_settings_from_proto(request.options),
        samples=samples_from_request(request.samples, limits),
        priority=priority_from_proto(request.priority, priority_metadata),
        deadline=deadline,
    )


def align_settings_from_proto(options: pb.AlignOptions, field: str = "options") -> AlignCall:
    """The options of an Align call, as a call without samples; ``field``: where they
    stand in the request, for error messages (``options`` of AlignRequest)."""
    return AlignCall(
        samples=(),
        options_field=field,
        parts=parts_from_proto(options.parts, f"{field}.parts"),
        review=options.review if options.HasField("review") else None,
        decoding=decoding_from_proto(options.decoding),
        template=options.template,
    )


# -- Curate -------------------------------------------------------------------------------


def curate_options_from_proto(
    message: pb.CurateOptions, priority_metadata: str | None = None
) -> CurateOptions:
    def fraction(key: str) -> float | None:
        return getattr(message, key) if message.HasField(key) else None

    return CurateOptions(
        question_keep_fraction=fraction("question_keep_fraction"),
        answer_keep_fraction=fraction("answer_keep_fraction"),
        align=(
            align_settings_from_proto(message.align_options, "options.align_options")
            if message.align
            else None
        ),
        priority=priority_from_proto(message.priority, priority_metadata, "options.priority"),
        selection_key=message.selection_key,
        # Read in place: the core checks their sizes before it copies them (a map of
        # millions of entries costs seconds to copy on the event loop).
        question_thresholds=message.question_thresholds,
        answer_thresholds=message.answer_thresholds,
        min_window=message.min_window if message.HasField("min_window") else None,
        question_seed_scores=_ScoreLists(message.question_seed_scores),
        answer_seed_scores=_ScoreLists(message.answer_seed_scores),
    )


class _ScoreLists(Mapping[str, Sequence[float]]):
    """A seed map (task -> ScoreList) as task -> scores, read in place, without copying.
    Unlike the proto map, a missing task is a KeyError, not a new entry."""

    def __init__(self, lists: Mapping[str, pb.ScoreList]) -> None:
        self._lists = lists

    def __getitem__(self, task: str) -> Sequence[float]:
        if task not in self._lists:
            raise KeyError(task)
        return self._lists[task].scores

    def __iter__(self) -> Iterator[str]:
        return iter(self._lists)

    def __len__(self) -> int:
        return len(self._lists)


async def curate_requests_from_proto(
    requests: AsyncIterator[pb.CurateRequest],
    limits: LimitsConfig,
    priority_metadata: str | None = None,
) -> AsyncIterator[CurateOptions | Sample]:
    """The stream's messages in domain terms; a message with neither options nor a sample is
    refused naming its position."""
    position = 0
    async for request in requests:
        kind = request.WhichOneof("item")
        if kind == "options":
            yield curate_options_from_proto(request.options, priority_metadata)
        elif kind == "sample":
            yield sample_from_proto(request.sample, limits)
        else:
            raise InvalidArgument(f"item: message {position} carries neither options nor sample")
        del request  # not held while the next message is awaited (a seeded stream's options)
        position += 1


_DECISIONS = {
    Decision.KEPT: pb.DECISION_KEPT,
    Decision.KEPT_ALIGN_FAILED: pb.DECISION_KEPT_ALIGN_FAILED,
    Decision.DROPPED_QUESTION: pb.DECISION_DROPPED_QUESTION,
    Decision.DROPPED_ANSWER: pb.DECISION_DROPPED_ANSWER,
    Decision.ERROR: pb.DECISION_ERROR,
}


def curated_to_proto(curated: Curated) -> pb.CurateResponse:
    response = pb.CurateResponse(
        id=curated.id,
        sequence=curated.sequence,
        decision=_DECISIONS[curated.decision],
        scores=sample_score_to_proto(curated.scores),
        question_threshold=curated.question_threshold,
        answer_threshold=curated.answer_threshold,
        question_window_size=curated.question_window_size,
        answer_window_size=curated.answer_window_size,
        warm_up=curated.warm_up,
    )
    if curated.aligned is not None:
        response.aligned.CopyFrom(sample_alignment_to_proto(curated.aligned))
    if curated.error is not None:
        response.error.CopyFrom(item_error_to_proto(curated.error))
    return response


def aligned_turn_to_proto(turn: AlignedTurn) -> pb.AlignedTurn:
    return pb.AlignedTurn(
        original=turn_to_proto(turn.original),
        rewrite=turn_to_proto(turn.rewrite),
        kept=_KEPT[turn.kept],
        reason=turn.reason,
        margin=turn.margin,
    )


def sample_alignment_to_proto(result: SampleAlignment) -> pb.AlignResult:
    if result.error is not None:
        return pb.AlignResult(id=result.id, error=item_error_to_proto(result.error))
    return pb.AlignResult(id=result.id, turns=[aligned_turn_to_proto(t) for t in result.turns])


def align_response_to_proto(outcome: AlignOutcome) -> pb.AlignResponse:
    return pb.AlignResponse(
        results=[sample_alignment_to_proto(r) for r in outcome.results],
        model=model_ref_to_proto(outcome.model),
        template=pb.TemplateRef(name=outcome.template_name, sha256=outcome.template_sha256),
        tokens=pb.TokenCounts(
            prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens
        ),
        timing=pb.Timing(
            queue_seconds=outcome.queue_seconds, compute_seconds=outcome.compute_seconds
        ),
    )


def item_error_to_proto(error: Align2Error) -> pb.ItemError:
    return pb.ItemError(code=pb.ErrorCode.ValueType(int(error.code)), message=error.message)


def sample_score_to_proto(result: SampleScore) -> pb.ScoreResult:
    if result.error is not None:
        return pb.ScoreResult(id=result.id, error=item_error_to_proto(result.error))
    return pb.ScoreResult(
        id=result.id,
        question_score=result.question_score,
        question_truncated=result.question_truncated,
        answer_scores=result.answer_scores,
        answer_score=result.answer_score,
        answer_truncated=result.answer_truncated,
        answer_candidates=[
            pb.CandidateScores(scores=c.scores, best=c.best, truncated=c.truncated)
            for c in result.candidates
        ],
    )


def model_ref_to_proto(model: ModelDescription | None) -> pb.ModelRef | None:
    if model is None:
        return None
    return pb.ModelRef(
        name=model.name,
        model_id=model.model_id,
        revision=model.revision,
        backend=model.backend,
        settings=model.settings,
    )


def score_response_to_proto(outcome: ScoreOutcome) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        results=[sample_score_to_proto(r) for r in outcome.results],
        question_model=model_ref_to_proto(outcome.question_model),
        answer_model=model_ref_to_proto(outcome.answer_model),
        template_version=outcome.template_version,
        timing=pb.Timing(
            queue_seconds=outcome.queue_seconds, compute_seconds=outcome.compute_seconds
        ),
    )


def model_info_to_proto(model: ModelDescription, role: str) -> pb.ModelInfo:
    return pb.ModelInfo(
        ref=model_ref_to_proto(model),
        role=role,
        family=model.family,
        dtype=model.dtype,
        device=model.device,
        max_length=model.max_length,
        image_tokens=model.image_tokens,
        image_mode=model.image_mode,
    )


def server_info_to_proto(
    config: Config,
    models: list[tuple[ModelDescription, str]],
    services: list[str],
    version: str,
    align_templates: Sequence[tuple[str, str]] = (),
) -> pb.GetServerInfoResponse:
    """What GetServerInfo reports: every limit and batching setting comes from config."""
    limits, batching = config.limits, config.batching
    return pb.GetServerInfoResponse(
        version=version,
        models=[model_info_to_proto(m, role) for m, role in models],
        limits=pb.Limits(
            max_samples_per_call=limits.max_samples_per_call,
            max_message_bytes=limits.max_message_bytes,
            max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_turns=limits.max_turns,
            max_candidates=limits.max_candidates,
            max_text_tokens=limits.max_text_tokens,
            truncation=limits.truncation,
            max_queue_items=batching.max_queue_items,
            max_llm_inflight=config.align.max_inflight_items,
            max_streams=limits.max_streams,
            max_inflight_bytes=limits.max_inflight_bytes,
            max_stream_inflight=limits.max_stream_inflight if config.curate_enabled else 0,
            max_new_tokens=config.align.max_new_tokens_limit,
            selection_window=config.curate.window,
            max_selection_keys=config.curate.max_selection_keys,
            max_seed_scores=config.curate.max_seed_scores,
            max_task_types=config.curate.max_task_types,
            max_text_bytes=limits.max_text_bytes,
            max_decoded_image_bytes=limits.max_decoded_image_bytes,
            max_stored_scores=config.curate.max_stored_scores,
            max_name_length=MAX_NAME_LENGTH,
        ),
        batching=pb.Batching(
            max_batch_size=batching.max_batch_size,
            max_batch_tokens=batching.max_batch_tokens,
            max_delay_seconds=batching.max_delay_ms / 1000.0,
        ),
        template_version=TEMPLATE_VERSION,
        services=services,
        defaults=_defaults_to_proto(config),
        align_templates=[pb.TemplateRef(name=n, sha256=h) for n, h in align_templates],
    )


def _defaults_to_proto(config: Config) -> pb.Defaults:
    align, curate = config.align, config.curate
    decoding = align.decoding
    return pb.Defaults(
        decoding=pb.DecodingOptions(
            max_new_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=decoding.seed,
        ),
        review=align.review,
        template=align.template,
        question_keep_fraction=curate.question_keep_fraction,
        answer_keep_fraction=curate.answer_keep_fraction,
        min_window=curate.min_window,
        warm_up_idle_ms=curate.warm_up_idle_ms,
        selection_key_idle_seconds=curate.selection_key_idle_seconds,
    )
