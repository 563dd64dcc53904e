"""Several replicas behind one client: target lists, the load-balancing policy, and gRPC's
client-side health checking against real gRPC servers on 127.0.0.1 (the fake servicer)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from client_fakes import FAST_RETRY, FakeCuration, make_samples
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from align2.client import AsyncCurationClient, CurationClient
from align2.client import cli as client_cli
from align2.client.balancing import SERVICE, lb_policy, target_string
from align2.client.channel import ClientOptions, channel_options
from align2.client.resume import ResumePolicy
from align2.v1 import curation_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------------
# Targets and policies


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///align2.ns.svc.cluster.local:50051", "dns:///align2.ns.svc.cluster.local:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        (["10.0.0.1:1", "10.0.0.2:2"], "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["[::1]:1", "[fe80::2]:2"], "ipv6:[::1]:1,[fe80::2]:2"),
        (["127.0.0.1:7"], "127.0.0.1:7"),
    ],
)
def test_targets_become_grpc_targets(given: str | list[str], target: str) -> None:
    assert target_string(given) == target


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["align2-0:1", "align2-1:1"], r"'align2-0:1' is not IP:PORT.*dns:///NAME:PORT"),
        ("10.0.0.1:1,10.0.0.2", r"'10.0.0.2' is not IP:PORT"),
        (["10.0.0.1:1", "[::1]:1"], "mixes IPv4 and IPv6"),
        (["::1:1", "::2:1"], r"'::1:1' is not IP:PORT"),  # IPv6 needs its brackets
        ([], "no address"),
        (" , ", "no address"),
    ],
)
def test_bad_target_lists_are_refused_naming_the_address(
    given: str | list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        target_string(given)


def test_round_robin_is_the_default_for_several_replicas_only() -> None:
    assert lb_policy("ipv4:10.0.0.1:1,10.0.0.2:1", None) == "round_robin"
    assert lb_policy("dns:///align2.ns.svc.cluster.local:50051", None) == "round_robin"
    assert lb_policy("localhost:50051", None) is None  # gRPC's default, pick_first
    assert lb_policy("ipv4:10.0.0.1:1", None) is None
    assert lb_policy("localhost:50051", "round_robin") == "round_robin"
    assert lb_policy("dns:///x:1", "pick_first") == "pick_first"
    with pytest.raises(ValueError, match="load_balancing: 'random' is not one of"):
        ClientOptions("h:1", load_balancing="random")


def test_the_service_config_holds_the_policy_health_checking_and_retries() -> None:
    def config(**kwargs: Any) -> dict[str, Any]:
        return json.loads(dict(channel_options(**kwargs))["grpc.service_config"])

    balanced = config(load_balancing="round_robin")
    assert balanced["loadBalancingConfig"] == [{"round_robin": {}}]
    assert balanced["healthCheckConfig"] == {"serviceName": SERVICE}
    assert balanced["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "healthCheckConfig" not in config(load_balancing="round_robin", health_check=False)
    # pick_first ignores health checking (gRPC's A17): it is not written for it.
    assert "healthCheckConfig" not in config(load_balancing="pick_first")
    assert "loadBalancingConfig" not in config()
    assert "grpc.service_config" not in dict(channel_options(retry=False))


def test_the_cli_joins_repeated_targets() -> None:
    parser = client_cli.build_parser()
    one = parser.parse_args(["info", "--target", "127.0.0.1:1"])
    assert one.target == "127.0.0.1:1" and one.load_balancing is None
    two = parser.parse_args(
        [
            "info",
            "--target",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
            "--load-balancing=pick_first",
        ]
    )
    assert target_string(two.target) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert two.load_balancing == "pick_first"


# ---------------------------------------------------------------------------------------
# Replicas on 127.0.0.1


@dataclass
class Replica:
    servicer: FakeCuration
    health: health.HealthServicer
    address: str

    @property
    def calls(self) -> int:
        return self.servicer.attempts

    def set(self, status: Any) -> None:
        self.health.set(SERVICE, status)


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    """Two fake servers, each with a gRPC health service saying SERVING."""
    started: list[tuple[grpc.Server, Replica]] = []
    for _ in range(2):
        servicer, status = FakeCuration(), health.HealthServicer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CurationServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(status, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        status.set(SERVICE, SERVING)
        started.append((server, Replica(servicer, status, f"127.0.0.1:{port}")))
    yield [replica for _, replica in started]
    for server, _ in started:
        server.stop(grace=None).wait()


def calls(client: CurationClient, count: int) -> None:
    for _ in range(count):
        client.server_info(timeout=10)


def until(seconds: float) -> Iterator[None]:
    """Loop turns for at most ``seconds`` (a bounded wait for something gRPC does in the
    background, seen through its effect on calls)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield


