"""One Align caller cannot break its batch-mates: decoding settings outside the range where
the sampler is defined are refused with INVALID_ARGUMENT, and a row that still fails its
generation batch fails alone (a real server with the tiny Llama, a test double at the
backend seam forcing the failure)."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, error_details

from align2.client import CurationClient, Sample, Turn
from align2.server.backends.base import ChoiceRequest, Generation, GenerationRequest, Message
from align2.server.config import Config, ModelConfig
from align2.server.errors import BackendError
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

HOLD_SEED = 4242  # the generation that holds the device while the others queue
BAD_SEED = 666  # a sampled generation that fails whatever batch it is in


@pytest.fixture(scope="module")
def server(tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = Config()
    config.models = {"llm": ModelConfig(path=str(tiny_llm), max_length=1024)}
    config.score.enabled = False
    config.align.decoding.max_new_tokens = 4
    server = ServerThread(config).start()
    yield server
    server.stop()


def sample(i: int) -> Sample:
    return Sample(id=f"s{i}", image=b"", turns=[Turn(f"What is object {i}?", "A box.")])


@pytest.mark.parametrize(
    ("temperature", "shown"),
    [(1e-45, "1e-45"), (0.001, "0.001"), (2.5, "2.5"), (3e38, "3e+38"), (float("inf"), "inf")],
)
def test_temperatures_where_sampling_is_undefined_are_refused_naming_the_limit(
    server: ServerThread, temperature: float, shown: str
) -> None:
    options = pb.AlignOptions(decoding=pb.DecodingOptions(temperature=temperature))
    request = pb.AlignRequest(samples=[pb.Sample(id="x")], options=options)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CurationServiceStub(channel).Align(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"options.decoding.temperature: {shown} is neither 0 (greedy) nor in [0.01, 2.0]"
    )
    bad = error_details(info.value)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["options.decoding.temperature"]


def test_the_bounds_themselves_are_accepted_as_sent_in_float32(server: ServerThread) -> None:
    # A float32 0.01 is 0.0099999998: read as the 0.01 the caller wrote, not refused.
    with CurationClient(server.target, timeout=60) as client:
        for temperature in (0.01, 2.0):
            [result] = client.align(
                [sample(0)], parts="questions", review=False, temperature=temperature, seed=3
            )
            assert result.error is None, result.error


class OneRowBreaksItsBatch:
    """The server's real inner LLM behind a double at the backend seam: a batch holding a
    generation with seed BAD_SEED fails as a whole, as the transformers backend did for one
    row's temperature=1e-45 (now refused, so no accepted setting is known to do it). A batch
    holding HOLD_SEED waits for ``release`` (set on the server's loop) so that the callers
    after it queue up and run as one batch."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.description = real.description
        self.continuous = real.continuous
        self.control_tokens = real.control_tokens
        self.release = asyncio.Event()
        self.batches: list[list[int]] = []

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return int(self.real.prompt_tokens(messages))

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        seeds = [r.decoding.seed for r in batch]
        self.batches.append(seeds)
        if HOLD_SEED in seeds:
            await self.release.wait()
        if BAD_SEED in seeds:
            raise BackendError(
                "model 'llm' failed on this batch: probability tensor contains either "
                "`inf`, `nan` or element < 0"
            )
        return list(await self.real.generate(batch))

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        return list(await self.real.choose(batch))

    def close(self) -> None:
        self.real.close()


def test_a_row_that_fails_its_batch_fails_its_caller_alone(server: ServerThread) -> None:
    runtime = server.app._llms["llm"]
    double = OneRowBreaksItsBatch(runtime.backend)
    runtime.backend = double
    outcomes: dict[str, Any] = {}

    def call(name: str, **decoding: Any) -> threading.Thread:
        def run() -> None:
            with CurationClient(server.target, timeout=60, retry=False) as client:
                [outcomes[name]] = client.align(
                    [sample(0)], parts="questions", review=False, **decoding
                )

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        threads = [call("hold", seed=HOLD_SEED)]
        _wait_for(lambda: any(HOLD_SEED in b for b in double.batches))
        threads += [call("greedy-1"), call("bad", temperature=0.7, seed=BAD_SEED)]
        threads += [call("greedy-2")]
        _wait_for(lambda: server.call(_queued(runtime)) == 3)
        server.call(_set(double.release))
        for thread in threads:
            thread.join(timeout=60)
    finally:
        runtime.backend = double.real
    shared = [b for b in double.batches if BAD_SEED in b]
    assert len(shared[0]) == 3, double.batches  # the three callers did share a batch
    for name in ("hold", "greedy-1", "greedy-2"):
        assert outcomes[name].error is None, (name, outcomes[name].error)
    error = outcomes["bad"].error
    assert error is not None and error.code == grpc.StatusCode.INTERNAL
    assert "probability tensor contains" in error.message
    with grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


async def _queued(runtime: Any) -> int:
    return len(runtime._batcher._queue)


async def _set(event: asyncio.Event) -> None:
    event.set()
