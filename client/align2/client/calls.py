"""Request building, chunking and response parsing, shared by the sync and asyncio clients.

A client call is planned once (arguments validated before any I/O), split into chunks of at
most ``chunk_size`` samples (one RPC each), and each chunk is encoded, sent and decoded on
its own; only the sending differs between :mod:`align2.client.sync` and
:mod:`align2.client.aio`. Each unary RPC (Score, Align) is one plan class here and one small
method per client.

An image that can't be read becomes a per-item error of that sample, which is then not sent:
one missing file must not fail its chunk-mates (the same rule the server follows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from align2.client.convert import (
    align_call_info_from_proto,
    align_result_from_proto,
    call_info_from_proto,
    sample_to_proto,
    score_result_from_proto,
)
from align2.client.results import (
    AlignCallInfo,
    AlignReply,
    AlignResult,
    CallInfo,
    ItemError,
    ProtocolError,
    ScoreReply,
    ScoreResult,
)
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb

HEADS: Mapping[str, pb.Head.ValueType] = {"question": pb.HEAD_QUESTION, "answer": pb.HEAD_ANSWER}
DEFAULT_HEADS = ("question", "answer")
PRIORITIES: Mapping[str, pb.Priority.ValueType] = {
    "interactive": pb.PRIORITY_INTERACTIVE,
    "bulk": pb.PRIORITY_BULK,
}
# The server's default ServerInfo.limits.max_samples_per_call.
DEFAULT_CHUNK_SIZE = 64

R = TypeVar("R")


def parse_heads(heads: str | Iterable[str]) -> tuple[pb.Head.ValueType, ...]:
    """Head names -> proto values, in the given order, without repeats.

    A single string names one head. Raises ValueError listing the valid names for an unknown
    one, and for none at all (the proto reads "no heads" as "both"; ask for that explicitly).
    """
    names = [heads] if isinstance(heads, str) else list(heads)
    unknown = [name for name in names if name not in HEADS]
    if unknown:
        raise ValueError(f"heads: unknown {unknown}; valid heads are {sorted(HEADS)}")
    if not names:
        raise ValueError(f"heads: empty; valid heads are {sorted(HEADS)}")
    return tuple(dict.fromkeys(HEADS[name] for name in names))


def parse_priority(priority: str | None) -> pb.Priority.ValueType:
    """None -> the server's default class; otherwise one of :data:`PRIORITIES`."""
    if priority is None:
        return pb.PRIORITY_UNSPECIFIED
    if priority not in PRIORITIES:
        raise ValueError(f"priority: unknown {priority!r}; valid are {sorted(PRIORITIES)}")
    return PRIORITIES[priority]