def counts(replicas: list[Replica]) -> list[int]:
    return [r.calls for r in replicas]


def in_turn(replicas: list[Replica], call: Callable[[], object]) -> list[int]:
    """Calls per replica of 20 calls made once both replicas have served one (round_robin
    takes the connected replicas in turn; before both are connected, the first takes all)."""
    for _ in until(10):
        if min(counts(replicas)):
            break
        call()
    before = counts(replicas)
    for _ in range(20):
        call()
    return [now - then for now, then in zip(counts(replicas), before, strict=True)]


def test_a_list_of_replicas_spreads_the_calls_over_both(replicas: list[Replica]) -> None:
    with CurationClient([r.address for r in replicas], retry=FAST_RETRY) as client:
        assert client.target == f"ipv4:{replicas[0].address},{replicas[1].address}"
        assert client.load_balancing == "round_robin"
        assert in_turn(replicas, lambda: client.server_info(timeout=10)) == [10, 10]


def test_the_asyncio_client_spreads_them_too(replicas: list[Replica]) -> None:
    async def run() -> None:
        target = ",".join(r.address for r in replicas)  # one string, commas
        async with AsyncCurationClient(target, retry=FAST_RETRY) as client:
            for _ in until(10):
                if min(counts(replicas)):
                    break
                await client.server_info(timeout=10)
            before = counts(replicas)
            for _ in range(20):
                await client.server_info(timeout=10)
            assert [a - b for a, b in zip(counts(replicas), before, strict=True)] == [10, 10]

    asyncio.run(run())


def test_a_replica_that_is_not_serving_gets_no_calls(replicas: list[Replica]) -> None:
    serving, draining = replicas
    draining.set(NOT_SERVING)
    with CurationClient([r.address for r in replicas], retry=FAST_RETRY) as client:
        calls(client, 20)
        assert (serving.calls, draining.calls) == (20, 0)
        # Health checking hides it from health() too: that reports a serving replica.
        assert client.health(SERVICE, timeout=10) == "SERVING"
        draining.set(SERVING)  # back: it gets calls again (once its watch says so)
        for _ in until(10):  # once its health watch told the client
            if draining.calls:
                break
            calls(client, 1)
        assert draining.calls > 0


def test_a_replica_that_stops_serving_gets_no_more_calls(replicas: list[Replica]) -> None:
    serving, draining = replicas
    with CurationClient([r.address for r in replicas], retry=FAST_RETRY) as client:
        for _ in until(10):  # until both are connected and served a call
            if draining.calls and serving.calls:
                break
            calls(client, 1)
        assert draining.calls and serving.calls
        draining.set(NOT_SERVING)  # as the server does when it drains
        in_a_row = 0
        for _ in until(10):  # until its health watch reached the client
            before = draining.calls
            calls(client, 1)
            in_a_row = in_a_row + 1 if draining.calls == before else 0
            if in_a_row == 10:
                break
        before = draining.calls
        calls(client, 20)
        assert draining.calls == before


def test_one_address_keeps_grpc_default_policy(fake: FakeCuration) -> None:
    with CurationClient(fake.target) as client:
        assert client.load_balancing == "pick_first"
        assert client.server_info(timeout=10).version == "9.9.9"


def test_without_health_checking_a_not_serving_replica_still_gets_calls(
    replicas: list[Replica],
) -> None:
    replicas[1].set(NOT_SERVING)
    addresses = [r.address for r in replicas]
    with CurationClient(addresses, retry=FAST_RETRY, health_check=False) as client:
        assert in_turn(replicas, lambda: client.server_info(timeout=10)) == [10, 10]


