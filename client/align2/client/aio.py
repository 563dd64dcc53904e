"""The asyncio client: the twin of :mod:`align2.client.sync` on ``grpc.aio``.

Request building, chunking and response parsing are the shared functions of
:mod:`align2.client.calls`; here chunks are sent concurrently, at most ``max_concurrency``
at a time, and their images are read in a worker thread so the event loop never blocks on
disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import grpc

from align2.client.aio_curate import AsyncCurateCall
from align2.client.base import ClientBase
from align2.client.calls import DEFAULT_HEADS, AlignCall, ChunkedCall, ScoreCall
from align2.client.channel import ClientArgs
from align2.client.curate import AsyncCurateResults, CurateArgs, CurateStream
from align2.client.health import SERVICE, ServingWait, health_request, health_status
from align2.client.results import (
    AlignReply,
    AlignResult,
    ScoreReply,
    ScoreResult,
)
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.12

T = TypeVar("T")
ReplyT = TypeVar("ReplyT")

DEFAULT_MAX_CONCURRENCY = 4


class AsyncCurationClient(ClientBase):
    """Asyncio client of an align2 server; ``target`` and the keyword arguments as in
    :class:`~align2.client.channel.ClientOptions`, plus ``max_concurrency``: the most chunks
    (RPCs) of one call in flight at once.

    Construct it inside the running event loop (``async with AsyncCurationClient(...)``).
    Same contracts as :class:`align2.client.CurationClient`: one result per input, same
    order; a failed RPC raises ``grpc.RpcError`` (``grpc.aio.AioRpcError``) after the other
    chunks of the call are cancelled.
    """

    _aio: ClassVar[bool] = True

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **options: Unpack[ClientArgs],
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: {max_concurrency} is not positive")
        self._max_concurrency = max_concurrency
        super().__init__(target, **options)

    async def score(
        self,
        samples: Sequence[Sample],
        heads: str | Iterable[str] = DEFAULT_HEADS,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, seen by the server too
        priority: str | None = None,
        question_model: str | None = None,
        answer_model: str | None = None,
    ) -> list[ScoreResult]:
        """Reward-model scores: one result per input sample, same order. Arguments as in
        :meth:`align2.client.CurationClient.score`."""
        reply = await self.score_with_info(
            samples,
            heads,
            timeout=timeout,
            priority=priority,
            question_model=question_model,
            answer_model=answer_model,
        )
        return reply.results

    async def score_with_info(
        self,
        samples: Sequence[Sample],
        heads: str | Iterable[str] = DEFAULT_HEADS,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, seen by the server too
        priority: str | None = None,
        question_model: str | None = None,
        answer_model: str | None = None,
    ) -> ScoreReply:
        """Like :meth:`score`, with the models, template version and timing of the RPCs."""
        call = ScoreCall.plan(
            samples,
            heads,
            chunk_size=self.chunk_size,
            max_message_bytes=self.max_message_bytes,
            priority=priority,
            question_model=question_model,
            answer_model=answer_model,
        )
        return await self._send(call, timeout)

    async def align(
        self,
        samples: Sequence[Sample],
        *,
        parts: str = "both",
        review: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        template: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, seen by the server too
        priority: str | None = None,
    ) -> list[AlignResult]:
        """Restyle samples with the server's inner LLM: one result per input, same order.
        Arguments as in :meth:`align2.client.CurationClient.align`."""
        reply = await self.align_with_info(
            samples,
            parts=parts,
            review=review,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            template=template,
            timeout=timeout,
            priority=priority,
        )
        return reply.results

    async def align_with_info(
        self,
        samples: Sequence[Sample],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, seen by the server too
        priority: str | None = None,
        **options: Any,
    ) -> AlignReply:
        """Like :meth:`align` (same keyword arguments), with the model, template set, token
        counts and timing of the RPCs."""
        call = AlignCall.plan(
            samples,
            chunk_size=self.chunk_size,
            max_message_bytes=self.max_message_bytes,
            priority=priority,
            **options,
        )
        return await self._send(call, timeout)

    def curate(
        self,
        samples: Iterable[Sample] | AsyncIterable[Sample],
        *,
        timeout: float | None = None,
        **options: Unpack[CurateArgs],
    ) -> AsyncCurateResults:
        """The asyncio twin of :meth:`CurationClient.curate` (``async for result in
        client.curate(samples)``), resumed the same way; ``samples`` may be an async
        iterable. Images are read in a worker thread."""
        stream = CurateStream.plan(**options)
        stream.max_message_bytes = self.max_message_bytes  # what one sample may take
        deadline = self._options.timeout if timeout is None else timeout
        curate = AsyncCurateCall(self._curate_rpc, self._check_health, stream, deadline)
        return AsyncCurateResults(stream, curate.results(samples), curate.cancel)

    async def server_info(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline
    ) -> pb.GetServerInfoResponse:
        """What the server runs: models, versions, limits and batching settings."""
        return await self._rpc(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    async def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline
    ) -> str:
        """The gRPC health status of ``service`` ("" = the server), e.g. "SERVING"."""
        reply = await self._rpc(self._health.Check, health_request(service), timeout)
        return health_status(reply)

    async def close(self) -> None:
        """Close the channel; RPCs in flight are cancelled. Idempotent."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncCurationClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_until_serving(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline
        """:meth:`CurationClient.wait_until_serving`, awaited."""
        wait = ServingWait(timeout, self._options.metadata)
        while (watch := wait.watch(self._health)) is not None:
            try:
                async for reply in watch:
                    if health_status(reply) == "SERVING":
                        return
                pause = wait.pause()  # the server ended the watch (stopping): again
            except grpc.RpcError as error:
                pause = wait.failed(error)
            finally:
                watch.cancel()
            await asyncio.sleep(pause)
        raise wait.expired()

    def _check_health(self, timeout: float) -> Any:
        """A health check of the Curate service that waits for a connection (gRPC's
        reconnection, with its backoff), at most ``timeout`` seconds: an awaitable call."""
        return self._health.Check(
            health_request(SERVICE),
            timeout=timeout,
            wait_for_ready=True,
            metadata=self._options.metadata,
        )

    def _curate_rpc(self, timeout: float | None) -> Any:
        """A new Curate stream (a ``grpc.aio`` stream-stream call). ``timeout``: seconds left
        of the call's deadline (None: none)."""
        return self._stub.Curate(timeout=timeout, metadata=self._options.metadata)

    async def _send(
        self,
        call: ChunkedCall[Any, Any, ReplyT],
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline
    ) -> ReplyT:
        """The chunks of ``call``, at most ``max_concurrency`` RPCs at once; images are read
        in a worker thread."""
        method = getattr(self._stub, call.method)

        async def send(index: int) -> Any:
            chunk = await asyncio.to_thread(call.encode, index)
            response = None
            if chunk.request is not None:
                response = await self._rpc(method, chunk.request, timeout)
            return call.decode(chunk, response)

        return call.reply(await gather_bounded(len(call.chunks), send, self._max_concurrency))


async def gather_bounded(count: int, run: Callable[[int], Awaitable[T]], limit: int) -> list[T]:
    """``[await run(0), ..., await run(count - 1)]`` with at most ``limit`` running at once.

    Results are in index order whatever order they finish in. On the first failure the
    other runs are cancelled and awaited, then the failure is raised as is (not wrapped in an
    ExceptionGroup, so callers catch ``grpc.RpcError`` directly).
    """
    semaphore = asyncio.Semaphore(limit)

    async def bounded(index: int) -> T:
        async with semaphore:
            return await run(index)

    tasks = [asyncio.ensure_future(bounded(i)) for i in range(count)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
