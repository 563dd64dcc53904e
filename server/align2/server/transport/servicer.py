"""The align2.v1 CurationService servicer: thin, one core call per RPC (Curate: one core
stream per RPC).

Errors raised by the core travel up to StatusInterceptor, which maps them to statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from align2.server.config import LimitsConfig
from align2.server.core.alignment import Aligner
from align2.server.core.curation import Curator
from align2.server.core.lifecycle import Lifecycle
from align2.server.core.priority import Priority
from align2.server.core.scoring import Scorer
from align2.server.errors import Unimplemented
from align2.server.transport import convert
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc


class CurationServicer(pb_grpc.CurationServiceServicer):
    def __init__(
        self,
        lifecycle: Lifecycle,
        limits: LimitsConfig,
        align_off: str,
        scorer: Scorer | None,
        server_info: Callable[[], pb.GetServerInfoResponse],
        aligner: Aligner | None = None,
        curator: Curator | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._limits = limits  # what the request conversion need not read (see convert)
        self._align_off = align_off  # why Align is off (Config.align_off_reason)
        self._scorer = scorer
        self._server_info = server_info
        self._aligner = aligner
        self._curator = curator

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        self._lifecycle.check_serving()
        if self._scorer is None:
            raise Unimplemented("Score is disabled on this server (score.enabled = false)")
        call = convert.score_call_from_proto(request, self._limits, *_call_context(context))
        return convert.score_response_to_proto(await self._scorer.score(call))

    async def Align(
        self, request: pb.AlignRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlignResponse:
        self._lifecycle.check_serving()
        if self._aligner is None:
            raise Unimplemented(f"Align is disabled on this server ({self._align_off})")
        call = convert.align_call_from_proto(request, self._limits, *_call_context(context))
        return convert.align_response_to_proto(await self._aligner.align(call))

    async def Curate(
        self, request_iterator: AsyncIterator[pb.CurateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CurateResponse]:
        try:
            self._lifecycle.check_serving()
            if self._curator is None:
                raise Unimplemented(
                    "Curate is disabled on this server (needs score.enabled and "
                    "limits.max_stream_inflight > 0)"
                )
            deadline, metadata_priority = _call_context(context)
            requests = convert.curate_requests_from_proto(
                request_iterator, self._limits, metadata_priority
            )

            def priority() -> Priority:  # of a stream without options: only then read
                return convert.priority_from_proto(pb.PRIORITY_UNSPECIFIED, metadata_priority)

            stream = self._curator.stream(requests, deadline, priority)
            async with contextlib.aclosing(stream):  # a call gRPC closes stops its work now
                async for curated in stream:
                    yield convert.curated_to_proto(curated)
        except Exception:
            await _linger(request_iterator)
            raise

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self._server_info()


LINGER_SECONDS = 0.5
"""How long a failing Curate stream goes on reading (and dropping) what its client still
sends before its status goes out."""


async def _linger(requests: AsyncIterator[pb.CurateRequest]) -> None:
    """Read and drop the client's messages until it half-closes, at most LINGER_SECONDS.

    grpc.aio (1.85) fails a client's write that is in flight when the call ends, and then
    overwrites the call's status with its own INTERNAL ("Failed execute_batch"): a stream
    refused at its options (RESOURCE_EXHAUSTED, INVALID_ARGUMENT) reached about one in six
    refused callers as INTERNAL when they sent samples right behind the options. Reading
    the rest first lets those writes complete; a client that keeps sending past the bound
    gets the status anyway. What is read here was never accepted (the stream failed first)
    and is held one message at a time. Not covered: a stream whose reading was cancelled
    (the server leaving SERVING) cannot be read on; its accepted samples were answered
    first, and align2's client resumes a stream whose status was lost (after decisions;
    and once without, until the next decision)."""
    with contextlib.suppress(Exception):  # a deadline, a cancelled or broken call
        async with asyncio.timeout(LINGER_SECONDS):
            async for _ in requests:
                pass


def _call_context(context: grpc.aio.ServicerContext) -> tuple[float | None, str | None]:
    """What a unary call carries besides its request: its deadline (a time.monotonic()
    instant) and its priority metadata."""
    return (
        convert.deadline_from(context.time_remaining()),
        convert.metadata_value(context.invocation_metadata(), convert.PRIORITY_METADATA),
    )
