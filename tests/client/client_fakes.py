"""Fakes for unit tests of the client: a servicer that answers canned results and can be told
to fail, block or misbehave (served by the ``fake`` fixture of conftest.py), and samples."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from align2.client import RetryPolicy, Sample, Turn
from align2.client.resume import ResumePolicy
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

# Retries in tests back off for 50 ms rather than the default 0.2 s and up (not less: see
# MIN_BACKOFF_SECONDS).
FAST_RETRY = RetryPolicy(initial_backoff_seconds=0.05, max_backoff_seconds=0.1)
# Resumes in tests back off for about 10 ms.
FAST_RESUME = ResumePolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.02)


def kept_decision(sequence: int, sample_id: str) -> pb.CurateResponse:
    """A Curate response keeping ``sample_id``, sent as ``sequence``."""
    return pb.CurateResponse(
        id=sample_id, sequence=sequence, decision=pb.DECISION_KEPT, scores=pb.ScoreResult()
    )


class FakeCuration(pb_grpc.CurationServiceServicer):
    """Scores are derived from the request so tests can check order and routing:
    question score = int(id) (ids are digits), answer score of a turn = len(answer); of a
    turn with candidate answers: each candidate's length, the best the first longest.
    Samples whose id starts with "bad" get a per-item INVALID_ARGUMENT error."""

    def __init__(self) -> None:
        self.target = ""
        self.requests: list[pb.ScoreRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.attempts = 0
        self.fail_next: list[grpc.StatusCode] = []  # abort the next attempts with these
        self.pushback_ms = "10"  # the retry delay a RESOURCE_EXHAUSTED abort gives
        self.gate: threading.Event | None = None  # when set, Score waits for it
        self.barrier: threading.Barrier | None = None  # when set, Score waits at it
        self.drop_last_result = False  # break the one-result-per-sample contract
        self.inflight = 0
        self.max_inflight = 0
        self.curated: list[str] = []  # ids of the Curate samples received, in order
        self.curate_options: list[pb.CurateOptions] = []
        self.curate_reversed = False  # answer after the stream's end, last sample first
        self.curate_ended = threading.Event()  # set when a Curate RPC terminates
        # Per Curate stream, in turn: answer this many samples, read up to two more without
        # answering them, then fail the stream with curate_abort_code (as a dying server).
        self.curate_abort_after: list[int] = []
        self.curate_abort_code = grpc.StatusCode.UNAVAILABLE
        self.curate_on_abort: Callable[[], object] | None = None  # called before it fails
        self.curate_streams: list[list[str]] = []  # ids received, per Curate stream
        # Model revisions the server reports (GetServerInfo and Score), by model name.
        self.revisions = {"q": "r1", "a": "r2"}
        self.settings = {"q": "s1", "a": "s2"}  # and their ModelRef.settings
        self.fail_scores_after: int | None = None  # then every further Score: UNAVAILABLE
        self.services = ["Score"]  # as GetServerInfo reports them
        self.hold_scores_after: int | None = None  # then only further Score calls wait at gate
        self._lock = threading.Lock()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.barrier is not None:
            self.barrier.abort()

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        failure = self._admit(request, context)
        if failure is None and self.fail_scores_after is not None:
            with self._lock:
                if len(self.requests) > self.fail_scores_after:
                    self.requests.pop()
                    self.inflight -= 1
                    failure = grpc.StatusCode.UNAVAILABLE
        if failure is not None:
            if failure == grpc.StatusCode.RESOURCE_EXHAUSTED:  # as align2's server: a delay
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback_ms),))
            context.abort(failure, "injected failure")
        try:
            if self.hold_scores_after is None or len(self.requests) > self.hold_scores_after:
                self._wait()
            results = [_result(s, request.heads, i) for i, s in enumerate(request.samples)]
            if self.drop_last_result:
                results = results[:-1]
            return pb.ScoreResponse(
                results=results,
                question_model=self._model_ref("q"),
                answer_model=self._model_ref("a"),
                template_version="t1",
                timing=pb.Timing(queue_seconds=0.5, compute_seconds=1.0),
            )
        finally:
            with self._lock:
                self.inflight -= 1

    def Curate(
        self, requests: Iterator[pb.CurateRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.CurateResponse]:
        """Keeps every sample, answer score = len(its first answer), matched by ``sequence``.
        Answers each sample as it arrives (then waits at ``gate`` when set), or all at the
        end in reverse order with ``curate_reversed``."""
        context.add_callback(self.curate_ended.set)
        self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
        options = next(requests)
        self.curate_options.append(options.options)
        received: list[str] = []
        self.curate_streams.append(received)
        abort_after = self.curate_abort_after.pop(0) if self.curate_abort_after else None
        held: list[pb.CurateResponse] = []
        for sequence, request in enumerate(requests):
            self.curated.append(request.sample.id)
            received.append(request.sample.id)
            if abort_after is not None and sequence >= abort_after:
                if sequence >= abort_after + 1:  # two read and left unanswered
                    self._abort_curate(context)
                continue
            response = _decision(sequence, request.sample)
            if self.curate_reversed:
                held.insert(0, response)
                continue
            yield response
            if self.gate is not None:
                self.gate.wait(timeout=10)
        if abort_after is not None and len(received) > abort_after:
            self._abort_curate(context)
        yield from held

    def _abort_curate(self, context: grpc.ServicerContext) -> None:
        if self.curate_on_abort is not None:
            self.curate_on_abort()
        context.abort(self.curate_abort_code, "injected stream failure")

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        self._admit(None, context)
        with self._lock:
            self.inflight -= 1
        return pb.GetServerInfoResponse(
            version="9.9.9",
            models=[
                pb.ModelInfo(ref=self._model_ref("q"), role="question_reward"),
                pb.ModelInfo(ref=self._model_ref("a"), role="answer_reward"),
            ],
            limits=pb.Limits(max_samples_per_call=64),
            template_version="t1",
            services=self.services,
        )

    def _model_ref(self, name: str) -> pb.ModelRef:
        return pb.ModelRef(
            name=name,
            model_id=f"fake-{name}",
            revision=self.revisions[name],
            settings=self.settings[name],
        )

    def _admit(
        self, request: pb.ScoreRequest | None, context: grpc.ServicerContext
    ) -> grpc.StatusCode | None:
        with self._lock:
            self.attempts += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
            failure = self.fail_next.pop(0) if self.fail_next else None
            if failure is not None:
                self.inflight -= 1
            elif request is not None:
                self.requests.append(request)
        return failure

    def _wait(self) -> None:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.barrier is not None:
            self.barrier.wait()


def _result(sample: pb.Sample, heads: list[int], place: int) -> pb.ScoreResult:
    if sample.id.startswith("bad"):  # named as the server does: its place in the request
        message = f"samples[{place}].image: bad"
        error = pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message)
        return pb.ScoreResult(id=sample.id, error=error)
    result = pb.ScoreResult(id=sample.id)
    if not heads or pb.HEAD_QUESTION in heads:
        result.question_score = float(sample.id) if sample.id.isdigit() else 0.0
    if not heads or pb.HEAD_ANSWER in heads:
        turns = [[float(len(a)) for a in t.answer_candidates or [t.answer]] for t in sample.turns]
        best = [candidates.index(max(candidates)) for candidates in turns]
        scores = [candidates[b] for candidates, b in zip(turns, best, strict=True)]
        result.answer_scores.extend(scores)
        result.answer_truncated.extend([False] * len(scores))
        result.answer_score = sum(scores) / len(scores) if scores else 0.0
        if any(t.answer_candidates for t in sample.turns):
            result.answer_candidates.extend(
                pb.CandidateScores(scores=c, best=b, truncated=[False] * len(c))
                for c, b in zip(turns, best, strict=True)
            )
    return result


def _decision(sequence: int, sample: pb.Sample) -> pb.CurateResponse:
    answer = float(len(sample.turns[0].answer)) if sample.turns else 0.0
    return pb.CurateResponse(
        id=sample.id,
        sequence=sequence,
        decision=pb.DECISION_KEPT,
        scores=pb.ScoreResult(id=sample.id, answer_score=answer),
    )


def make_samples(count: int, *, image: bytes = b"png") -> list[Sample]:
    """Samples with ids "0".."count-1" and answers of length id + 1."""
    return [
        Sample(id=str(i), image=image, turns=[Turn("What?", "x" * (i + 1))]) for i in range(count)
    ]


@contextlib.contextmanager
def serving(servicer: FakeCuration | None = None) -> Iterator[FakeCuration]:
    """A real gRPC server on 127.0.0.1:0 serving ``servicer`` (a new :class:`FakeCuration`
    by default; its ``target``), stopped on exit."""
    servicer = FakeCuration() if servicer is None else servicer
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_CurationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    try:
        yield servicer
    finally:
        servicer.release()  # unblock handlers a test left waiting
        server.stop(grace=None).wait()


def slow_reading(read: Callable[..., Iterator[Sample]], at: int) -> Callable[..., Iterator[Sample]]:
    """``read`` (iter_llava) with a 1 s wait before its record ``at`` (a slow disk): a
    stream that fails meanwhile does so while gRPC's thread is inside the input."""

    def slow(*args: Any, **kwargs: Any) -> Iterator[Sample]:
        for i, sample in enumerate(read(*args, **kwargs)):
            if i == at:
                time.sleep(1.0)
            yield sample

    return slow
