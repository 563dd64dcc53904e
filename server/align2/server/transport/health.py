"""gRPC health (grpc.health.v1): grpcio-health-checking's asyncio servicer, with ``List``.

The library's servicer answers Check and Watch, but its List (in the health proto since
2024, so reflection advertises it) raises NotImplementedError, which reaches a caller as
UNIMPLEMENTED with a Python exception in its message. Here List answers a snapshot of every
service's status, as the proto asks.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)  # the library's own record, read once
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )
