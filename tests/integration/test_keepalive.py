"""A client that vanishes without closing its connection (its host or pod gone, a network
partition, a NAT that drops the flow: no FIN, no RST) must not hold its calls open: the
server pings the connection (server.keepalive_seconds) and closes it when the ping goes
unanswered, so a Curate stream on it ends and frees what it held (its selection key, its
window scores). Emulated by a TCP proxy that stops forwarding in both directions and
never closes. Without server keepalive gRPC waits 2 hours."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from support import ServerThread, png, score_config

from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

KEEPALIVE = 1.0


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    config.server.keepalive_seconds = KEEPALIVE
    config.server.keepalive_timeout_seconds = KEEPALIVE
    config.curate.max_selection_keys = 1
    config.curate.selection_key_idle_seconds = 0.5
    server = ServerThread(config).start()
    yield server
    server.stop()


class BlackHoleProxy:
    """Forwards TCP both ways until ``cut()``; then forwards nothing and closes nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dead = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        self._tasks += [asyncio.create_task(self._pump(cr, sw)),
                        asyncio.create_task(self._pump(sr, cw))]  # fmt: skip

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.dead.is_set():
            data = await reader.read(65536)
            if not data or self.dead.is_set():
                break
            writer.write(data)
            await writer.drain()
        await asyncio.Event().wait()  # hold both sockets open, silent

    def cut(self) -> None:
        self.dead.set()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._server.close()


def sample(i: int) -> pb.Sample:
    return pb.Sample(
        id=f"s{i}",
        image=png(20 + i, 20),
        task="detail",
        turns=[pb.Turn(question=f"<image>\nWhat is item {i}?", answer=f"Item {i}.")],
    )


async def curate_one(stub: pb_grpc.CurationServiceStub, key: str) -> list[int]:
    async def requests() -> AsyncIterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions(min_window=1, selection_key=key))
        yield pb.CurateRequest(sample=sample(0))

    return [r.decision async for r in stub.Curate(requests(), timeout=30)]


async def test_a_stream_whose_client_vanished_ends_and_frees_its_selection_key(
    server: ServerThread,
) -> None:
    proxy = BlackHoleProxy(server.app.port)
    port = await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.CurationServiceStub(channel)
    decided: list[pb.CurateResponse] = []
    all_decided = asyncio.Event()

    async def requests() -> AsyncIterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions(min_window=1, selection_key="gone"))
        for i in range(4):
            yield pb.CurateRequest(sample=sample(i))
        await asyncio.Event().wait()  # a producer between bursts: no half-close

    async def read() -> None:
        async for response in stub.Curate(requests()):
            decided.append(response)
            if len(decided) == 4:
                all_decided.set()

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(30):
            await all_decided.wait()
        proxy.cut()  # the client is gone: nothing more reaches the server, nothing closes
        async with grpc.aio.insecure_channel(server.target) as direct:
            other = pb_grpc.CurationServiceStub(direct)
            # the vanished stream holds the only selection key until its connection is closed
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await curate_one(other, "new")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            started, decisions = time.monotonic(), None
            while time.monotonic() - started < 20:
                await asyncio.sleep(0.5)
                try:
                    decisions = await curate_one(other, "new")
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # within keepalive + its timeout + the key's idle TTL (2.5 s), on a busy machine
            assert decisions is not None, "the vanished client's stream still holds its key"
    finally:
        reader.cancel()
        proxy.close()
        await channel.close(grace=None)
