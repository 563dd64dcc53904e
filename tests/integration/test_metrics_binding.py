"""/metrics binds where the gRPC port does (server.host), or at server.metrics_host: it has
neither TLS nor tokens, so it must never listen wider than configured. Servers without
models (Score and Align off) start in a moment."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from support import ServerThread

from align2.server.config import Config


def bare_config(**server: str) -> Config:
    config = Config()
    config.models = {}
    config.score.enabled = False
    config.align.enabled = False
    for key, value in server.items():
        setattr(config.server, key, value)
    return config


@pytest.fixture
def started() -> Iterator[list[ServerThread]]:
    servers: list[ServerThread] = []
    yield servers
    for server in servers:
        server.stop()


def outward_address() -> str | None:
    """An address of this machine other than loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # no packet is sent: picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_metrics_bind_the_grpc_host_by_default(started: list[ServerThread]) -> None:
    server = ServerThread(bare_config()).start()  # host 127.0.0.1
    started.append(server)
    address = server.app.metrics_address
    assert address is not None and address[0] == "127.0.0.1"
    url = f"http://127.0.0.1:{address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert b"align2_requests" in response.read()
    outward = outward_address()
    if outward is not None:  # from another interface of the machine: nothing listens
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outward, address[1]), timeout=5).close()


def test_metrics_host_overrides_the_grpc_host(started: list[ServerThread]) -> None:
    server = ServerThread(bare_config(metrics_host="0.0.0.0")).start()
    started.append(server)
    address = server.app.metrics_address
    assert address is not None and address[0] == "0.0.0.0"
    assert server.app.port is not None  # gRPC stays on 127.0.0.1 (ServerThread's host)


def test_a_bracketed_ipv6_host_binds_as_grpc_does(started: list[ServerThread]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = ServerThread(bare_config(metrics_host="[::1]")).start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 here: {exc}")
    started.append(server)
    assert server.app.metrics_address is not None
    assert server.app.metrics_address[0] == "::1"


def test_the_serve_flag_sets_the_metrics_host() -> None:
    """``--metrics-host`` (a pod's own address from its args) overrides the config file."""
    from align2.server import cli

    args = cli.parser().parse_args(["serve", "--metrics-host", "10.1.2.3", "--host", "0.0.0.0"])
    overrides = cli._overrides(args)
    assert overrides["server.metrics_host"] == "10.1.2.3"
    assert overrides["server.host"] == "0.0.0.0"
