"""Test helpers: test images, a tiny full server config, and the real-server runners of
align2.server.testing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import pathlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from align2.server.config import Config, ModelConfig
from align2.server.testing import ServerProcess, ServerThread

__all__ = [
    "ServerProcess",
    "ServerThread",
    "error_details",
    "jpeg",
    "metric",
    "png",
    "score_config",
    "unpack_details",
    "vllm_requests_finished",
]

_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
)


def unpack_details(status: status_pb2.Status) -> dict[str, Message]:
    """The details of a google.rpc.Status by type name ("BadRequest", ...); fails on a type
    the server is not meant to send."""
    found: dict[str, Message] = {}
    for packed in status.details:
        [kind] = [k for k in _DETAIL_TYPES if packed.Is(k.DESCRIPTOR)]
        detail = kind()
        packed.Unpack(detail)
        found[kind.DESCRIPTOR.name] = detail
    return found


def error_details(error: grpc.RpcError) -> dict[str, Message]:
    """The details of a failed call, read from its ``grpc-status-details-bin`` trailer as a
    client would (grpcio-status checks that the Status's code and message are the call's)."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    return unpack_details(status)


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def vllm_counter(name: str, model_name: str) -> float:
    """A vLLM engine's counter ``name`` (its ``_total`` samples) for ``model_name``, from the
    default Prometheus registry."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == name
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("model_name") == model_name
    )


def vllm_requests_finished(model_name: str) -> float:
    """Requests a vLLM engine finished by itself (stop, length, ...; aborts not counted), as
    its ``vllm:request_success`` series in the default Prometheus registry report them."""
    return vllm_counter("vllm:request_success", model_name)


def metric(name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of the default Prometheus registry (0 when absent: a
    labelled series appears at its first use)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def score_config(reward: pathlib.Path) -> Config:
    """Score and Curate on a tiny model, ``reward`` for both heads; Align off (no LLM)."""
    config = Config()
    config.models = {n: ModelConfig(path=str(reward)) for n in ("question", "answer")}
    return config


def full_config(reward: pathlib.Path, llm: pathlib.Path, max_new_tokens: int) -> Config:
    """Score, Align and Curate on tiny models: ``reward`` for both heads, ``llm`` inner."""
    config = score_config(reward)
    config.models["llm"] = ModelConfig(path=str(llm), max_length=1024)
    config.align.decoding.max_new_tokens = max_new_tokens
    return config


@contextlib.asynccontextmanager
async def bound_not_warm(config: Config) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to an App on 127.0.0.1:0 that has bound its port but not loaded its
    models (the phase a health check calls NOT_SERVING), stopped on exit."""
    from align2.server.app import App

    config.server.host, config.server.port, config.server.metrics_port = "127.0.0.1", 0, -1
    app = App(config)
    await app._bind()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield channel
    finally:
        await app.stop(grace=0)


async def spin(turns: int = 50) -> None:
    """Let the event loop run ``turns`` times: enough for tasks that never sleep (a
    batcher's loop, a curator's workers) to reach the point where they wait."""
    for _ in range(turns):
        await asyncio.sleep(0)
