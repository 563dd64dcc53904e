"""Test helpers: test images, and the real-server runners of align2.server.testing."""

from __future__ import annotations

import io

from PIL import Image

from align2.server.testing import ServerProcess, ServerThread

__all__ = ["ServerProcess", "ServerThread", "jpeg", "png", "vllm_requests_finished"]


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def vllm_requests_finished(model_name: str) -> float:
    """Requests a vLLM engine finished by itself (stop, length, ...; aborts not counted), as
    its ``vllm:request_success`` series in the default Prometheus registry report them."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "vllm:request_success"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("model_name") == model_name
    )
