"""Shutdown and faults: SIGTERM drains a real process; backend faults fail only their batch;
an unrecoverable device error marks the server NOT_SERVING."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerProcess, ServerThread, png, score_config

from align2.client import CurationClient, Sample, Turn

SECRET = "zebra-violin-quartz"  # sample text that must never reach the logs


def samples(n: int, turns: int) -> list[Sample]:
    return [
        Sample(
            id=f"s{i}",
            image=png(40 + i, 30),
            turns=[Turn(f"{SECRET} question {i}.{j}?", f"answer {j}") for j in range(turns)],
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def slower_llava(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Big enough that a 64-sample call takes seconds on CPU (so it is in flight at SIGTERM)."""
    from align2.server.models.builders import build_llava_reward

    return build_llava_reward(
        tmp_path_factory.mktemp("models") / "slower-llava",
        text_hidden=128,
        text_layers=4,
        text_heads=4,
        image_size=112,
        patch_size=14,
    )


def start_process(model: pathlib.Path, folder: pathlib.Path) -> ServerProcess:
    config = folder / "align2.toml"
    config.write_text(
        f"[server]\ngrace_seconds = 60\n[batching]\nmax_batch_size = 8\n"
        f'[models.question]\npath = "{model}"\n[models.answer]\npath = "{model}"\n'
    )
    args = ["--config", str(config), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
    return ServerProcess(args, folder / "server.log").start()


def queue_depth(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^align2_queue_depth\{[^}]*\} (\S+)$", text, re.M))


def test_sigterm_drains_in_flight_work_refuses_new_calls_and_exits_zero(
    slower_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    server = start_process(slower_llava, tmp_path)
    target, metrics_port, log = server.target, server.metrics_port, server.log
    assert server.proc is not None and metrics_port is not None
    outcome: dict[str, Any] = {}

    def long_call() -> None:
        with CurationClient(target, timeout=120, retry=False) as client:
            try:
                outcome["results"] = client.score(samples(16, 3))
            except grpc.RpcError as exc:
                outcome["error"] = exc

    worker = threading.Thread(target=long_call)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while queue_depth(metrics_port) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_depth(metrics_port) > 0, "the long call never got in flight"
        server.proc.send_signal(signal.SIGTERM)
        assert not outcome, "the call finished before SIGTERM: nothing was drained"
        time.sleep(0.5)
        with CurationClient(target, timeout=10, retry=False) as late:
            with pytest.raises(grpc.RpcError) as info:
                late.score(samples(1, 1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        worker.join(timeout=120)
        # one SIGTERM only: a second one during the drain would force the exit
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.stop()
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert len(results) == 16 and all(r.error is None for r in results)

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    finished = [e for e in lines if e.get("message") == "rpc finished"]
    assert finished and all(e["request_id"] for e in finished)
    assert any(e["rpc"] == "Score" and e["code"] == "OK" for e in finished)
    assert SECRET not in log.read_text()


@pytest.fixture
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    server = ServerThread(config).start()
    yield server
    server.stop()


def _health(server: ServerThread, service: str = "") -> int:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def fail_forward(server: ServerThread, message: str, times: int = 1) -> None:
    """Fault injection: the backend's base model raises on its next ``times`` forwards."""
    base = server.app._runtimes["question"].backend._base
    original = base.forward
    left = {"n": times}

    def broken(*args: Any, **kwargs: Any) -> Any:
        if left["n"] > 0:
            left["n"] -= 1
            raise RuntimeError(message)
        return original(*args, **kwargs)

    base.forward = broken


def test_a_failing_batch_fails_only_its_items_and_the_server_keeps_serving(
    server: ServerThread,
) -> None:
    fail_forward(server, "kernel exploded")
    with CurationClient(server.target, timeout=30) as client:
        [broken] = client.score(samples(1, 1), heads=["question"])
        assert broken.error is not None
        assert broken.error.code == grpc.StatusCode.INTERNAL
        assert "kernel exploded" in broken.error.message
        assert all(r.error is None for r in client.score(samples(3, 2)))
    assert _health(server) == health_pb2.HealthCheckResponse.SERVING


def test_an_unrecoverable_device_error_marks_not_serving(server: ServerThread) -> None:
    fail_forward(server, "CUDA error: an illegal memory access was encountered")
    with CurationClient(server.target, timeout=30, retry=False) as client:
        [broken] = client.score(samples(1, 1), heads=["question"])
        assert broken.error is not None and broken.error.code == grpc.StatusCode.INTERNAL
        deadline = time.monotonic() + 10
        while _health(server) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.05)
        assert _health(server, "align2.v1.CurationService") == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as info:
            client.score(samples(1, 1))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unrecoverable" in info.value.details()
