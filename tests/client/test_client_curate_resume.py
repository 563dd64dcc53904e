"""``curate`` resumes a failed stream by itself: the bookkeeping (per-stream sequence
numbers, what is sent again and in which order, how long it tries) and both clients against
the fake servicer failing its streams with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent import futures

import grpc
import pytest
from client_fakes import FAST_RESUME, FAST_RETRY, FakeCuration, kept_decision, make_samples

from align2.client import AsyncCurationClient, CurateResult, CurationClient, Sample, Turn
from align2.client.curate import LOST_STATUS, CurateStream
from align2.client.resume import Outage, ResumePolicy
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc


def assert_each_once_and_matched(results: list[CurateResult], given: list[Sample]) -> None:
    assert collections.Counter(r.id for r in results) == collections.Counter(s.id for s in given)
    for result in results:
        assert result.sample is given[int(result.id)]  # the caller's own object
        assert result.scores.answer_score == int(result.id) + 1


# ---------------------------------------------------------------------------------------
# The bookkeeping


def test_a_new_stream_sends_the_unanswered_first_with_new_sequence_numbers() -> None:
    given = make_samples(6)
    stream = CurateStream.plan(resume=True)
    produced = iter(given)
    first = stream.requests(produced)
    assert next(first).WhichOneof("item") == "options"
    assert [next(first).sample.id for _ in range(4)] == ["0", "1", "2", "3"]
    assert stream.decode(kept_decision(1, "1")).sample is given[1]
    stream.restart()  # the first stream failed: 0, 2 and 3 are unanswered
    assert next(first, None) is None  # a retired stream draws no more samples
    second = list(stream.requests(produced))
    assert [r.sample.id for r in second[1:]] == ["0", "2", "3", "4", "5"]
    assert stream.streams == 2
    # The server numbers the new stream from 0: its sequence 1 is sample 2, not sample 1.
    assert stream.decode(kept_decision(1, "2")).sample is given[2]
    assert stream.unanswered == ["0", "3", "4", "5"]
    with pytest.raises(Exception, match="sequence 9"):
        stream.decode(kept_decision(9, "9"))


def test_a_sample_drawn_for_a_stream_that_failed_meanwhile_goes_to_the_next() -> None:
    given = make_samples(3)
    stream = CurateStream.plan(resume=True)
    produced = iter([given[0], given[2]])
    first = stream.requests(produced)
    assert [next(first).WhichOneof("item"), next(first).sample.id] == ["options", "0"]
    sent = stream.prepare(given[1])  # drawn by stream 1's thread as that stream fails
    assert sent is not None
    stream.restart()
    assert stream.send(1, sent) is None  # stream 1 is gone: it waits for stream 2
    second = list(stream.requests(produced))
    assert [r.sample.id for r in second[1:]] == ["0", "1", "2"]


def test_what_is_sent_again_does_not_wait_for_a_draw_of_the_failed_stream() -> None:
    given = make_samples(3)
    entered, gate = threading.Event(), threading.Event()

    def produce() -> Iterator[Sample]:  # a slow producer: sample 1 comes when gate opens
        yield given[0]
        entered.set()
        gate.wait(timeout=30)
        yield from given[1:]

    stream = CurateStream.plan(resume=True)
    produced = produce()
    first = stream.requests(produced)
    assert [next(first).WhichOneof("item"), next(first).sample.id] == ["options", "0"]
    drawing = threading.Thread(target=next, args=(first, None))  # gRPC's thread of stream 1
    drawing.start()
    assert entered.wait(timeout=10)  # it waits in the producer
    stream.restart()  # stream 1 failed meanwhile
    second = stream.requests(produced)
    sent: list[pb.CurateRequest] = []
    sending = threading.Thread(target=lambda: sent.extend([next(second), next(second)]))
    sending.start()
    try:
        sending.join(timeout=5)  # not held up by the draw that waits in the producer
        assert [sent[0].WhichOneof("item"), sent[1].sample.id] == ["options", "0"]
    finally:
        gate.set()
        drawing.join(timeout=10)
        sending.join(timeout=10)
    assert [r.sample.id for r in second] == ["1", "2"]  # 1 was drawn for stream 1


def test_only_the_policy_codes_are_resumed_and_not_after_a_cancel() -> None:
    stream = CurateStream.plan(resume=FAST_RESUME)
    assert stream.next_try("INVALID_ARGUMENT") is None
    assert stream.next_try("UNAVAILABLE") is not None
    stream.cancelled = True
    assert stream.next_try("UNAVAILABLE") is None
    assert CurateStream.plan(resume=False).next_try("UNAVAILABLE") is None  # no policy: no resume


def test_the_call_deadline_bounds_a_resume() -> None:
    stream = CurateStream.plan(resume=ResumePolicy(initial_backoff_seconds=1.0))
    assert stream.next_try("UNAVAILABLE", time_left=0.5) is None  # gone before the backoff
    plan = stream.next_try("UNAVAILABLE", time_left=10.0)
    assert plan is not None
    backoff, wait = plan
    assert 1.6 <= backoff <= 2.4  # the second try's, jittered
    assert backoff + wait == pytest.approx(10.0)  # the wait for SERVING ends at the deadline
    plan = stream.next_try("UNAVAILABLE")
    assert plan is not None and sum(plan) > 250  # no deadline: the outage's 300 s bound it


def test_a_status_lost_by_grpcio_aio_is_resumed_once_blind_then_after_decisions() -> None:
    # grpcio's asyncio client turns a stream that ends during a write into this INTERNAL,
    # whatever the server said (grpc/grpc#36066).
    stream = CurateStream.plan(resume=FAST_RESUME)
    list(stream.requests(make_samples(2)))
    # No decision: refused, or drained as it opened? Once, a new stream tells which.
    assert stream.next_try("INTERNAL", LOST_STATUS) is not None
    stream.restart()
    assert stream.next_try("INTERNAL", LOST_STATUS) is None  # not asked again and again
    going = CurateStream.plan(resume=dataclasses.replace(FAST_RESUME, max_attempts=3))
    list(going.requests(make_samples(2)))
    going.decode(kept_decision(0, "0"))
    assert going.next_try("INTERNAL", "a server bug") is None
    # It was going: resumed as often as the policy says, as an UNAVAILABLE would be.
    tries = [going.next_try("INTERNAL", LOST_STATUS) for _ in range(4)]
    assert [t is not None for t in tries] == [True, True, True, False]
    # A decision ends the outage and its blind resume: the next drain gets one again.
    later = CurateStream.plan(resume=FAST_RESUME)
    list(later.requests(make_samples(2)))
    assert later.next_try("INTERNAL", LOST_STATUS) is not None  # blind
    later.restart()
    list(later.requests([]))  # the two again, first on the new stream
    later.decode(kept_decision(0, "0"))
    later.restart()
    assert later.next_try("INTERNAL", LOST_STATUS) is not None  # blind again
    no_policy = CurateStream.plan(resume=False)
    assert no_policy.next_try("INTERNAL", LOST_STATUS) is None  # retry=False: never


def test_an_outage_ends_after_its_attempts_or_its_time_and_backs_off() -> None:
    policy = ResumePolicy(max_attempts=3, max_wait_seconds=60, initial_backoff_seconds=1)
    outage = Outage(policy, started=100.0)
    tries = [outage.next_try(100.0) for _ in range(4)]
    assert tries[3] is None
    backoffs = [t[0] for t in tries[:3] if t is not None]
    for n, backoff in enumerate(backoffs):
        assert 0.8 * 2**n <= backoff <= 1.2 * 2**n  # 1, 2, 4 s, jittered
    assert Outage(policy, started=100.0).next_try(160.0) is None  # its time is up
    late = Outage(policy, started=100.0).next_try(159.5)
    assert late is not None and late[0] <= 0.5  # never backs off past its time


def test_a_decision_ends_the_outage() -> None:
    stream = CurateStream.plan(resume=ResumePolicy(max_attempts=1))
    list(stream.requests(make_samples(2)))
    assert stream.next_try("UNAVAILABLE") is not None
    assert stream.next_try("UNAVAILABLE") is None  # its one attempt is spent
    stream.restart()
    list(stream.requests(iter([])))
    stream.decode(kept_decision(0, "0"))  # progress: a new outage may start
    assert stream.next_try("UNAVAILABLE") is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_wait_seconds": 0}, "max_wait_seconds"),
        ({"initial_backoff_seconds": -1}, "negative"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier"),
        ({"codes": ("UNAVAILABLE", "LATER")}, "LATER"),
    ],
)
def test_the_policy_is_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResumePolicy(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Both clients against a server whose streams fail


def sync_curate(
    fake: FakeCuration, given: Iterable[Sample], **kwargs: object
) -> list[CurateResult]:
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        results = client.curate(given, resume=kwargs.pop("resume", FAST_RESUME), **kwargs)  # type: ignore[arg-type]
        out = list(results)
        assert results.streams == len(fake.curate_streams)
        return out


async def agen(given: Iterable[Sample]) -> AsyncIterator[Sample]:
    for item in given:
        await asyncio.sleep(0)
        yield item


def aio_curate(fake: FakeCuration, given: list[Sample]) -> list[CurateResult]:
    async def run() -> list[CurateResult]:
        async with AsyncCurationClient(fake.target, retry=FAST_RETRY) as client:
            results = client.curate(agen(given), resume=FAST_RESUME)
            out = [result async for result in results]
            assert results.streams == len(fake.curate_streams)
            return out

    return asyncio.run(run())


@pytest.mark.parametrize("curate", [sync_curate, aio_curate], ids=["sync", "aio"])
def test_the_caller_sees_every_sample_once_across_failed_streams(
    fake: FakeCuration, curate: object
) -> None:
    fake.curate_abort_after = [5, 3]  # two streams fail, the third ends well
    given = make_samples(30)
    results = curate(fake, given)  # type: ignore[operator]
    assert_each_once_and_matched(results, given)
    first, second, third = fake.curate_streams
    # Each new stream starts with what the last one read and left unanswered, in order,
    # and never sends again a sample that has its decision.
    assert first[5:7] == ["5", "6"] and second[:2] == ["5", "6"]
    assert third[:2] == second[3:5]
    assert not set(first[:5]) & set(second + third)
    assert not set(second[:3]) & set(third)


def test_repeated_ids_go_to_their_own_samples_across_streams(fake: FakeCuration) -> None:
    given = [Sample(id="same", image=b"png", turns=[Turn("Q?", "a" * n)]) for n in range(1, 9)]
    fake.curate_abort_after = [2]
    results = sync_curate(fake, given)
    assert sorted(r.scores.answer_score for r in results) == list(range(1, 9))
    for result in results:
        assert result.sample is not None
        assert result.scores.answer_score == len(result.sample.turns[0].answer)
        assert result.sample is given[result.index]  # its place, across the resumed streams
    assert sorted(r.index for r in results) == list(range(8))


def test_without_resume_the_failure_is_raised_and_the_rest_listed(fake: FakeCuration) -> None:
    fake.curate_abort_after = [5]
    given = make_samples(8)
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        results = client.curate(given, resume=False)
        got = []
        with pytest.raises(grpc.RpcError) as raised:
            got.extend(results)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.id for r in got] == ["0", "1", "2", "3", "4"]
    assert results.unanswered[:2] == ["5", "6"] and results.streams == 1  # and 7 if sent


def test_a_spent_outage_raises_the_failure(fake: FakeCuration) -> None:
    fake.curate_abort_after = [0, 0, 0, 0]  # every stream fails before any decision
    policy = ResumePolicy(max_attempts=2, initial_backoff_seconds=0.01)
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        results = client.curate(make_samples(4), resume=policy)
        with pytest.raises(grpc.RpcError) as raised:
            list(results)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert results.streams == 3 == len(fake.curate_streams)  # the first, then two tries
    assert results.unanswered[:2] == ["0", "1"]  # read by each stream, never answered


def test_another_code_is_not_resumed(fake: FakeCuration) -> None:
    fake.curate_abort_after = [1]
    fake.curate_abort_code = grpc.StatusCode.INVALID_ARGUMENT
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        results = client.curate(make_samples(4), resume=FAST_RESUME)
        with pytest.raises(grpc.RpcError) as raised:
            list(results)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert results.streams == 1


def test_a_producer_error_still_comes_after_every_decision(fake: FakeCuration) -> None:
    def produce():  # type: ignore[no-untyped-def]
        yield from make_samples(6)
        raise RuntimeError("generator broke")

    fake.curate_abort_after = [2]
    got: list[CurateResult] = []
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        results = client.curate(produce(), resume=FAST_RESUME)
        with pytest.raises(RuntimeError, match="generator broke"):
            got.extend(results)
    assert sorted(int(r.id) for r in got) == list(range(6))


# ---------------------------------------------------------------------------------------
# A server that stops and comes back on the same port


class Restartable:
    """A fake server on a fixed 127.0.0.1 port that can stop and start again there."""

    def __init__(self, servicer: FakeCuration) -> None:
        self.servicer = servicer
        self.port = 0
        self.server: grpc.Server | None = None
        self.start()
        self.target = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CurationServiceServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None

    def restart_later(self, delay: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay), self.start()))
        thread.start()
        return thread


@pytest.fixture
def restartable() -> Iterator[Restartable]:
    server = Restartable(FakeCuration())
    yield server
    server.servicer.release()
    server.stop()


def test_sync_waits_for_a_server_that_comes_back(restartable: Restartable) -> None:
    given = make_samples(40)
    got: list[CurateResult] = []
    with CurationClient(restartable.target, retry=FAST_RETRY) as client:
        results = client.curate(iter(given), resume=FAST_RESUME)
        for result in results:
            got.append(result)
            if len(got) == 10:
                restartable.stop()  # every stream and connection of the server ends
                thread = restartable.restart_later(0.3)
    thread.join()
    assert results.streams == 2
    assert_each_once_and_matched(got, given)


def test_aio_waits_for_a_server_that_comes_back(restartable: Restartable) -> None:
    given = make_samples(40)

    async def run() -> tuple[list[CurateResult], int]:
        got: list[CurateResult] = []
        async with AsyncCurationClient(restartable.target, retry=FAST_RETRY) as client:
            results = client.curate(agen(given), resume=FAST_RESUME)
            async for result in results:
                got.append(result)
                if len(got) == 10:
                    await asyncio.to_thread(restartable.stop)
                    thread = restartable.restart_later(0.3)
        await asyncio.to_thread(thread.join)
        return got, results.streams

    got, streams = asyncio.run(run())
    assert streams == 2
    assert_each_once_and_matched(got, given)


def test_the_resume_backoff_is_capped_at_its_maximum() -> None:
    """Fails on: ``min(base, max_backoff_seconds)`` removed (0.5 * 2**19 s on try 20)."""
    policy = ResumePolicy()
    assert all(policy.backoff(n) <= policy.max_backoff_seconds * 1.2 for n in range(1, 31))


def test_samples_waiting_to_be_sent_again_are_listed_as_unanswered() -> None:
    """After a restart and before the next stream sends them, they are still unanswered
    (the caller resends them if the call fails now). Fails on: ``unanswered`` ignoring the
    resend queue."""
    stream = CurateStream.plan(resume=True)
    first = stream.requests(iter(make_samples(3)))
    assert [next(first).WhichOneof("item")] + [next(first).sample.id for _ in range(3)] == [
        "options",
        "0",
        "1",
        "2",
    ]
    stream.decode(kept_decision(1, "1"))
    stream.restart()
    assert stream.unanswered == ["0", "2"]


def test_a_second_failure_resends_in_the_original_order() -> None:
    """What the failed stream had sent goes before what it had not sent yet. Fails on:
    ``extend`` for ``extendleft(reversed(...))`` in restart."""
    stream = CurateStream.plan(resume=True)
    produced = iter(make_samples(5))
    first = stream.requests(produced)
    assert [next(first).WhichOneof("item")] + [next(first).sample.id for _ in range(3)] == [
        "options",
        "0",
        "1",
        "2",
    ]
    stream.restart()
    second = stream.requests(produced)
    assert [next(second).WhichOneof("item"), next(second).sample.id] == ["options", "0"]
    stream.restart()  # the second stream failed after resending only "0"
    third = list(stream.requests(produced))
    assert [r.sample.id for r in third[1:]] == ["0", "1", "2", "3", "4"]


def test_a_lost_status_on_a_new_stream_without_decisions_is_resumed_once_only() -> None:
    """Decisions of an earlier stream do not make a new, silent stream "going": it gets
    one blind resume, not the policy's every attempt. Fails on: restart() not resetting the
    per-stream decision count."""
    stream = CurateStream.plan(resume=FAST_RESUME)
    first = stream.requests(iter(make_samples(2)))
    list(first)
    stream.decode(kept_decision(0, "0"))
    assert stream.next_try("INTERNAL", LOST_STATUS) is not None  # it was going
    stream.restart()
    assert stream.next_try("INTERNAL", LOST_STATUS) is not None  # blind, once
    stream.restart()
    assert stream.next_try("INTERNAL", LOST_STATUS) is None
