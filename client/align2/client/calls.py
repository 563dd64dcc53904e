"""Request building, chunking and response parsing, shared by the sync and asyncio clients.

A client call is planned once (arguments validated before any I/O), split into chunks of at
most ``chunk_size`` samples (one RPC each), and each chunk is encoded, sent and decoded on
its own; only the sending differs between :mod:`align2.client.sync` and
:mod:`align2.client.aio`. Each unary RPC (Score, Align) is one :class:`ChunkedCall` subclass
here and one small method per client.

An image that can't be read becomes a per-item error of that sample, which is then not sent:
one missing file must not fail its chunk-mates (the same rule the server follows).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

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
ResultT = TypeVar("ResultT")
InfoT = TypeVar("InfoT")
ReplyT = TypeVar("ReplyT")


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


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The client's largest request message (servers announce their own in
GetServerInfoResponse.limits.max_message_bytes; 64 MiB by default too)."""


def split_chunks(
    items: Sequence[R],
    size: int,
    *,
    max_bytes: int | None = None,
    weigh: Callable[[R], int] | None = None,
) -> list[Sequence[R]]:
    """Consecutive slices of at most ``size`` items and, with ``weigh``, at most
    ``max_bytes`` of their weights (an item heavier than that alone); concatenated they
    are ``items``."""
    if size < 1:
        raise ValueError(f"chunk_size: {size} is not positive")
    if weigh is None or max_bytes is None:
        return [items[i : i + size] for i in range(0, len(items), size)]
    chunks: list[Sequence[R]] = []
    start, total = 0, 0
    for index, item in enumerate(items):
        weight = weigh(item)
        if index > start and (index - start >= size or total + weight > max_bytes):
            chunks.append(items[start:index])
            start, total = index, 0
        total += weight
    if start < len(items):
        chunks.append(items[start:])
    return chunks


def estimated_bytes(sample: Sample) -> int:
    """About what ``sample`` adds to a request: its image (bytes, or the file's size; not
    read) and its texts."""
    if isinstance(sample.image, bytes | bytearray | memoryview):
        image = len(sample.image)
    else:
        try:
            image = os.stat(sample.image).st_size
        except OSError:  # reported when the chunk is encoded
            image = 0
    texts = sum(len(t.question) + len(t.answer) + sum(map(len, t.candidates)) for t in sample.turns)
    return image + texts


def sample_chunks(
    samples: Sequence[Sample], size: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[Sequence[Sample]]:
    """:func:`split_chunks` of samples: at most ``size``, and about half of the client's
    largest message in images and texts (a chunk of large images becomes more calls
    instead of one refused as too large)."""
    return split_chunks(samples, size, max_bytes=max_message_bytes // 2, weigh=estimated_bytes)


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk ready to send: the samples that encoded, and what happened to each input."""

    ids: list[str]  # one per input sample of the chunk
    local_errors: list[ItemError | None]  # one per input; set: not sent, failed here
    sent: list[pb.Sample]  # the samples without a local error, in order


MESSAGE_OVERHEAD = 64 * 1024
"""Room left in a message for the request's other fields and its framing."""


def encode_chunk(
    samples: Sequence[Sample], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> EncodedChunk:
    """Encode samples, reading lazy image paths now. A sample that cannot be sent (its image
    unreadable, a text UTF-8 cannot encode, larger than ``max_message_bytes``) is an item
    error of its own."""
    errors: list[ItemError | None] = []
    sent: list[pb.Sample] = []
    for sample in samples:
        oversized = _oversized_image(sample, max_message_bytes - MESSAGE_OVERHEAD)
        if oversized is not None:
            errors.append(oversized)
            continue
        try:
            message = sample_to_proto(sample)
        except OSError as error:
            errors.append(_image_read_error(error))
            continue
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in a JSON file)
            errors.append(_text_error(sample))
            continue
        size = message.ByteSize()
        if size > max_message_bytes - MESSAGE_OVERHEAD:
            errors.append(
                ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT,
                    message=f"sample: {size} bytes encoded, more than one message carries "
                    f"(the client's max_message_bytes {max_message_bytes}); not sent",
                )
            )
            continue
        sent.append(message)
        errors.append(None)
    return EncodedChunk(ids=[s.id for s in samples], local_errors=errors, sent=sent)


def _oversized_image(sample: Sample, room: int) -> ItemError | None:
    """The error of an image file too large for a message, found from its size, before it
    is read (a file of several GB would take that much memory, and protobuf refuses to
    encode a message of 2 GiB or more); None when it fits or is not a file."""
    if isinstance(sample.image, bytes | bytearray | memoryview):
        return None
    try:
        size = os.stat(sample.image).st_size
    except OSError:  # reported when it is read
        return None
    if size <= room:
        return None
    return ItemError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message=f"image: {os.fspath(sample.image)} is {size} bytes, more than one message "
        f"carries (the client's max_message_bytes {room + MESSAGE_OVERHEAD}); not read",
    )


