"""The Curate stream's bookkeeping, shared by the sync and asyncio clients.

One :class:`CurateStream` per ``curate`` call: the options message first, then one request
per sample; every sample sent is remembered until its decision arrives, so that each result
carries the sample as the caller gave it (to rebuild the kept or restyled sample), and so
that a stream that ends with samples unanswered is a :class:`ProtocolError`, never a silent
loss. A sample whose image cannot be read is not sent: it becomes an "error" result here.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from align2.client.calls import align_options, encode_chunk, parse_priority
from align2.client.convert import curate_result_from_proto
from align2.client.results import CurateResult, ProtocolError, ScoreResult
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb


def _fraction(key: str, value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{key}: {value} is not in (0, 1]")
    return value


MAX_SELECTION_KEY_LENGTH = 256  # as the server checks it


def selection_options(
    *,
    selection_key: str | None = None,
    question_thresholds: Mapping[str, float] | None = None,
    answer_thresholds: Mapping[str, float] | None = None,
    min_window: int | None = None,
    question_seed_scores: Mapping[str, Sequence[float]] | None = None,
    answer_seed_scores: Mapping[str, Sequence[float]] | None = None,
) -> pb.CurateOptions:
    """The selection fields of a stream's options (see ``CurationClient.curate``), checked
    here: ValueError naming the argument."""
    key = selection_key or ""
    if len(key) > MAX_SELECTION_KEY_LENGTH:
        raise ValueError(f"selection_key: {len(key)} characters exceeds {MAX_SELECTION_KEY_LENGTH}")
    if min_window is not None and min_window < 1:
        raise ValueError(f"min_window: {min_window} is not at least 1")
    options = pb.CurateOptions(selection_key=key, min_window=min_window)
    for name, thresholds in (
        ("question_thresholds", question_thresholds),
        ("answer_thresholds", answer_thresholds),
    ):
        for task, value in (thresholds or {}).items():
            if not math.isfinite(value):
                raise ValueError(f"{name}: task {task!r}: {value} is not finite")
            getattr(options, name)[task] = value
    for name, seeds in (
        ("question_seed_scores", question_seed_scores),
        ("answer_seed_scores", answer_seed_scores),
    ):
        for task, values in (seeds or {}).items():
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name}: task {task!r}: a score is not finite")
            getattr(options, name)[task].scores.extend(values)
    return options


@dataclass
class CurateStream:
    """One stream's state. Each decision is matched back to its sample by the ``sequence``
    the server echoes (the sample's position among the stream's samples, from 0), never by
    id: decisions come out of order, and generated data often repeats ids."""

    options: pb.CurateOptions
    _outstanding: dict[int, Sample] = field(default_factory=dict)  # by sequence number
    _local: collections.deque[CurateResult] = field(default_factory=collections.deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    producer_error: Exception | None = None  # what the caller's sample iterator raised

    @classmethod
    def plan(
        cls,
        *,
        question_keep_fraction: float | None = None,
        answer_keep_fraction: float | None = None,
        align: bool = False,
        priority: str | None = None,
        selection_key: str | None = None,
        question_thresholds: Mapping[str, float] | None = None,
        answer_thresholds: Mapping[str, float] | None = None,
        min_window: int | None = None,
        question_seed_scores: Mapping[str, Sequence[float]] | None = None,
        answer_seed_scores: Mapping[str, Sequence[float]] | None = None,
        **align_settings: Any,
    ) -> CurateStream:
        """Validate everything before any I/O. None leaves a setting to the server;
        the selection settings as :func:`selection_options`; ``align_settings`` as
        :func:`align2.client.calls.align_options` (used when ``align``)."""
        options = selection_options(
            selection_key=selection_key,
            question_thresholds=question_thresholds,
            answer_thresholds=answer_thresholds,
            min_window=min_window,
            question_seed_scores=question_seed_scores,
            answer_seed_scores=answer_seed_scores,
        )
        options.MergeFrom(
            pb.CurateOptions(
                question_keep_fraction=_fraction("question_keep_fraction", question_keep_fraction),
                answer_keep_fraction=_fraction("answer_keep_fraction", answer_keep_fraction),
                align=align,
                align_options=align_options(**align_settings),
                priority=parse_priority(priority),
            )
        )
        if not align:
            options.ClearField("align_options")
        return cls(options)

    def requests(self, samples: Iterable[Sample]) -> Iterator[pb.CurateRequest]:
        """The stream's messages: the options, then each sample that could be encoded.

        When ``samples`` raises, the stream ends normally here (so the server still answers
        what it accepted) and the error is kept in :attr:`producer_error` for the caller."""
        yield pb.CurateRequest(options=self.options)
        try:
            for sample in samples:
                request = self.encode(sample)
                if request is not None:
                    yield request
        except Exception as error:
            self.producer_error = error

    def encode(self, sample: Sample) -> pb.CurateRequest | None:
        """The request for ``sample`` (reads a lazy image now), or None when its image can't
        be read (its error result is then queued for :meth:`local_results`)."""
        encoded = encode_chunk([sample])  # the unary calls' encoding and local-error rule
        [error] = encoded.local_errors
        if error is not None:
            result = CurateResult(sample.id, "error", ScoreResult(id=sample.id), error=error)
            with self._lock:
                self._local.append(result)
            return None
        [message] = encoded.sent
        with self._lock:
            self._outstanding[next(self._numbers)] = sample
        return pb.CurateRequest(sample=message)

    def decode(self, response: pb.CurateResponse) -> CurateResult:
        """The result for one response; ProtocolError for a sequence number with nothing
        outstanding."""
        with self._lock:
            original = self._outstanding.pop(response.sequence, None)
        if original is None:
            raise ProtocolError(
                f"a result for sequence {response.sequence} (id {response.id!r}), which is "
                "not outstanding"
            )
        return curate_result_from_proto(response, original)

    def answer(self, response: pb.CurateResponse) -> Iterator[CurateResult]:
        """The local failures queued since the last call, then the decision of ``response``
        (both clients yield these for each response)."""
        yield from self.local_results()
        yield self.decode(response)

    def local_results(self) -> list[CurateResult]:
        """The samples that failed here (unreadable images) since the last call."""
        with self._lock:
            results = list(self._local)
            self._local.clear()
        return results

    def finish(self) -> list[CurateResult]:
        """At the stream's successful end: the remaining local failures. ProtocolError when a
        sample sent got no result."""
        missing = self.unanswered
        if missing:
            raise ProtocolError(
                f"the stream ended with {len(missing)} samples unanswered "
                f"(first ids: {missing[:3]})"
            )
        return self.local_results()

    @property
    def unanswered(self) -> list[str]:
        """Ids sent and not yet answered: after a stream fails as a whole, the samples to
        send again (the server answers every sample it accepted before it fails a stream)."""
        with self._lock:
            return [sample.id for sample in self._outstanding.values()]


class CurateResults(Iterator[CurateResult]):
    """What ``CurationClient.curate`` returns: the results as the server decides them, plus
    the ids still unanswered (to resend after a failure) and ``cancel()``."""

    def __init__(
        self, stream: CurateStream, results: Iterator[CurateResult], cancel: Callable[[], Any]
    ) -> None:
        self._stream = stream
        self._results = results
        self._cancel = cancel

    def __next__(self) -> CurateResult:
        return next(self._results)

    @property
    def unanswered(self) -> list[str]:
        return self._stream.unanswered

    def cancel(self) -> None:
        """End the stream now; samples not yet answered stay in :attr:`unanswered`."""
        self._cancel()


class AsyncCurateResults(AsyncIterator[CurateResult]):
    """The asyncio twin of :class:`CurateResults` (``async for``)."""

    def __init__(
        self,
        stream: CurateStream,
        results: AsyncIterator[CurateResult],
        cancel: Callable[[], Any],
    ) -> None:
        self._stream = stream
        self._results = results
        self._cancel = cancel

    async def __anext__(self) -> CurateResult:
        return await self._results.__anext__()

    async def aclose(self) -> None:
        """End the stream and its producer task (for a consumer that stops early;
        ``contextlib.aclosing`` calls it)."""
        self._cancel()
        aclose = getattr(self._results, "aclose", None)
        if aclose is not None:
            await aclose()

    @property
    def unanswered(self) -> list[str]:
        return self._stream.unanswered

    def cancel(self) -> None:
        """End the stream now: iterating then raises ``grpc.RpcError`` (CANCELLED); samples
        not yet answered stay in :attr:`unanswered`."""
        self._cancel()
