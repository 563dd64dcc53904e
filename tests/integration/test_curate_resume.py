"""``curate`` survives a server restart by itself: a real server as a child process on
127.0.0.1, SIGKILLed in the middle of a 1,000-sample stream and started again on the same
port, while the client goes on iterating with default settings.

What is compared with an uninterrupted run, and why:
- every sample gets exactly one decision, and its question score is the uninterrupted run's
  (the server batches one item at a time, so scores are bit for bit repeatable);
- decisions depend on the stream's selection window, so they are compared only where they
  are defined to be equal. The server works on one sample of a stream at a time
  (``max_stream_inflight = 1``), which makes a stream's decisions a function of its samples
  in order. The first stream decided a prefix of the samples: those decisions are the
  uninterrupted run's. The resumed stream started afresh with the first sample without a
  decision: its decisions are those of a new stream of the remaining samples.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import threading
from collections.abc import Callable

import pytest
from support import ServerProcess, png

from align2.client import AsyncCurationClient, CurateResult, CurationClient, Sample, Turn

COUNT = 1000
KILL_AFTER = 300  # decisions received before the SIGKILL


def server_args(config: pathlib.Path, port: int) -> list[str]:
    return ["--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "-1"]  # fmt: skip


@pytest.fixture(scope="module")
def config(tiny_llava: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("resume") / "align2.toml"
    path.write_text(
        f"""
[batching]
max_batch_size = 1
[limits]
max_stream_inflight = 1
[models.question]
path = "{tiny_llava}"
[models.answer]
path = "{tiny_llava}"
"""
    )
    return path


@pytest.fixture(scope="module")
def reference(config: pathlib.Path) -> list[CurateResult]:
    """The decisions of an uninterrupted run."""
    server = ServerProcess(server_args(config, 0), config.parent / "reference.log").start()
    try:
        return sync_run(server.target, make_samples(), lambda _: None)[0]
    finally:
        server.stop()


def make_samples() -> list[Sample]:
    images = [png(16 + k, 20, (40 * k, 90, 150)) for k in range(5)]
    return [
        Sample(
            id=f"s{i}",
            image=images[i % 5],
            task=("conversation", "detail")[i % 2],
            turns=[Turn(f"What is thing {i}?", f"It is {'a big ' * (i % 4)}thing {i}.")],
        )
        for i in range(COUNT)
    ]


def sync_run(
    target: str, samples: list[Sample], on_result: Callable[[int], None]
) -> tuple[list[CurateResult], int, int]:
    """The decisions, the index of the first one after a resume (or their count), and the
    streams opened; ``on_result(n)`` after the n-th decision."""
    got: list[CurateResult] = []
    resumed_at = None
    with CurationClient(target, timeout=600) as client:
        results = client.curate(iter(samples))
        for result in results:
            if resumed_at is None and results.streams > 1:
                resumed_at = len(got)
            got.append(result)
            on_result(len(got))
        return got, len(got) if resumed_at is None else resumed_at, results.streams


def aio_run(
    target: str, samples: list[Sample], on_result: Callable[[int], None]
) -> tuple[list[CurateResult], int, int]:
    async def run() -> tuple[list[CurateResult], int, int]:
        got: list[CurateResult] = []
        resumed_at = None
        async with AsyncCurationClient(target, timeout=600) as client:
            results = client.curate(samples)
            async for result in results:
                if resumed_at is None and results.streams > 1:
                    resumed_at = len(got)
                got.append(result)
                on_result(len(got))  # quick: the restart runs in its own thread
            return got, len(got) if resumed_at is None else resumed_at, results.streams

    return asyncio.run(run())


@pytest.mark.parametrize("run", [sync_run, aio_run], ids=["sync", "aio"])
def test_curate_survives_a_server_killed_mid_stream(
    run: Callable[..., tuple[list[CurateResult], int, int]],
    config: pathlib.Path,
    reference: list[CurateResult],
    tmp_path: pathlib.Path,
) -> None:
    samples = make_samples()
    first = ServerProcess(server_args(config, 0), tmp_path / "first.log").start()
    servers = [first]
    second = ServerProcess(server_args(config, first.port), tmp_path / "second.log")
    restart = threading.Thread(target=lambda: servers.append(second.start()))

    def kill_in_the_middle(received: int) -> None:
        if received == KILL_AFTER:
            assert first.proc is not None
            first.proc.kill()  # SIGKILL: no drain, no status, the connection just breaks
            first.proc.wait()
            restart.start()  # the client is not told: it finds the server again itself

    try:
        got, resumed_at, streams = run(first.target, samples, kill_in_the_middle)
        restart.join()
        tail, _, _ = run(second.target, samples[resumed_at:], lambda _: None)
    finally:
        restart.join()
        for server in servers:
            server.stop()

    assert streams >= 2 and KILL_AFTER <= resumed_at < COUNT
    assert collections.Counter(r.id for r in got) == collections.Counter(s.id for s in samples)
    expected = {r.id: r for r in reference}
    for result in got:
        before = expected[result.id]
        assert result.scores.question_score == before.scores.question_score
        if result.scores.answer_scores and before.scores.answer_scores:
            assert result.scores.answer_scores == before.scores.answer_scores
    assert decisions(got[:resumed_at]) == decisions(reference[:resumed_at])
    assert decisions(got[resumed_at:]) == decisions(tail)


def decisions(results: list[CurateResult]) -> list[tuple[str, str, float | None]]:
    return [(r.id, r.decision, r.question_threshold) for r in results]