def _text_error(sample: Sample) -> ItemError:
    """The first text of ``sample`` that UTF-8 cannot encode, named as the server would."""
    where = "text"
    for i, turn in enumerate(sample.turns):
        texts = [("question", turn.question), ("answer", turn.answer)]
        texts += [(f"answer_candidates[{j}]", c) for j, c in enumerate(turn.candidates)]
        bad = [name for name, text in texts if not _encodes(text)]
        if bad:
            where = f"turns[{i}].{bad[0]}"
            break
    else:
        if not _encodes(sample.id) or not _encodes(sample.task):
            where = "id or task"
    return ItemError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message=f"{where}: not encodable as UTF-8 (a lone surrogate such as \\ud800); not sent",
    )


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
# A unary call in chunks


@dataclass(frozen=True)
class Chunk:
    """One chunk ready to send."""

    samples: Sequence[Sample]  # as given (to rebuild each result's sample)
    encoded: EncodedChunk
    request: Any  # None: nothing to send (every sample failed locally)
    offset: int = 0  # where the chunk starts in the caller's list


@dataclass(frozen=True)
class ChunkReply(Generic[ResultT, InfoT]):
    results: list[ResultT]  # one per input sample of the chunk, same order
    info: InfoT | None  # None when no RPC was made


@dataclass(frozen=True)
class ChunkedCall(Generic[ResultT, InfoT, ReplyT]):
    """One call of a unary RPC, planned: validated arguments and the chunks to send, one RPC
    each. A client only sends: for each chunk ``encode(i)``, the stub's :attr:`method` with
    ``chunk.request`` unless that is None, ``decode``; then ``reply`` of the chunk replies.
    A subclass per RPC holds its options and says how to build a request and read a
    response."""

    method: ClassVar[str]  # of the stub
    chunks: list[Sequence[Sample]]
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, kw_only=True)
    """The client's largest message: what one sample may take (see :func:`encode_chunk`)."""

    def encode(self, index: int) -> Chunk:
        """Chunk ``index`` as a request. Reads its images (blocking file I/O)."""
        samples = self.chunks[index]
        encoded = encode_chunk(samples, self.max_message_bytes)
        request = self._request(encoded.sent) if encoded.sent else None
        return Chunk(samples, encoded, request, sum(len(c) for c in self.chunks[:index]))

    def decode(self, chunk: Chunk, response: Any) -> ChunkReply[ResultT, InfoT]:
        """One result per input sample of the chunk, same order (ProtocolError otherwise);
        ``response`` is None when no RPC was made."""
        messages = [] if response is None else list(response.results)
        _renumber_errors(chunk, messages)
        merged = merge_results(chunk.encoded, messages, [m.id for m in messages], _as_error)
        results = [
            self._failed(sample.id, item)
            if isinstance(item, ItemError)
            else self._result(item, sample)
            for sample, item in zip(chunk.samples, merged, strict=True)
        ]
        return ChunkReply(results, None if response is None else self._info(response))

    @classmethod
    def reply(cls, parts: Sequence[ChunkReply[ResultT, InfoT]]) -> ReplyT:
        """Chunk replies (in chunk order) -> one reply, results concatenated in input order."""
        results = [result for part in parts for result in part.results]
        return cls._reply(results, tuple(part.info for part in parts if part.info is not None))

    def _request(self, sent: list[pb.Sample]) -> Any:
        raise NotImplementedError

    def _result(self, message: Any, sample: Sample) -> ResultT:
        raise NotImplementedError

    def _failed(self, sample_id: str, error: ItemError) -> ResultT:
        raise NotImplementedError

    def _info(self, response: Any) -> InfoT:
        raise NotImplementedError

    @classmethod
    def _reply(cls, results: list[ResultT], calls: tuple[InfoT, ...]) -> ReplyT:
        raise NotImplementedError


