"""The ``fake`` fixture: a real gRPC server on 127.0.0.1:0 serving :class:`FakeCuration`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from client_fakes import FakeCuration

from align2.v1 import curation_pb2_grpc as pb_grpc


@pytest.fixture
def fake() -> Iterator[FakeCuration]:
    servicer = FakeCuration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_CurationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    servicer.release()  # unblock handlers a test left waiting
    server.stop(grace=None).wait()
