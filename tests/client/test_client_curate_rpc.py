"""Both clients' ``curate`` against the fake servicer: matching by sequence, local failures,
producer errors, and how a stream ends early (aclose, cancel, the caller's cancellation, a
deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc
import pytest
from client_fakes import FAST_RETRY, FakeCuration

from align2.client import AsyncCurationClient, CurateResult, CurationClient, Sample, Turn


def sample(sample_id: str, answer: str = "x") -> Sample:
    return Sample(id=sample_id, image=b"png", turns=[Turn("What?", answer)])


def repeated_ids() -> list[Sample]:
    """Three samples under one id; the fake's answer score is the answer's length."""
    return [sample("same", "a" * n) for n in (1, 2, 3)]


def assert_matched(results: list[CurateResult], given: list[Sample]) -> None:
    assert sorted(len(r.sample.turns[0].answer) for r in results if r.sample) == [1, 2, 3]
    for result in results:
        assert result.kept and result.sample is not None
        assert result.scores.answer_score == len(result.sample.turns[0].answer)
        assert any(result.sample is s for s in given)


async def agen(samples: Iterable[Sample], error: Exception | None = None) -> AsyncIterator[Sample]:
    for item in samples:
        await asyncio.sleep(0)  # a producer that awaits between samples
        yield item
    if error is not None:
        raise error


def sync_client(fake: FakeCuration, **kwargs: object) -> CurationClient:
    return CurationClient(fake.target, retry=FAST_RETRY, **kwargs)  # type: ignore[arg-type]


def async_client(fake: FakeCuration, **kwargs: object) -> AsyncCurationClient:
    return AsyncCurationClient(fake.target, retry=FAST_RETRY, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Blocking client


def test_sync_decisions_out_of_order_go_to_their_own_samples(fake: FakeCuration) -> None:
    fake.curate_reversed = True
    given = repeated_ids()
    with sync_client(fake, token="tok") as client:
        results = client.curate(iter(given), question_keep_fraction=0.5, priority="bulk")
        collected = list(results)
    assert_matched(collected, given)
    assert results.unanswered == []
    [options] = fake.curate_options
    assert options.question_keep_fraction == pytest.approx(0.5)
    assert not options.HasField("align_options")
    assert fake.metadata[0]["authorization"] == "Bearer tok"


def test_sync_unreadable_image_is_a_local_error_and_not_sent(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    missing = Sample(id="m", image=tmp_path / "gone.png", turns=[Turn("Q?", "A.")])
    with sync_client(fake) as client:
        results = {r.id: r for r in client.curate([sample("a"), missing, sample("b")])}
    assert fake.curated == ["a", "b"]
    assert results["m"].decision == "error" and results["m"].error is not None
    assert results["m"].error.code == grpc.StatusCode.NOT_FOUND
    assert results["a"].kept and results["b"].kept


def test_sync_producer_error_comes_after_the_accepted_samples_answers(
    fake: FakeCuration,
) -> None:
    def produce() -> Iterator[Sample]:
        yield sample("a")
        yield sample("b")
        raise RuntimeError("generator broke")

    seen: list[str] = []
    with sync_client(fake) as client, pytest.raises(RuntimeError, match="generator broke"):
        seen.extend(r.id for r in client.curate(produce()))
    assert seen == ["a", "b"]


def test_sync_deadline_fails_the_stream_and_lists_the_unanswered(fake: FakeCuration) -> None:
    fake.gate = threading.Event()  # never set: the fake answers the first sample, then waits
    seen: list[str] = []
    with sync_client(fake, timeout=0.5) as client:
        results = client.curate([sample("a"), sample("b"), sample("c")])
        with pytest.raises(grpc.RpcError) as raised:
            seen.extend(r.id for r in results)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not set(seen) & set(results.unanswered)


# ---------------------------------------------------------------------------------------
# Asyncio client


@pytest.mark.parametrize("kind", ["list", "generator", "async generator"])
async def test_aio_takes_any_iterable_and_matches_by_sequence(
    fake: FakeCuration, kind: str
) -> None:
    fake.curate_reversed = True
    given = repeated_ids()
    produced = {
        "list": lambda: given,
        "generator": lambda: (s for s in given),
        "async generator": lambda: agen(given),
    }[kind]()
    async with async_client(fake) as client:
        results = client.curate(produced, answer_keep_fraction=0.25)  # type: ignore[arg-type]
        collected = [r async for r in results]
    assert_matched(collected, given)
    assert results.unanswered == []
    assert fake.curate_options[0].answer_keep_fraction == pytest.approx(0.25)


async def test_aio_unreadable_image_is_a_local_error_and_not_sent(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    missing = Sample(id="m", image=tmp_path / "gone.png", turns=[Turn("Q?", "A.")])
    async with async_client(fake) as client:
        collected = [r async for r in client.curate(agen([sample("a"), missing]))]
    results = {r.id: r for r in collected}
    assert fake.curated == ["a"]
    assert results["m"].decision == "error" and results["m"].error is not None
    assert results["m"].error.code == grpc.StatusCode.NOT_FOUND
    assert results["a"].kept


async def test_aio_producer_error_comes_after_the_accepted_samples_answers(
    fake: FakeCuration,
) -> None:
    seen: list[str] = []
    async with async_client(fake) as client:
        results = client.curate(agen([sample("a"), sample("b")], RuntimeError("broke")))
        with pytest.raises(RuntimeError, match="broke"):
            async for result in results:
                seen.append(result.id)
    assert seen == ["a", "b"]
    assert results.unanswered == []


async def test_aio_aclose_ends_the_stream(fake: FakeCuration) -> None:
    fake.gate = threading.Event()  # never set: the fake answers the first sample, then waits
    async with async_client(fake) as client:
        async with contextlib.aclosing(client.curate(agen(sample(str(i)) for i in range(5)))) as (
            results
        ):
            async for first in results:
                assert first.id == "0"
                break
        assert await asyncio.to_thread(fake.curate_ended.wait, 10)  # the RPC was cancelled


async def test_aio_cancel_raises_cancelled_as_an_rpc_error(fake: FakeCuration) -> None:
    fake.gate = threading.Event()
    async with async_client(fake) as client:
        results = client.curate([sample("a"), sample("b"), sample("c")])
        first = await anext(results)
        results.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            async for _ in results:
                pass
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert first.id not in results.unanswered


async def test_aio_cancelling_the_caller_cancels_it_not_an_rpc_error(fake: FakeCuration) -> None:
    fake.gate = threading.Event()
    answered = asyncio.Event()

    async def consume(client: AsyncCurationClient) -> None:
        async for _ in client.curate([sample("a"), sample("b")]):
            answered.set()

    async with async_client(fake) as client:
        task = asyncio.ensure_future(consume(client))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(fake.curate_ended.wait, 10)


async def test_aio_deadline_fails_the_stream_and_lists_the_unanswered(
    fake: FakeCuration,
) -> None:
    fake.gate = threading.Event()
    seen: list[str] = []
    async with async_client(fake, timeout=0.5) as client:
        results = client.curate(agen([sample("a"), sample("b"), sample("c")]))
        with pytest.raises(grpc.RpcError) as raised:
            async for result in results:
                seen.append(result.id)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not set(seen) & set(results.unanswered)