def _as_error(sample_id: str, error: ItemError) -> ItemError:
    return error


_PLACE = re.compile(r"^samples\[(\d+)\]")
"""How the server names a sample in an item error: its place in the request it got
(``samples[6].image: ...``)."""


def _renumber_errors(chunk: Chunk, messages: Sequence[Any]) -> None:
    """The server counts the samples of one chunk, without those that failed here. Name
    each by its place in the caller's list instead, as the caller counts."""
    places = [i for i, error in enumerate(chunk.encoded.local_errors) if error is None]
    for sent, (message, place) in enumerate(zip(messages, places, strict=False)):
        named = _PLACE.match(message.error.message) if message.HasField("error") else None
        if named is not None and int(named.group(1)) == sent:
            rest = message.error.message[named.end() :]
            message.error.message = f"samples[{chunk.offset + place}]{rest}"


def without_place(message: str) -> str:
    """An item error's message without the sample's place in its call, for a caller that
    names the record itself (``samples[3].image: bad`` -> ``image: bad``)."""
    named = _PLACE.match(message)
    if named is None:
        return message
    rest = message[named.end() :]
    return rest[1:] if rest.startswith(".") else rest


# ---------------------------------------------------------------------------------------
# Score

ScoreChunkReply = ChunkReply[ScoreResult, CallInfo]  # what ScoreCall.decode returns


@dataclass(frozen=True)
class ScoreCall(ChunkedCall[ScoreResult, CallInfo, ScoreReply]):
    """One ``score`` call, planned."""

    method: ClassVar[str] = "Score"
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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ScoreCall:
        """Validate everything before any image is read or any RPC is made."""
        return cls(
            chunks=sample_chunks(samples, chunk_size, max_message_bytes),
            max_message_bytes=max_message_bytes,
            heads=parse_heads(heads),
            priority=parse_priority(priority),
            question_model=question_model or "",
            answer_model=answer_model or "",
        )

    def _request(self, sent: list[pb.Sample]) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            samples=sent,
            heads=self.heads,
            priority=self.priority,
            question_model=self.question_model,
            answer_model=self.answer_model,
        )

    def _result(self, message: pb.ScoreResult, sample: Sample) -> ScoreResult:
        return score_result_from_proto(message)

    def _failed(self, sample_id: str, error: ItemError) -> ScoreResult:
        return ScoreResult(id=sample_id, error=error)

    def _info(self, response: pb.ScoreResponse) -> CallInfo:
        return call_info_from_proto(response)

    @classmethod
    def _reply(cls, results: list[ScoreResult], calls: tuple[CallInfo, ...]) -> ScoreReply:
        return ScoreReply(results=results, calls=calls)


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
class AlignCall(ChunkedCall[AlignResult, AlignCallInfo, AlignReply]):
    """One ``align`` call, planned."""

    method: ClassVar[str] = "Align"
    options: pb.AlignOptions
    priority: pb.Priority.ValueType

    @classmethod
    def plan(
        cls,
        samples: Sequence[Sample],
        *,
        chunk_size: int,
        priority: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        **options: Any,
    ) -> AlignCall:
        """Validate everything (``options`` as :func:`align_options`) before any I/O."""
        return cls(
            chunks=sample_chunks(samples, chunk_size, max_message_bytes),
            max_message_bytes=max_message_bytes,
            options=align_options(**options),
            priority=parse_priority(priority),
        )

    def _request(self, sent: list[pb.Sample]) -> pb.AlignRequest:
        return pb.AlignRequest(samples=sent, options=self.options, priority=self.priority)

    def _result(self, message: pb.AlignResult, sample: Sample) -> AlignResult:
        return align_result_from_proto(message, sample)

    def _failed(self, sample_id: str, error: ItemError) -> AlignResult:
        return AlignResult(id=sample_id, error=error)

    def _info(self, response: pb.AlignResponse) -> AlignCallInfo:
        return align_call_info_from_proto(response)

    @classmethod
    def _reply(cls, results: list[AlignResult], calls: tuple[AlignCallInfo, ...]) -> AlignReply:
        return AlignReply(results=results, calls=calls)
