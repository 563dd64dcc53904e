"""Helpers of the load, fault and soak tests: hold or slow a real server's device, count
its forward passes, fire many calls at once, read health and memory."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, png

from align2.server.core.runtime import ScoringRuntime
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

SERVICE_NAME = "align2.v1.CurationService"


def env_int(name: str, default: int) -> int:
    """A test's size: ``default`` in `make test`, the environment's in the long forms."""
    return int(os.environ.get(name, default))


def runtimes(server: ServerThread) -> list[ScoringRuntime]:
    """The reward-model runtimes, each once (models of one folder share one)."""
    return list({id(rt): rt for rt in server.app._runtimes.values()}.values())


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class DeviceGate:
    """Every forward pass of the server's reward models first waits here: ``hold()`` stops
    the device at the next pass (``on_device`` is set once one waits), ``release()`` lets
    every pass through; ``delay`` slows each pass by that many seconds."""

    def __init__(self, server: ServerThread, delay: float = 0.0) -> None:
        self.delay = delay
        self.on_device = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self._handles = [
            rt.backend._base.register_forward_pre_hook(self._hook) for rt in runtimes(server)
        ]

    def _hook(self, _module: Any, _args: Any) -> None:
        self.on_device.set()
        assert self._open.wait(60), "the device gate was never released"
        if self.delay:
            time.sleep(self.delay)

    def hold(self) -> None:
        self.on_device.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self.release()
        for handle in self._handles:
            handle.remove()


@dataclass
class Batch:
    size: int
    started: float
    finished: float
    deadlines: list[float | None]  # each item's call deadline (time.monotonic())


@dataclass
class ForwardLog:
    """Every batch the reward models ran (``install``), with its items' call deadlines."""

    batches: list[Batch] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(b.size for b in self.batches)

    def install(self, server: ServerThread) -> Callable[[], None]:
        """Wrap each batcher's submit and run_batch; returns the undo."""
        undo = []
        for rt in runtimes(server):
            batcher = rt.batcher
            submit, run_batch = batcher.submit, batcher._run_batch
            deadlines: dict[int, float | None] = {}

            async def tracked_submit(
                item: Any, *, _submit: Any = submit, _deadlines: Any = deadlines, **kwargs: Any
            ) -> Any:
                _deadlines[id(item)] = kwargs.get("deadline")
                return await _submit(item, **kwargs)

            async def logged_run(
                items: Sequence[Any], *, _run: Any = run_batch, _deadlines: Any = deadlines
            ) -> Any:
                started = time.monotonic()
                try:
                    return await _run(items)
                finally:
                    finished = time.monotonic()
                    times = [_deadlines.get(id(item)) for item in items]
                    self.batches.append(Batch(len(items), started, finished, times))

            batcher.submit = tracked_submit  # type: ignore[method-assign]
            batcher._run_batch = logged_run
            undo.append((batcher, submit, run_batch))

        def restore() -> None:
            for batcher, submit, run_batch in undo:
                batcher.submit = submit  # type: ignore[method-assign]
                batcher._run_batch = run_batch

        return restore


def score_request(i: int, heads: Sequence[int] = (pb.HEAD_QUESTION,)) -> pb.ScoreRequest:
    """One sample, one turn: one forward pass per head."""
    sample = pb.Sample(
        id=f"s{i}", image=png(24 + i % 16, 24), turns=[pb.Turn(question="Q?", answer="A.")]
    )
    return pb.ScoreRequest(samples=[sample], heads=list(heads))


def outcome(future: grpc.Future) -> str:
    """A Score call's outcome: its status code's name, and for an OK answer whose samples
    failed, their error codes ("OK, items DEADLINE_EXCEEDED")."""
    error = future.exception()
    if error is not None:
        return str(error.code().name)
    failed = sorted(
        {pb.ErrorCode.Name(r.error.code)[len("ERROR_CODE_") :] for r in future.result().results}
        - {"UNSPECIFIED"}
    )
    return "OK" if not failed else f"OK, items {'+'.join(failed)}"


def outcomes(futures: Sequence[grpc.Future]) -> collections.Counter[str]:
    """The outcome of each call (waiting for each), counted."""
    return collections.Counter(outcome(future) for future in futures)


def stub(channel: grpc.Channel) -> pb_grpc.CurationServiceStub:
    return pb_grpc.CurationServiceStub(channel)


def health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20
