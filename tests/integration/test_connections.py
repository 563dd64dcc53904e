"""The server's connections: closed after ``server.max_connection_age_seconds`` so that a
long-lived client resolves its target again (a scale-up reaches it) without cutting what
runs on them; and a gRPC port that is taken is not shared."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from support import metric, png, score_config

from align2.client import CurationClient, Sample, Turn
from align2.server.app import App
from align2.server.testing import ServerThread

AGE = 0.5  # seconds


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    config.server.max_connection_age_seconds = AGE
    server = ServerThread(config).start()
    yield server
    server.stop()


def sample(i: int) -> Sample:
    return Sample(id=f"s{i}", image=png(), task="detail", turns=[Turn(f"What is {i}?", "A box.")])


def test_an_old_connection_is_replaced_and_no_call_fails(server: ServerThread) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with CurationClient(server.target, timeout=30) as client:
        client._channel.subscribe(states.append, try_to_connect=False)
        started = time.monotonic()
        results = []
        while time.monotonic() - started < 6 * AGE:
            results += client.score([sample(len(results))], heads=["question"])
            time.sleep(0.05)
    assert results and all(r.error is None for r in results)
    # READY, then the server's GOAWAY (IDLE), then a new connection: READY again.
    ready = [i for i, s in enumerate(states) if s is grpc.ChannelConnectivity.READY]
    assert len(ready) >= 2, states


def test_a_stream_outlives_its_connections_age(server: ServerThread) -> None:
    """A Curate stream open for several ages answers every sample it sends."""

    def produce() -> Iterator[Sample]:
        for i in range(8):
            time.sleep(AGE / 2)
            yield sample(i)

    def streams() -> dict[str, float]:
        return {
            code: metric("align2_requests_total", rpc="Curate", code=code)
            for code in ("OK", "UNAVAILABLE", "CANCELLED", "INTERNAL")
        }

    before = streams()
    with CurationClient(server.target, timeout=60) as client:
        results = list(client.curate(produce(), question_keep_fraction=1.0))
    assert sorted(r.id for r in results) == [f"s{i}" for i in range(8)]
    assert all(r.error is None for r in results)
    # One stream, never cut and resumed by the client on a new connection.
    after = streams()
    assert {k: after[k] - before[k] for k in after} == {
        "OK": 1,
        "UNAVAILABLE": 0,
        "CANCELLED": 0,
        "INTERNAL": 0,
    }


def test_a_taken_port_fails_the_second_server(
    server: ServerThread, tiny_llava: pathlib.Path
) -> None:
    config = score_config(tiny_llava)
    config.server.host, config.server.port = "127.0.0.1", server.app.port
    config.server.metrics_port = -1
    app = App(config)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            asyncio.run(app.start())
        except BaseException as exc:  # the failure is what is tested
            failed.append(exc)
            asyncio.run(app.stop())

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(120)
    assert failed, "a second server started on a port that is taken"
    assert str(server.app.port) in str(failed[0])
