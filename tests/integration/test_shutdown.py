"""Shutdown keeps its grace period as a hard bound: calls still running at the deadline are
answered UNAVAILABLE, a batch still on the device stops within one layer, and health keeps
answering NOT_SERVING (not "connection refused") while the server drains.

The model is a tiny LLaVA whose every layer takes a second (a sleeping forward pre-hook
installed after warm-up), so one batch outlasts the grace period by seconds."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, png, score_config

from align2.client import CurationClient, Sample, Turn
from align2.server.core.lifecycle import Phase

LAYER_SECONDS = 1.0
GRACE = 2.0
MARGIN = 3.0  # ending the calls, one layer, closing the port and the batchers


@pytest.fixture(scope="module")
def slow_llava(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from align2.server.models.builders import build_llava_reward

    return build_llava_reward(
        tmp_path_factory.mktemp("models") / "deep-llava", text_layers=6, image_size=56
    )


@pytest.fixture
def server(slow_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(slow_llava)
    config.align.enabled = False
    server = ServerThread(config).start()
    yield server
    if server.app.lifecycle.phase is not Phase.STOPPED and server._thread.is_alive():
        server.stop(grace=0)


def slow_down(server: ServerThread) -> threading.Event:
    """Every layer of the reward model now sleeps LAYER_SECONDS; the event is set once a
    forward pass is on the device."""
    on_device = threading.Event()

    def sleep(_module: Any, _args: Any) -> None:
        on_device.set()
        time.sleep(LAYER_SECONDS)

    base = server.app._runtimes["question"].backend._base
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                layer.register_forward_pre_hook(sleep)
    return on_device


def health(server: ServerThread) -> int:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="align2.v1.CurationService")
        return stub.Check(request, timeout=5).status


def start_calls(server: ServerThread, count: int) -> tuple[list[threading.Thread], dict]:
    """``count`` concurrent Score calls; their outcomes (results or RpcError) by index."""
    outcomes: dict[int, Any] = {}

    def call(i: int) -> None:
        sample = Sample(id=f"s{i}", image=png(30 + i, 30), turns=[Turn("Q?", "A.")])
        with CurationClient(server.target, timeout=120, retry=False) as client:
            try:
                outcomes[i] = client.score([sample])
            except grpc.RpcError as error:
                outcomes[i] = error

    callers = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for caller in callers:
        caller.start()
    return callers, outcomes


def start_stop(server: ServerThread) -> tuple[threading.Thread, dict[str, float]]:
    """``server.stop(GRACE)`` in a thread, timed; returns once the server is draining."""
    stopped: dict[str, float] = {}

    def stop() -> None:
        started = time.monotonic()
        server.stop(grace=GRACE)
        stopped["seconds"] = time.monotonic() - started

    stopper = threading.Thread(target=stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while server.app.lifecycle.phase is not Phase.DRAINING:
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.01)
    return stopper, stopped


def test_grace_is_a_hard_bound_and_every_call_is_answered(server: ServerThread) -> None:
    on_device = slow_down(server)
    callers, outcomes = start_calls(server, 6)
    assert on_device.wait(60), "no batch reached the device"
    # All six admitted before the drain starts (on a loaded machine a caller can still be
    # connecting; it would then be refused as "shutting down", not cut at the deadline).
    # Both heads of one call are two items, on one batcher when both are one model.
    runtimes = server.app._runtimes
    batcher = runtimes["question"].batcher
    items = 6 * (2 if runtimes["question"] is runtimes["answer"] else 1)
    deadline = time.monotonic() + 60
    while batcher.load < items:
        assert time.monotonic() < deadline, f"only {batcher.load} of {items} items admitted"
        time.sleep(0.01)
    stopper, stopped = start_stop(server)
    stopper.join(timeout=60)
    for caller in callers:
        caller.join(timeout=30)

    assert stopped["seconds"] < GRACE + MARGIN, stopped
    assert sorted(outcomes) == list(range(6))  # every call got an answer
    for outcome in outcomes.values():
        assert isinstance(outcome, grpc.RpcError), outcome
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not finish within the grace period" in outcome.details()
    devices = [t.name for t in threading.enumerate() if t.name.startswith("device-")]
    assert devices == []  # no forward pass left running to hold the process's exit


def test_health_answers_not_serving_while_draining(server: ServerThread) -> None:
    on_device = slow_down(server)
    callers, _ = start_calls(server, 1)
    assert on_device.wait(60), "no batch reached the device"
    stopper, _ = start_stop(server)
    # Probes reach the port during the grace period: NOT_SERVING, not a refused connection.
    assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    late = Sample(id="late", image=png(), turns=[Turn("Q?", "A.")])
    client = CurationClient(server.target, timeout=10, retry=False)
    with client, pytest.raises(grpc.RpcError) as refused:
        client.score([late])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    stopper.join(timeout=60)
    for caller in callers:
        caller.join(timeout=30)
