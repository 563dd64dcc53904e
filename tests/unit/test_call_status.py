"""How the interceptor ends a call that returned (transport/interceptors.py ``_mapped``),
on a stand-in ServicerContext: only the deadline arithmetic is under test here; the
integration tests run the same code behind a real server."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from align2.server import metrics
from align2.server.transport.inflight import InFlightCalls
from align2.server.transport.interceptors import _mapped


class Context:
    """The parts of grpc.aio.ServicerContext that ``_mapped`` uses."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, _: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str, _: Any = ()) -> None:
        self.status = (code, details)
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return None if self.status is None else self.status[0]


def counted(code: str) -> float:
    return metrics.REQUESTS.labels(rpc="Probe", code=code)._value.get()  # type: ignore[attr-defined]


async def returned(remaining: float | None, request_stream: bool) -> Context:
    context = Context(remaining)
    try:
        async with _mapped("Probe", context, InFlightCalls(), request_stream):  # type: ignore[arg-type]
            pass  # the behavior returned its answer
    except grpc.aio.AbortError:
        pass
    return context


@pytest.mark.parametrize("remaining", [None, 5.0, 0.001])
async def test_a_unary_call_answered_before_its_deadline_is_ok(remaining: float | None) -> None:
    before = counted("OK")
    context = await returned(remaining, request_stream=False)
    assert context.status is None
    assert counted("OK") == before + 1


async def test_a_unary_call_whose_deadline_passed_while_it_worked_ends_deadline_exceeded() -> None:
    """Its items failed "deadline exceeded" as the answer was built; the client stopped
    waiting: the call is answered, and counted, DEADLINE_EXCEEDED, not OK."""
    before = counted("DEADLINE_EXCEEDED")
    context = await returned(-0.002, request_stream=False)
    assert context.status is not None
    assert context.status[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert counted("DEADLINE_EXCEEDED") == before + 1
