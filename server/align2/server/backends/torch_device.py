"""Torch device and dtype choices, and what a device error means for the server."""

from __future__ import annotations

import torch

from align2.server.errors import Align2Error, BackendError, DeviceOutOfMemory

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
