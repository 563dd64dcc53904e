"""The Curate stream's bookkeeping, shared by the sync and asyncio clients.

One :class:`CurateStream` per ``curate`` call: the options message first, then one request
per sample; every sample sent is remembered until its decision arrives, so that each result
carries the sample as the caller gave it (to rebuild the kept or restyled sample), and so
that a stream that ends with samples unanswered is a :class:`ProtocolError`, never a silent
loss. A sample whose image cannot be read is not sent: it becomes an "error" result here.

A call may run on several gRPC streams in turn: when one fails with a retryable status
(:mod:`align2.client.resume`), :meth:`CurateStream.restart` starts the next, which sends
first the samples still without a decision, in their order, then the rest of the caller's
samples. Sequence numbers are per stream (the server numbers each stream's samples from 0),
so each stream has its own table of samples by sequence number: a decision always goes to
the sample that its own stream was sent. The caller sees one decision per sample.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from align2.client.calls import (
    DEFAULT_MAX_MESSAGE_BYTES,
    align_options,
    encode_chunk,
    parse_priority,
)
from align2.client.convert import curate_result_from_proto
from align2.client.results import CurateResult, ProtocolError, ScoreResult
from align2.client.resume import Outage, ResumePolicy, resume_policy
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb

LOST_STATUS = "Internal error from Core"
"""The details of the status grpcio's asyncio client makes up for a failed write."""


