"""Backpressure end to end: the request-bytes budget (limits.max_inflight_bytes) and the
retry pushback of a full queue (grpc-retry-pushback-ms), on a real server with a tiny
model, through align2.client."""

from __future__ import annotations

import asyncio
import io
import pathlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import Image
from support import ServerThread, error_details, metric, score_config

from align2.client import AsyncCurationClient, CurationClient, Sample, Turn
from align2.server.core.drain import MAX_RETRY_SECONDS, MIN_RETRY_SECONDS

IMAGE_SIDE = 150  # an incompressible 150 x 150 RGB PNG: about 68 KB
BUDGET = 200_000  # two such calls fit, a third does not


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    config.limits.max_message_bytes = BUDGET
    config.limits.max_inflight_bytes = BUDGET
    config.batching.max_queue_items = 16
    server = ServerThread(config).start()
    yield server
    server.stop()


def noise_png(seed: int) -> bytes:
    pixels = random.Random(seed).randbytes(IMAGE_SIDE * IMAGE_SIDE * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (IMAGE_SIDE, IMAGE_SIDE), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def big_sample(i: int) -> Sample:
    return Sample(id=f"big{i}", image=noise_png(i), turns=[Turn("What is it?", "Noise.")])


class Gate:
    """Holds every batch of a runtime until opened (created and opened on the server loop)."""

    def __init__(self, server: ServerThread, runtime: Any) -> None:
        self.server = server
        self.batcher = runtime.batcher
        self.original = self.batcher._run_batch
        self.event: asyncio.Event = server.call(self._make_event())

        async def gated(items: Any) -> Any:
            await self.event.wait()
            return await self.original(items)

        self.batcher._run_batch = gated

    @staticmethod
    async def _make_event() -> asyncio.Event:
        return asyncio.Event()

    async def _set(self) -> None:
        self.event.set()

    def open(self) -> None:
        self.batcher._run_batch = self.original
        self.server.call(self._set())


async def _in_flight(budget: Any) -> int:
    return int(budget.in_flight)


def test_calls_beyond_the_byte_budget_are_refused_and_the_budget_is_released(
    server: ServerThread,
) -> None:
    budget = server.app.request_bytes
    samples = [big_sample(i) for i in range(5)]
    assert 2 * len(samples[0].image) < BUDGET < 3 * len(samples[0].image)
    gate = Gate(server, server.app._runtimes["question"])

    async def burst() -> tuple[list[BaseException], int, list[Any]]:
        async with AsyncCurationClient(server.target, retry=False, timeout=60) as client:
            pending = {asyncio.ensure_future(client.score([s])) for s in samples}
            refused: list[BaseException] = []
            # The admitted calls wait at the gate: only refusals can finish before it opens.
            while len(refused) < 3:
                done, pending = await asyncio.wait(
                    pending, timeout=30, return_when=asyncio.FIRST_COMPLETED
                )
                assert done, "the calls beyond the budget were not refused"
                refused += [task.exception() for task in done]
            held = server.call(_in_flight(budget))
            gate.open()
            results = await asyncio.gather(*pending)
            return refused, held, results

    try:
        refused, held, results = asyncio.run(burst())
    finally:
        gate.open()
    assert len(results) == 2 and all(r[0].error is None for r in results)
    assert 2 * len(samples[0].image) < held <= BUDGET
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_inflight_bytes 200000" in (error.details() or "")
        retry = error_details(error)["RetryInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
    assert server.call(_in_flight(budget)) == 0

    async def again() -> Any:
        async with AsyncCurationClient(server.target, retry=False, timeout=60) as client:
            return await asyncio.gather(*(client.score([s]) for s in samples[:2]))

    assert all(r[0].error is None for r in asyncio.run(again()))


async def _reserve(batcher: Any, count: int) -> Any:
    return batcher.reserve(count)


async def _release(reservation: Any) -> None:
    reservation.release()


async def _seconds_per_item(batcher: Any) -> float | None:
    return batcher.drain.seconds_per_item  # type: ignore[no-any-return]


def _pushback_ms(error: grpc.RpcError) -> int:
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return int(trailers["grpc-retry-pushback-ms"])


def test_a_full_queue_pushes_back_each_refusal_to_its_turn(server: ServerThread) -> None:
    batcher = server.app._runtimes["question"].batcher
    per_item = server.call(_seconds_per_item(batcher))
    assert per_item is not None  # measured from the warm-up batch at least
    held = server.call(_reserve(batcher, batcher.max_queue))
    refusals = []
    try:
        with CurationClient(server.target, retry=False, timeout=60) as client:
            for i in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    client.score([big_sample(i)])  # one turn: 2 forward passes
                refusals.append(info.value)
    finally:
        server.call(_release(held))
    first, second = (_pushback_ms(e) for e in refusals)
    for error, pushback in zip(refusals, (first, second), strict=True):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details(error)["RetryInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToMilliseconds() == pushback  # one delay, said twice
    # The first caller's turn: once 2 items have finished at the measured pace (bounded).
    assert first == round(min(max(2 * per_item, MIN_RETRY_SECONDS), MAX_RETRY_SECONDS) * 1000)
    assert first <= second <= MAX_RETRY_SECONDS * 1000  # the next caller: the turn after
    with CurationClient(server.target, timeout=60) as client:
        assert client.score([big_sample(0)])[0].error is None


def test_a_curate_sample_that_waits_for_room_is_not_counted_as_overload(
    server: ServerThread,
) -> None:
    """A full queue refuses a Score call (rejected: overloaded) but only delays a Curate
    sample, which waits for room inside its stream and is decided: its refusals count as
    rejected "waited", so that an alert on overload does not fire on a pacing stream."""
    batcher = server.app._runtimes["question"].batcher
    before = {r: metric("align2_items_rejected_total", reason=r) for r in ("overloaded", "waited")}
    held = server.call(_reserve(batcher, batcher.max_queue))

    def release_once_refused() -> None:  # room only after the sample met the full queue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if metric("align2_items_rejected_total", reason="waited") > before["waited"]:
                break
            time.sleep(0.01)
        server.call(_release(held))

    released = threading.Thread(target=release_once_refused)
    released.start()
    try:
        with CurationClient(server.target, retry=False, timeout=60) as client:
            [result] = client.curate([big_sample(0)], question_keep_fraction=1.0)
    finally:
        released.join()
    assert result.error is None and result.decision == "kept"
    after = {r: metric("align2_items_rejected_total", reason=r) for r in ("overloaded", "waited")}
    assert after["overloaded"] == before["overloaded"]
    assert after["waited"] > before["waited"]
    # The same full queue refusing a Score call: overloaded.
    held = server.call(_reserve(batcher, batcher.max_queue))
    try:
        with (
            CurationClient(server.target, retry=False, timeout=60) as client,
            pytest.raises(grpc.RpcError),
        ):
            client.score([big_sample(1)])
    finally:
        server.call(_release(held))
    assert metric("align2_items_rejected_total", reason="overloaded") > after["overloaded"]


async def _budget_state(budget: Any) -> tuple[int, int]:
    return int(budget.in_flight), int(budget.waiting)


def test_curate_streams_hold_no_more_sample_bytes_than_the_budget_and_lose_none(
    server: ServerThread,
) -> None:
    """Two streams of three ~68 KB samples on a 200 KB budget, scoring held back: two
    samples are held (across both streams), one of each stream waits unrefused, a Score
    call is refused meanwhile, and once scoring runs every sample is decided. Fails on:
    streams bounded only by their slots (their samples' bytes never claimed)."""
    budget = server.app.request_bytes
    size = len(big_sample(0).image)  # type: ignore[arg-type]
    gate = Gate(server, server.app._runtimes["question"])

    async def run() -> tuple[tuple[int, int], list[Any], grpc.StatusCode | None]:
        async with AsyncCurationClient(server.target, retry=False, timeout=120) as client:

            async def stream(first: int) -> list[Any]:
                samples = [big_sample(i) for i in range(first, first + 3)]
                found = client.curate(samples, question_keep_fraction=1.0, min_window=1)
                return [r async for r in found]

            streams = [asyncio.ensure_future(stream(k)) for k in (0, 3)]
            state = (0, 0)
            for _ in range(3000):  # until both streams wait (at most 30 s)
                state = server.call(_budget_state(budget))
                if state[1] == 2:
                    break
                await asyncio.sleep(0.01)
            refused: grpc.StatusCode | None = None
            try:
                await client.score([big_sample(9)])
            except grpc.aio.AioRpcError as error:
                refused = error.code()
            gate.open()
            decided = [r for done in await asyncio.gather(*streams) for r in done]
            return state, decided, refused

    try:
        (held, waiting), decided, refused = asyncio.run(run())
    finally:
        gate.open()
    assert waiting == 2 and 2 * size <= held <= BUDGET
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(r.id for r in decided) == [f"big{i}" for i in range(6)]
    assert all(r.error is None for r in decided)
    assert server.call(_budget_state(budget)) == (0, 0)
