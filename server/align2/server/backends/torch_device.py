"""Torch device and dtype choices, and what a device error means for the server."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from align2.server.errors import Align2Error, BackendError, DeviceOutOfMemory, Unavailable

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# CUDA errors after which the context is unusable: the process must be restarted.
_FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ECC",
    "CUDA error: unknown error",
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_device(device: torch.device) -> None:
    """Process-wide torch settings for serving on ``device``; backends call it at start.

    On CUDA, cuDNN's scaled-dot-product attention is turned off (flash, memory-efficient and
    math stay): cuDNN builds an execution plan per attention shape and per thread, and a
    server meets new shapes all the time (each batch size, each KV length while decoding,
    rows leaving the batch). Measured on an H200 (the prototype of bench/gpu_attention.py:
    7B bf16 Llama, 64 rewrites x 256 new tokens through ``generate_batch``): 16-21 s on a
    thread that had not seen those shapes with cuDNN on, 5.8 s once warm, 6.4-6.5 s on a
    fresh thread with it off. The one-shape warm case is ~10% faster with cuDNN; a served
    mix of shapes is not.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def classify_device_error(exc: Exception, model: str) -> Align2Error:
    """Map an exception from a forward pass to the core's error family."""
    if isinstance(exc, Align2Error):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return DeviceOutOfMemory(f"model {model!r} ran out of device memory on this batch")
    text = str(exc)
    fatal = any(marker in text for marker in _FATAL_MARKERS)
    return BackendError(f"model {model!r} failed on this batch: {text}", fatal=fatal)


class Interrupt:
    """Stops a running forward pass from another thread, between two layers.

    A forward pass cannot be cancelled, and at shutdown the process waits for its device
    thread: a batch that started just before the deadline would hold the exit for its whole
    length (seconds on CPU, for a large batch). Once ``set``, the next layer to start raises
    Unavailable instead (forward pre-hooks on the model and on each layer of its layer
    lists: the transformer blocks of every tower), so the batch ends within one layer.
    The hooks cost one Python call per layer.

    The same hooks end a batch that nobody waits for any more: inside
    ``abandoning(gone)``, the next layer raises :class:`BatchAbandoned` once ``gone()`` is
    true (a prefill of a large batch is seconds on a CPU; its callers' deadline passed)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self._name = name
        self._set = threading.Event()
        self._gone: Callable[[], bool] | None = None
        layers = [
            layer
            for module in model.modules()
            if isinstance(module, torch.nn.ModuleList)
            for layer in module
        ]
        self._hooks = [module.register_forward_pre_hook(self._check) for module in [model, *layers]]

    def set(self) -> None:
        self._set.set()

    def release(self) -> None:
        """Take the hooks off the model, once nothing runs on it any more: a model that
        outlives its backend (a benchmark's, reused by the next backend) runs again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @contextlib.contextmanager
    def abandoning(self, gone: Callable[[], bool]) -> Iterator[None]:
        """Within: the running batch stops at its next layer once ``gone()`` is true
        (BatchAbandoned). Called on the device thread that runs the batch."""
        self._gone = gone
        try:
            yield
        finally:
            self._gone = None

    def _check(self, _module: torch.nn.Module, _args: Any) -> None:
        if self._set.is_set():
            raise Unavailable(
                f"model {self._name!r} stopped mid-batch: the server is shutting down"
            )
        gone = self._gone
        if gone is not None and gone():
            raise BatchAbandoned(f"model {self._name!r}: every caller of the batch left")


class BatchAbandoned(Exception):
    """Raised from a layer when nobody waits for the batch's results (Interrupt)."""