def _fraction(key: str, value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{key}: {value} is not in (0, 1]")
    return value


MAX_SELECTION_KEY_LENGTH = 256  # the server's Limits.max_name_length, fixed


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
        raise ValueError(
            f"selection_key: {len(key)} characters exceeds {MAX_SELECTION_KEY_LENGTH} "
            "(the server's limits.max_name_length)"
        )
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


class CurateArgs(TypedDict, total=False):
    """The clients' ``curate()`` keyword arguments other than ``timeout``: those of
    :meth:`CurateStream.plan`, its ``align_settings`` spelled out (for type checkers; ``plan``
    and :func:`~align2.client.calls.align_options` hold the defaults and the checks)."""

    question_keep_fraction: float | None
    answer_keep_fraction: float | None
    align: bool
    priority: str | None
    selection_key: str | None
    question_thresholds: Mapping[str, float] | None
    answer_thresholds: Mapping[str, float] | None
    min_window: int | None
    question_seed_scores: Mapping[str, Sequence[float]] | None
    answer_seed_scores: Mapping[str, Sequence[float]] | None
    resume: bool | ResumePolicy
    parts: str
    review: bool
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    template: str | None


@dataclass(frozen=True)
class Sent:
    """A sample as given and as encoded (a resent sample is not read or encoded again)."""

    sample: Sample
    message: pb.Sample
    index: int = -1  # its place among the samples the caller's iterator gave


@dataclass
class CurateStream:
    """One ``curate`` call's state. Each decision is matched back to its sample by the
    ``sequence`` the server echoes (the sample's position among its stream's samples, from
    0), never by id: decisions come out of order, and generated data often repeats ids.

    Thread-safe: the sync client's requests are drawn by gRPC's own thread while the
    caller's thread reads the decisions."""

    options: pb.CurateOptions
    resume: ResumePolicy | None = None
    producer_error: BaseException | None = None  # what the caller's sample iterator raised
    exhausted: bool = False  # the caller's samples are all drawn (or their iterator raised)
    cancelled: bool = False  # the caller cancelled: no stream is opened again
    streams: int = 1  # gRPC streams opened so far (1 + resumes)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the client's (its sender sets it)
    _outstanding: dict[int, Sent] = field(default_factory=dict)  # this stream's, by sequence
    _resend: collections.deque[Sent] = field(default_factory=collections.deque)
    _local: collections.deque[CurateResult] = field(default_factory=collections.deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _draw: threading.Lock = field(default_factory=threading.Lock)  # one draw at a time
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _drawn: Iterator[int] = field(default_factory=itertools.count)  # the caller's, ever
    _outage: Outage | None = None
    _decided: int = 0  # decisions on the current stream
    _blind_resumes: int = 0  # lost statuses resumed without a decision since the last one

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
        resume: bool | ResumePolicy = True,
        **align_settings: Any,
    ) -> CurateStream:
        """Validate everything before any I/O (the arguments are ``curate()``'s:
        :class:`CurateArgs`). None leaves a setting to the server; the selection settings as
        :func:`selection_options`; ``align_settings`` as
        :func:`align2.client.calls.align_options` (used when ``align``); ``resume`` as
        :func:`align2.client.resume.resume_policy`."""
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
        return cls(options, resume_policy(resume))

    # -- sending ------------------------------------------------------------------------
    def requests(self, samples: Iterable[Sample]) -> Iterator[pb.CurateRequest]:
        """The current stream's messages: the options, then the samples to send again, then
        each sample of ``samples`` that could be encoded (pass the same iterator to every
        stream of a call). They end when the stream is no longer the current one.

        When ``samples`` raises, the requests end normally here (so the server still answers
        what it accepted) and the error is kept in :attr:`producer_error` for the caller."""
        number = self.streams
        produced = iter(samples)

        def generate() -> Iterator[pb.CurateRequest]:
            yield pb.CurateRequest(options=self.options)
            while (request := self._next_request(number, produced)) is not None:
                yield request

        return generate()

    def _next_request(self, number: int, produced: Iterator[Sample]) -> pb.CurateRequest | None:
        # What is to be sent again goes at once, even while a retired stream's thread still
        # waits for the caller's next sample (one draw at a time, whichever stream's).
        queued = self.queued(number)
        if queued is not None:
            return queued
        with self._draw:
            while True:
                queued = self.queued(number)
                if queued is not None or self.exhausted or number != self.streams:
                    return queued
                try:
                    sample = next(produced)
                    sent = self.prepare(sample)
                except StopIteration:
                    self.exhausted = True
                    return None
                # BaseException too (a producer's KeyboardInterrupt or SystemExit): raised
                # here, in gRPC's thread, it ended that thread and left the stream open.
                except BaseException as error:
                    self.producer_error, self.exhausted = error, True
                    return None
                if sent is not None:
                    return self.send(number, sent)

    def stop_drawing(self) -> None:
        """No sample is drawn from the caller's iterator after this returns."""
        with self._draw:
            self.exhausted = True

    def queued(self, number: int) -> pb.CurateRequest | None:
        """The next sample to send again on stream ``number``, if any (None also when that
        stream is no longer the current one)."""
        with self._lock:
            if number != self.streams or not self._resend:
                return None
            return self._register(self._resend.popleft())

    def prepare(self, sample: Sample) -> Sent | None:
        """``sample`` encoded (a lazy image is read now), or None when its image can't be
        read (its error result is then queued for :meth:`local_results`)."""
        # the unary calls' encoding and local-error rule
        index = next(self._drawn)
        encoded = encode_chunk([sample], self.max_message_bytes)
        [error] = encoded.local_errors
        if error is not None:
            scores = ScoreResult(id=sample.id)
            result = CurateResult(sample.id, "error", scores, error=error, index=index)
            with self._lock:
                self._local.append(result)
            return None
        [message] = encoded.sent
        return Sent(sample, message, index)

    def send(self, number: int, sent: Sent) -> pb.CurateRequest | None:
        """The request for ``sent`` on stream ``number``, remembered under its sequence
        number; None when that stream is no longer current (``sent`` then waits for the
        next stream)."""
        with self._lock:
            if number != self.streams:
                self._resend.append(sent)
                return None
            return self._register(sent)

    def _register(self, sent: Sent) -> pb.CurateRequest:
        self._outstanding[next(self._numbers)] = sent
        return pb.CurateRequest(sample=sent.message)

    # -- receiving ----------------------------------------------------------------------
    def decode(self, response: pb.CurateResponse) -> CurateResult:
        """The result for one response of the current stream; ProtocolError for a sequence
        number with nothing outstanding. A decision ends an outage (and its blind resume)."""
        with self._lock:
            sent = self._outstanding.pop(response.sequence, None)
            self._outage = None
            self._blind_resumes = 0
            self._decided += 1
        if sent is None:
            raise ProtocolError(
                f"a result for sequence {response.sequence} (id {response.id!r}), which is "
                "not outstanding"
            )
        result = curate_result_from_proto(response, sent.sample)
        return dataclasses.replace(result, index=sent.index)

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
        """Ids sent and not yet answered, in the order sent: after the call fails, the
        samples to send again (the server answers every sample it accepted before it fails
        a stream; samples lost with a broken connection are listed too)."""
        with self._lock:
            pending = [self._outstanding[n] for n in sorted(self._outstanding)]
            return [sent.sample.id for sent in (*pending, *self._resend)]

    # -- resuming -----------------------------------------------------------------------
    def next_try(
        self, code: str, details: str = "", time_left: float | None = None
    ) -> tuple[float, float] | None:
        """After the current stream failed with status ``code`` (a name, e.g.
        "UNAVAILABLE") and ``details``: (seconds to back off, then the longest wait for the
        server) before opening the next stream, or None when the call fails instead (no
        resume policy, another code, the outage spent, the caller cancelled, or the call's
        deadline, ``time_left`` seconds away (None: none), comes before the backoff ends)."""
        policy = self.resume
        if policy is None or self.cancelled:
            return None
        if code not in policy.codes and not self._lost_status(code, details):
            return None
        now = time.monotonic()
        with self._lock:
            if self._outage is None:
                self._outage = Outage(policy, now)
            plan = self._outage.next_try(now)
        if plan is None or time_left is None:
            return plan
        backoff, wait = plan
        if time_left <= backoff:
            return None
        return backoff, min(wait, time_left - backoff)

    def _lost_status(self, code: str, details: str) -> bool:
        """grpcio's asyncio client reports a stream that ended while a write was on its way
        as INTERNAL "Internal error from Core", whatever the real status was (a broken
        connection, or the server's own; grpc/grpc#36066, grpcio 1.85). Resumed when the
        stream had decisions (it was going). Without decisions the server may have refused
        the stream (bad options, Curate disabled, too many selection keys), or have been
        draining as it opened: resumed once until a decision comes, so that the next stream
        tells which (align2 servers read what the client still sends, for up to 0.5 s,
        before they refuse, so a refusal is lost twice only to a producer that keeps
        writing), and a refusing server is not asked again and again."""
        if code != "INTERNAL" or details != LOST_STATUS:
            return False
        if self._decided > 0:
            return True
        with self._lock:
            if self._blind_resumes >= 1:
                return False
            self._blind_resumes += 1
            return True

    def restart(self) -> None:
        """Make the next stream current: what the last one left unanswered goes first, in
        its order, before any sample not sent yet; sequence numbers start again at 0."""
        with self._lock:
            pending = [self._outstanding[n] for n in sorted(self._outstanding)]
            self._resend.extendleft(reversed(pending))
            self._outstanding.clear()
            self._numbers = itertools.count()
            self._decided = 0
            self.streams += 1


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

    @property
    def streams(self) -> int:
        """gRPC streams opened so far: 1, plus one per resume."""
        return self._stream.streams

    def cancel(self) -> None:
        """End the stream now; samples not yet answered stay in :attr:`unanswered`."""
        self._cancel()

    def stop_drawing(self) -> None:
        """Draw no more samples from the caller's iterator: after a failure, so that the
        caller may read the rest itself. Waits for a draw in progress (on gRPC's thread)."""
        self._stream.stop_drawing()


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

    @property
    def streams(self) -> int:
        """gRPC streams opened so far: 1, plus one per resume."""
        return self._stream.streams

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