def test_no_replica_serving_fails_calls_with_unavailable(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.set(NOT_SERVING)
    with (
        CurationClient([r.address for r in replicas], retry=False) as client,
        pytest.raises(grpc.RpcError) as raised,
    ):
        client.server_info(timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.calls for r in replicas] == [0, 0]


def test_the_health_command_sees_a_replica_that_is_not_serving(
    replicas: list[Replica], capsys: pytest.CaptureFixture[str]
) -> None:
    replicas[0].set(NOT_SERVING)
    command = ["health", "--target", replicas[0].address, "--service", SERVICE]
    assert client_cli.main([*command, "--load-balancing", "round_robin"]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_a_curate_stream_on_a_draining_replica_resumes_on_the_other(
    replicas: list[Replica],
) -> None:
    # Whichever replica gets the stream drains after five decisions: NOT_SERVING, then the
    # stream ends with UNAVAILABLE (the server's own order). One list for both: only the
    # first stream fails.
    first_stream_only, drained = [5], []
    for replica in replicas:
        replica.servicer.curate_abort_after = first_stream_only

        def drain(replica: Replica = replica) -> None:
            replica.set(NOT_SERVING)
            drained.append(replica)

        replica.servicer.curate_on_abort = drain
    given = make_samples(30)
    policy = ResumePolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.02)
    with CurationClient([r.address for r in replicas], retry=FAST_RETRY) as client:
        results = client.curate(given, resume=policy)
        got = list(results)
    assert sorted(int(r.id) for r in got) == list(range(30)) and results.streams == 2
    [gone] = drained
    [other] = [r for r in replicas if r is not gone]
    [first] = gone.servicer.curate_streams
    [second] = other.servicer.curate_streams
    assert second[:2] == first[5:7]  # read there, never answered: sent again here first


def test_a_dns_target_resolves_and_is_balanced(fake: FakeCuration) -> None:
    port = fake.target.rsplit(":", 1)[1]
    with CurationClient(f"dns:///localhost:{port}", retry=FAST_RETRY) as client:
        assert client.load_balancing == "round_robin"
        for _ in range(5):
            assert client.server_info(timeout=10).version == "9.9.9"
    assert fake.attempts == 5


# ---------------------------------------------------------------------------------------
# Waiting for a server to be ready


def test_wait_until_serving_returns_when_the_server_turns_serving(replicas: list[Replica]) -> None:
    replica = replicas[0]
    replica.set(NOT_SERVING)  # loading its models
    timer = threading.Timer(0.5, replica.set, args=(SERVING,))
    timer.start()
    with CurationClient(replica.address) as client:
        started = time.monotonic()
        client.wait_until_serving(30)
        waited = time.monotonic() - started
    timer.join()
    assert 0.4 < waited < 10


def test_wait_until_serving_times_out_naming_the_wait(replicas: list[Replica]) -> None:
    replicas[0].set(NOT_SERVING)

    async def wait() -> None:
        async with AsyncCurationClient(replicas[0].address) as client:
            await client.wait_until_serving(0.5)

    with pytest.raises(TimeoutError, match=r"did not report SERVING within 0\.5 s"):
        asyncio.run(wait())
    with CurationClient(replicas[0].address) as client, pytest.raises(TimeoutError):
        client.wait_until_serving(0.5)


class RestartingHealth(health_pb2_grpc.HealthServicer):
    """The first Watch ends CANCELLED (grpc cancels every call of a server that stops);
    the next one says SERVING."""

    def __init__(self) -> None:
        self.watches = 0

    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        assert request.service == SERVICE
        self.watches += 1
        if self.watches == 1:
            context.abort(grpc.StatusCode.CANCELLED, "Cancelling all calls")
        yield health_pb2.HealthCheckResponse(status=SERVING)


@pytest.fixture
def restarting() -> Iterator[tuple[str, RestartingHealth]]:
    servicer = RestartingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_a_watch_cut_by_a_stopping_server_is_opened_again(
    restarting: tuple[str, RestartingHealth],
) -> None:
    target, servicer = restarting
    with CurationClient(target) as client:
        client.wait_until_serving(10)
    assert servicer.watches == 2


def test_the_cli_waits_for_a_server_that_is_not_up_yet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listens yet: the wait covers connecting; after it, exit 1 naming the wait."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{probe.getsockname()[1]}"
    assert client_cli.main(["health", "--target", free, "--wait-ready", "1"]) == 1
    assert "did not report SERVING within 1 s" in capsys.readouterr().err
