"""gRPC health checks (grpc.health.v1) through the client's own channel."""

from __future__ import annotations

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


def not_serving_within(timeout: float) -> TimeoutError:
    return TimeoutError(f"the server did not report SERVING within {timeout:g} s")


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    """The status name: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
