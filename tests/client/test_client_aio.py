"""AsyncCurationClient against the fake servicer, and the bounded gather under it."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from client_fakes import FAST_RETRY, FakeCuration, make_samples

from align2.client import AsyncCurationClient, ItemError
from align2.client.aio import gather_bounded


def client_for(fake: FakeCuration, **kwargs: object) -> AsyncCurationClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return AsyncCurationClient(fake.target, **kwargs)  # type: ignore[arg-type]


async def test_chunks_run_concurrently_bounded_and_results_keep_order(
    fake: FakeCuration,
) -> None:
    # Each call waits at a 2-party barrier: the test only passes if two chunks are in flight
    # together, and max_inflight shows the bound holds.
    fake.barrier = threading.Barrier(2, timeout=10)
    async with client_for(fake, chunk_size=2, max_concurrency=2) as client:
        results = await client.score(make_samples(8))
    assert [r.id for r in results] == [str(i) for i in range(8)]
    assert [r.question_score for r in results] == [float(i) for i in range(8)]
    assert len(fake.requests) == 4
    assert fake.max_inflight == 2


async def test_item_errors_and_info(fake: FakeCuration) -> None:
    samples = make_samples(3)
    samples[2].id = "bad2"  # the first of the second chunk: the server's samples[0]
    async with client_for(fake, chunk_size=2) as client:
        reply = await client.score_with_info(samples, heads="question")
    error = ItemError(grpc.StatusCode.INVALID_ARGUMENT, "samples[2].image: bad")
    assert reply.results[2].error == error
    assert reply.results[1].question_score == 1.0
    assert reply.results[1].answer_scores == ()
    assert reply.template_version == "t1"
    assert len(reply.calls) == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_retries_transient_failures(fake: FakeCuration, code: grpc.StatusCode) -> None:
    fake.fail_next = [code]
    async with client_for(fake) as client:
        [result] = await client.score(make_samples(1))
    assert fake.attempts == 2
    assert result.ok


async def test_failed_chunk_raises_rpc_error(fake: FakeCuration) -> None:
    fake.fail_next = [grpc.StatusCode.PERMISSION_DENIED]
    async with client_for(fake, chunk_size=1, max_concurrency=1) as client:
        with pytest.raises(grpc.RpcError) as raised:
            await client.score(make_samples(3))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_deadline_exceeded_raises(fake: FakeCuration) -> None:
    fake.gate = threading.Event()
    async with client_for(fake, timeout=0.2) as client:
        with pytest.raises(grpc.RpcError) as raised:
            await client.score(make_samples(1))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_bearer_token_and_server_info(fake: FakeCuration) -> None:
    async with client_for(fake, token="tok") as client:
        info = await client.server_info()
    assert info.version == "9.9.9"
    assert fake.metadata[0]["authorization"] == "Bearer tok"


async def test_gather_bounded_keeps_index_order() -> None:
    release = [asyncio.Event() for _ in range(3)]

    async def run(i: int) -> int:
        await release[i].wait()
        if i > 0:
            release[i - 1].set()  # finish in reverse order: 2, 1, 0
        return i * 10

    release[2].set()
    assert await gather_bounded(3, run, limit=3) == [0, 10, 20]


async def test_gather_bounded_cancels_the_rest_on_failure() -> None:
    started = asyncio.Event()
    cancelled: list[int] = []

    async def run(i: int) -> int:
        if i == 0:
            await started.wait()
            raise KeyError("boom")
        started.set()
        try:
            await asyncio.Event().wait()  # never set: only cancellation ends it
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    with pytest.raises(KeyError):
        await gather_bounded(3, run, limit=3)
    assert sorted(cancelled) == [1, 2]


async def test_gather_bounded_respects_the_limit() -> None:
    running = 0
    peak = 0

    async def run(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(3):
            await asyncio.sleep(0)  # yield: unbounded, all six would be running here
        running -= 1
        return i

    assert await gather_bounded(6, run, limit=2) == list(range(6))
    assert peak == 2
