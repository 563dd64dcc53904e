"""Features for head training: the frozen backbone's pooled hidden states, cached on disk.

A feature row is what the server's forward computes for one rendered input before the
head: ``backend.features`` (align2.server.backends.transformers_scoring) on inputs made by
``backend.prepare``, exactly as the Scorer does. So ``features @ score.weight.T`` is the
server's score of that input with the placeholder image.

The placeholder: the preference data's COCO images are not available here, so every input
gets one fixed image, mid-grey (128, 128, 128) at 512 x 512 (one Idefics3 tile, nothing to
resize). The embedded models' vision towers are random anyway: they judge the text only.

The cache key covers everything a feature depends on: the backbone (weights without the
head), the template version, the data file's hash and the rendered inputs', the image,
dtype, device, image mode, the token limit and the library versions. A rerun with the same
key reads the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.core.templates import TEMPLATE_VERSION
from align2.server.training.data import PreferenceSet

log = logging.getLogger(__name__)

PLACEHOLDER_SIZE = 512
PLACEHOLDER_RGB = (128, 128, 128)
PLACEHOLDER = f"rgb{PLACEHOLDER_RGB}, {PLACEHOLDER_SIZE}x{PLACEHOLDER_SIZE}"
"""The placeholder image as recorded in cache keys and head files."""
_TENSOR = "features"


def placeholder_image() -> Image.Image:
    """The fixed image every training input gets (the data's images are missing)."""
    return Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), PLACEHOLDER_RGB)


def placeholder_png() -> bytes:
    """The placeholder as PNG bytes (lossless: the server decodes the same pixels)."""
    buffer = io.BytesIO()
    placeholder_image().save(buffer, format="PNG")
    return buffer.getvalue()


class FeatureBackend(Protocol):
    """What extraction needs: the scoring backend's ``prepare`` and its pre-head forward."""

    description: ModelDescription

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared: ...

    async def features(self, batch: Sequence[Prepared]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Extraction:
    """Features of a set's unique texts, ``[N, hidden]`` float32, and what they cost."""

    features: torch.Tensor
    seconds: float
    """Extraction wall time; 0 when read from the cache."""
    cached: bool
    truncated: int
    """Inputs cut to ``max_text_tokens`` (the server cuts them the same way when its
    truncation policy is ``truncate``, and refuses them under ``reject``)."""


def feature_key(
    description: ModelDescription, backbone: str, data: PreferenceSet, max_text_tokens: int
) -> dict[str, str]:
    """Everything a feature row depends on (see the module docstring), as strings.

    ``texts_sha256`` pins the rows to the rendered inputs in order, so a change in how
    inputs are rendered or deduplicated can never pair stale rows with new texts.
    """
    texts = hashlib.sha256("\0".join(data.texts).encode()).hexdigest()
    return {
        "backbone": backbone,
        "template_version": TEMPLATE_VERSION,
        "data_sha256": data.sha256,
        "texts_sha256": texts,
        "image": PLACEHOLDER,
        "dtype": description.dtype,
        "device": description.device,
        "image_mode": description.image_mode,
        "max_length": str(description.max_length),
        "max_text_tokens": str(max_text_tokens),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


class FeatureCache:
    """Feature matrices in ``folder``, one safetensors file per key (the key in its metadata).

    Writes go to a temporary file renamed into place: a crash never leaves a partial file.
    """

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder

    def path(self, key: dict[str, str]) -> pathlib.Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:24]}.safetensors"

    def load(self, key: dict[str, str]) -> tuple[torch.Tensor, int] | None:
        """(features, truncated count) stored under ``key``, or None."""
        found = self.load_tensors(key)
        return None if found is None else (found[0][_TENSOR], found[1])

    def save(self, key: dict[str, str], features: torch.Tensor, truncated: int) -> None:
        self.save_tensors(key, {_TENSOR: features}, truncated)

    def load_tensors(self, key: dict[str, str]) -> tuple[dict[str, torch.Tensor], int] | None:
        """(tensors by name, truncated count) stored under ``key``, or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            if {k: metadata.get(k) for k in key} != key:
                return None  # a hash collision or a stale file: recompute
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            return tensors, int(metadata["truncated"])

    def save_tensors(
        self, key: dict[str, str], tensors: dict[str, torch.Tensor], truncated: int
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        metadata = {**key, "truncated": str(truncated)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, scratch, metadata=metadata)
        os.replace(scratch, path)


async def cached_features(
    backend: FeatureBackend,
    backbone: str,
    data: PreferenceSet,
    cache: FeatureCache,
    *,
    batch_size: int,
    max_text_tokens: int,
) -> Extraction:
    """The features of ``data.texts`` from the cache, else extracted and then cached."""
    key = feature_key(backend.description, backbone, data, max_text_tokens)
    found = cache.load(key)
    if found is not None:
        log.info("features of %s: cached in %s", data.name, cache.path(key))
        return Extraction(found[0], 0.0, True, found[1])
    started = time.monotonic()
    features, truncated = await extract(
        backend, data.texts, batch_size=batch_size, max_text_tokens=max_text_tokens
    )
    seconds = time.monotonic() - started
    cache.save(key, features, truncated)
    log.info("features of %s: %d inputs in %.0f s", data.name, len(data.texts), seconds)
    return Extraction(features, seconds, False, truncated)


async def extract(
    backend: FeatureBackend,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_text_tokens: int,
    after_batch: Callable[[list[int], list[Prepared]], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Features of ``texts`` (rows in ``texts`` order) and how many were truncated.
    ``after_batch(rows, prepared)``: called after each batch's forward (what a hook on the
    model saw during it belongs to those rows of ``texts``).

    Inputs are batched in order of length (less padding); the backend's contract makes a
    row independent of its batch-mates. Inputs are prepared a batch at a time because each
    carries its own preprocessed image tensor (3 MB at 512 px).
    """
    image = placeholder_image()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    truncated = 0
    started = time.monotonic()
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = [
            backend.prepare(texts[i], image, max_text_tokens=max_text_tokens, truncate=True)
            for i in chosen
        ]
        truncated += sum(p.truncated for p in batch)
        pooled = await backend.features(batch)
        for i, row in zip(chosen, pooled, strict=True):
            rows[i] = row
        if after_batch is not None:
            after_batch(chosen, batch)
        _progress(start, start + len(chosen), len(order), started)
    if not texts:
        return torch.empty(0, 0), 0
    return torch.stack(rows), truncated


def _progress(before: int, after: int, total: int, started: float) -> None:
    """Log about every tenth of the way (extraction can take minutes)."""
    step = max(1, total // 10)
    if after == total or before // step != after // step:
        log.info("features: %d/%d inputs, %.0f s", after, total, time.monotonic() - started)
