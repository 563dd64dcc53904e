"""Soak: rounds of mixed calls (Score, Align, a Curate stream, GetServerInfo, a refused
call, health) against one real server in this process, for ALIGN2_SOAK_SECONDS (12 in
`make test`; `make soak` runs longer and prints its figures, kept in docs/operating.md).

RSS is measured after a warm-up (the first rounds allocate the batch shapes, caches and
arenas for good) and then every round: the growth past the warm-up must stay under
RSS_GROWTH_MB, and every call must answer as it did in the first round."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import grpc
import pytest
from load import SERVING, env_int, health, rss_mb
from support import ServerThread, jpeg, png

from align2.client import CurationClient, Sample, Turn
from align2.server.config import Config, ModelConfig

SECONDS = env_int("ALIGN2_SOAK_SECONDS", 12)
WARM_UP_ROUNDS = 5
RSS_GROWTH_MB = 150


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path, tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = Config()
    config.models = {n: ModelConfig(path=str(tiny_llava)) for n in ("question", "answer")}
    config.models["llm"] = ModelConfig(path=str(tiny_llm), max_length=1024)
    config.align.decoding.max_new_tokens = 4
    server = ServerThread(config).start()
    yield server
    server.stop()


def batch(round_: int, n: int) -> list[Sample]:
    return [
        Sample(
            id=f"r{round_}-{i}",
            image=(png if i % 2 else jpeg)(20 + (round_ + i) % 40, 24 + i),
            task=("conversation", "detail", "complex_reasoning")[i % 3],
            turns=[Turn(f"<image>\nWhat is item {i}?", f"Item {i} is a box.")] * (1 + i % 3),
        )
        for i in range(n)
    ]


def one_round(client: CurationClient, round_: int) -> None:
    scored = client.score(batch(round_, 6))
    assert all(r.error is None for r in scored)
    aligned = client.align(batch(round_, 2))
    assert all(r.error is None for r in aligned)
    decided = list(client.curate(iter(batch(round_, 12)), min_window=4))
    assert len(decided) == 12 and all(r.error is None for r in decided)
    assert client.server_info().limits.max_samples_per_call > 0
    [refused] = client.score([Sample(id="bad", image=b"not an image", turns=[Turn("Q?", "A.")])])
    assert refused.error is not None and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.score(batch(round_, 1), question_model="missing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_mixed_calls_for_a_while_keep_memory_flat(server: ServerThread) -> None:
    rounds, trace = 0, []
    with CurationClient(server.target, timeout=60, retry=False) as client:
        for _ in range(WARM_UP_ROUNDS):
            one_round(client, rounds)
            rounds += 1
        start, started = rss_mb(), time.monotonic()
        peak = start
        while time.monotonic() - started < SECONDS:
            one_round(client, rounds)
            rounds += 1
            peak = max(peak, rss_mb())
            if rounds % 50 == 0:
                trace.append(f"{rounds}: +{rss_mb() - start:.0f}")
        end = rss_mb()
        with grpc.insecure_channel(server.target) as channel:
            assert health(channel) == SERVING
    seconds = time.monotonic() - started
    print(
        f"\nsoak: {rounds - WARM_UP_ROUNDS} rounds in {seconds:.0f} s "
        f"({(rounds - WARM_UP_ROUNDS) / seconds:.1f}/s); RSS {start:.0f} MB after warm-up, "
        f"end +{end - start:.0f} MB, peak +{peak - start:.0f} MB; by round: {', '.join(trace)}"
    )
    assert peak - start < RSS_GROWTH_MB