def split_chunks(samples: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    """Consecutive slices of at most ``size``; concatenated they are ``samples``."""
    if size < 1:
        raise ValueError(f"chunk_size: {size} is not positive")
    return [samples[i : i + size] for i in range(0, len(samples), size)]


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk ready to send: the samples that encoded, and what happened to each input."""

    ids: list[str]  # one per input sample of the chunk
    local_errors: list[ItemError | None]  # one per input; set: not sent, failed here
    sent: list[pb.Sample]  # the samples without a local error, in order


def encode_chunk(samples: Sequence[Sample]) -> EncodedChunk:
    """Encode samples, reading lazy image paths now; unreadable images become item errors."""
    errors: list[ItemError | None] = []
    sent: list[pb.Sample] = []
    for sample in samples:
        try:
            sent.append(sample_to_proto(sample))
            errors.append(None)
        except OSError as error:
            errors.append(_image_read_error(error))
    return EncodedChunk(ids=[s.id for s in samples], local_errors=errors, sent=sent)


def merge_results(
    chunk: EncodedChunk,
    received: Sequence[R],
    received_ids: Sequence[str],
    failed: Callable[[str, ItemError], R],
) -> list[R]:
    """Results of a chunk in input order: the server's for the samples sent, ``failed(id,
    error)`` for the others. Raises ProtocolError unless the server answered one result per
    sent sample, in request order."""
    expected = [s.id for s in chunk.sent]
    if list(received_ids) != expected:
        raise ProtocolError(
            f"expected {len(expected)} results with the request's ids in order, got "
            f"{len(received_ids)} (first ids: {list(received_ids)[:3]})"
        )
    answers = iter(received)
    return [
        next(answers) if error is None else failed(sample_id, error)
        for sample_id, error in zip(chunk.ids, chunk.local_errors, strict=True)
    ]


def _image_read_error(error: OSError) -> ItemError:
    code = {
        FileNotFoundError: grpc.StatusCode.NOT_FOUND,
        PermissionError: grpc.StatusCode.PERMISSION_DENIED,
    }.get(type(error), grpc.StatusCode.FAILED_PRECONDITION)
    return ItemError(code=code, message=f"image: cannot read {error.filename}: {error.strerror}")


# ---------------------------------------------------------------------------------------
# Score


@dataclass(frozen=True)
class ScoreChunk:
    encoded: EncodedChunk
    request: pb.ScoreRequest | None  # None: nothing to send (every sample failed locally)


@dataclass(frozen=True)
class ScoreChunkReply:
    results: list[ScoreResult]
    info: CallInfo | None  # None when no RPC was made


@dataclass(frozen=True)
class ScoreCall:
    """One ``score`` call, planned: validated arguments and the chunks to send."""

    chunks: list[Sequence[Sample]]
    heads: tuple[pb.Head.ValueType, ...]
    priority: pb.Priority.ValueType
    question_model: str
    answer_model: str

    @classmethod
    def plan(
        cls,
        samples: Sequence[Sample],
        heads: str | Iterable[str],
        *,
        chunk_size: int,
        priority: str | None = None,
        question_model: str | None = None,
        answer_model: str | None = None,
    ) -> ScoreCall:
        """Validate everything before any image is read or any RPC is made."""
        return cls(
            chunks=split_chunks(samples, chunk_size),
            heads=parse_heads(heads),
            priority=parse_priority(priority),
            question_model=question_model or "",
            answer_model=answer_model or "",
        )

    def encode(self, index: int) -> ScoreChunk:
        """Chunk ``index`` as a request. Reads its images (blocking file I/O)."""
        encoded = encode_chunk(self.chunks[index])
        if not encoded.sent:
            return ScoreChunk(encoded, None)
        request = pb.ScoreRequest(
            samples=encoded.sent,
            heads=self.heads,
            priority=self.priority,
            question_model=self.question_model,
            answer_model=self.answer_model,
        )
        return ScoreChunk(encoded, request)

    @staticmethod
    def decode(chunk: ScoreChunk, response: pb.ScoreResponse | None) -> ScoreChunkReply:
        """One result per input sample of the chunk, same order (ProtocolError otherwise)."""
        if response is None:
            return ScoreChunkReply(merge_results(chunk.encoded, [], [], _score_failed), None)
        received = [score_result_from_proto(r) for r in response.results]
        results = merge_results(
            chunk.encoded, received, [r.id for r in response.results], _score_failed
        )
        return ScoreChunkReply(results, call_info_from_proto(response))

    @staticmethod
    def reply(parts: Sequence[ScoreChunkReply]) -> ScoreReply:
        """Chunk replies (in chunk order) -> one reply, results concatenated in input order."""
        return ScoreReply(
            results=[result for part in parts for result in part.results],
            calls=tuple(part.info for part in parts if part.info is not None),
        )


def _score_failed(sample_id: str, error: ItemError) -> ScoreResult:
    return ScoreResult(id=sample_id, error=error)


# ---------------------------------------------------------------------------------------
# Align

PARTS: Mapping[str, pb.RewriteParts.ValueType] = {
    "questions": pb.REWRITE_PARTS_QUESTIONS,
    "answers": pb.REWRITE_PARTS_ANSWERS,
    "both": pb.REWRITE_PARTS_BOTH,
}


def align_options(
    *,
    parts: str = "both",
    review: bool = True,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    template: str | None = None,
) -> pb.AlignOptions:
    """Validated Align options; None leaves a setting to the server. ValueError names the
    argument and its valid values."""
    if parts not in PARTS:
        raise ValueError(f"parts: unknown {parts!r}; valid are {sorted(PARTS)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens} is not positive")
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"temperature: {temperature} is not >= 0 (0 is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: {top_p} is not in (0, 1]")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed: {seed} is not in 0..2**64-1")
    return pb.AlignOptions(
        parts=PARTS[parts],
        review=review,
        decoding=pb.DecodingOptions(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        ),
        template=template or "",
    )


@dataclass(frozen=True)
class AlignChunk:
    samples: Sequence[Sample]  # the chunk as given (to rebuild each kept sample)
    encoded: EncodedChunk
    request: pb.AlignRequest | None  # None: nothing to send (every sample failed locally)


@dataclass(frozen=True)
class AlignChunkReply:
    results: list[AlignResult]
    info: AlignCallInfo | None  # None when no RPC was made


@dataclass(frozen=True)
class AlignCall:
    """One ``align`` call, planned: validated options and the chunks to send."""

    chunks: list[Sequence[Sample]]
    options: pb.AlignOptions
    priority: pb.Priority.ValueType

    @classmethod
    def plan(
        cls,
        samples: Sequence[Sample],
        *,
        chunk_size: int,
        priority: str | None = None,
        **options: Any,
    ) -> AlignCall:
        """Validate everything (``options`` as :func:`align_options`) before any I/O."""
        return cls(
            chunks=split_chunks(samples, chunk_size),
            options=align_options(**options),
            priority=parse_priority(priority),
        )

    def encode(self, index: int) -> AlignChunk:
        """Chunk ``index`` as a request. Reads its images (blocking file I/O)."""
        samples = self.chunks[index]
        encoded = encode_chunk(samples)
        request = None
        if encoded.sent:
            request = pb.AlignRequest(
                samples=encoded.sent, options=self.options, priority=self.priority
            )
        return AlignChunk(samples, encoded, request)

    @staticmethod
    def decode(chunk: AlignChunk, response: pb.AlignResponse | None) -> AlignChunkReply:
        """One result per input sample of the chunk, same order (ProtocolError otherwise)."""
        messages = [] if response is None else list(response.results)
        merged = merge_results(
            chunk.encoded, messages, [m.id for m in messages], lambda _, error: error
        )
        results = [
            AlignResult(id=sample.id, error=item)
            if isinstance(item, ItemError)
            else align_result_from_proto(item, sample)
            for sample, item in zip(chunk.samples, merged, strict=True)
        ]
        info = None if response is None else align_call_info_from_proto(response)
        return AlignChunkReply(results, info)

    @staticmethod
    def reply(parts: Sequence[AlignChunkReply]) -> AlignReply:
        """Chunk replies (in chunk order) -> one reply, results concatenated in input order."""
        return AlignReply(
            results=[result for part in parts for result in part.results],
            calls=tuple(part.info for part in parts if part.info is not None),
        )
