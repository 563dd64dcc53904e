"""Admission by request bytes (align2.server.core.budget) at the earliest point we can.

grpc reads a unary request and runs its deserializer before any interceptor's behavior
runs, so the deserializer is the first code of ours that sees the bytes. The wrapped
deserializer checks the request's wire size against the budget: one that does not fit is
not parsed (its bytes are dropped at once) and is handed on as a value, which the wrapped
behavior raises as Overloaded, mapped to RESOURCE_EXHAUSTED by StatusInterceptor like any
other error. One that fits is parsed, and the behavior claims its size for as long as the
call runs: the claim, not the early check, is the admission (another call may have claimed
in between).

Unary requests only (Score, Align; GetServerInfo's are empty): a Curate stream claims each
sample's bytes from the same budget as it reads it (core/curation.py), waiting for room
instead of being refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from align2.server.core.budget import ByteBudget
from align2.server.transport.interceptors import SERVICE_PREFIX


class _Refused:
    """What the wrapped deserializer returns for a request that does not fit."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class _Sized:
    """A parsed request and its wire size."""

    def __init__(self, request: Any, nbytes: int) -> None:
        self.request = request
        self.nbytes = nbytes


class ByteBudgetInterceptor(grpc.aio.ServerInterceptor):
    """Claims each unary align2 request's bytes from ``budget`` for the call's duration.

    Goes after the token check and before ParseInterceptor, whose deserializer it wraps."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or not handler.unary_unary:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._behavior(handler.unary_unary),
            request_deserializer=self._deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _deserializer(self, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        def sized(raw: bytes) -> Any:
            if not self.budget.fits(len(raw)):
                return _Refused(len(raw))
            return _Sized(raw if parse is None else parse(raw), len(raw))

        return sized

    def _behavior(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                raise self.budget.refusal(request.nbytes)
            with self.budget.claim(request.nbytes):
                return await behavior(request.request, context)

        return admitted
