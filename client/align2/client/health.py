"""gRPC health checks (grpc.health.v1) through the client's own channel."""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "align2.v1.CurationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
# While a curate call waits to resume: the longest one health check waits for a connection,
# and how often a server that says NOT_SERVING (warming up) is asked again.
HEALTH_CHECK_SECONDS = 5.0
NOT_SERVING_POLL_SECONDS = 0.25


def health_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


WATCH_AGAIN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
"""A health Watch ended by these (a server stopping or restarting) is opened again."""
WATCH_AGAIN_SECONDS = 0.25


class ServingWait:
    """``wait_until_serving``'s rules, for both clients: watch the Curate service's health
    (waiting for a connection) until it says SERVING or ``timeout`` seconds pass."""

    def __init__(self, timeout: float, metadata: Any) -> None:
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._metadata = metadata

    def watch(self, stub: Any) -> Any | None:
        """The next Watch call on ``stub``; None once the time is up."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        request = health_request(SERVICE)
        return stub.Watch(request, timeout=left, wait_for_ready=True, metadata=self._metadata)

    def follow(self, watch: Any) -> float | None:
        """Read a (sync) watch to its SERVING: None; else the pause before the next."""
        try:
            if any(health_status(reply) == "SERVING" for reply in watch):
                return None
            return self.pause()  # the server ended the watch (stopping): again
        except grpc.RpcError as error:
            return self.failed(error)
        finally:
            watch.cancel()

    def failed(self, error: grpc.RpcError) -> float:
        """A watch failed: the pause before the next (a stopping or restarting server);
        raises TimeoutError past the deadline, ``error`` for anything else."""
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.expired()
        if error.code() not in WATCH_AGAIN:
            raise error
        return self.pause()

    def pause(self) -> float:
        """Before the next watch: a moment, never past the deadline."""
        return min(WATCH_AGAIN_SECONDS, max(0.0, self._deadline - time.monotonic()))

    def expired(self) -> TimeoutError:
        return TimeoutError(f"the server did not report SERVING within {self.timeout:g} s")


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    """The status name: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
