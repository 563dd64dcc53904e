"""gRPC health (grpc.health.v1): grpcio-health-checking's asyncio servicer, with ``List``.

The library's servicer answers Check and Watch, but its List (in the health proto since
2024, so reflection advertises it) raises NotImplementedError, which reaches a caller as
UNIMPLEMENTED with a Python exception in its message. Here List answers a snapshot of every
service's status, as the proto asks. ``serve_health_only`` is the plaintext health port
(server.health_port).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


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


async def serve_health_only(servicer: HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server on ``address`` answering gRPC health alone, from ``servicer`` (the
    main port's, so both tell the same status), for probes that cannot speak the main
    port's TLS; returns it started, with its port. Requests are a service name: a small
    message limit and a few streams a connection are all it needs."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4096),
            ("grpc.max_concurrent_streams", 16),
            ("grpc.so_reuseport", 0),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
