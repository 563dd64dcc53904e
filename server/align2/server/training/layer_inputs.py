"""The hidden states entering one decoder layer, from the server's own forward, cached.

For LoRA on the top layers (align2.server.training.lora): everything below the first
adapted layer is frozen, so what enters it is computed once per input, by the scoring
backend's ``features`` (prepare, padding, image splice, the base model: exactly what a
served score runs), with a forward pre-hook on that layer taking a copy. The inputs get
the placeholder image (training.features: the data's COCO images are not available).

Cached on disk like the pooled features (training.features.FeatureCache): the key names
the base's revision, the layer, the rendered inputs and everything else they depend on.
Stored as one ``[total tokens, hidden]`` float32 matrix plus each input's length, and the
pooled features of the untrained model (the untrained head's baseline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.training.data import PreferenceSet
from align2.server.training.features import (
    FeatureBackend,
    FeatureCache,
    extract,
    feature_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInputs:
    """Per input (rows of a PreferenceSet's texts): the states entering the layer
    ``[L_i, hidden]`` and the untrained model's pooled features ``[N, hidden]``."""

    states: list[torch.Tensor]
    pooled: torch.Tensor
    seconds: float
    """Computing them; 0 when read from the cache."""
    cached: bool
    truncated: int


def layer_key(
    description: ModelDescription,
    revision: str,
    layer: int,
    data: PreferenceSet,
    max_text_tokens: int,
) -> dict[str, str]:
    return feature_key(description, revision, data, max_text_tokens) | {
        "kind": "layer-inputs",
        "layer": str(layer),
    }


async def cached_layer_inputs(
    backend: FeatureBackend,
    layers: Sequence[Any],
    layer: int,
    revision: str,
    data: PreferenceSet,
    cache: FeatureCache,
    *,
    batch_size: int,
    max_text_tokens: int,
) -> LayerInputs:
    """The inputs of ``layers[layer]`` for every text of ``data``: cached, or computed."""
    key = layer_key(backend.description, revision, layer, data, max_text_tokens)
    found = cache.load_tensors(key)
    if found is not None:
        tensors, truncated = found
        lengths = tensors["lengths"].tolist()
        states = list(torch.split(tensors["states"], lengths))
        log.info("layer inputs of %s: cached in %s", data.name, cache.path(key))
        return LayerInputs(states, tensors["pooled"], 0.0, True, truncated)
    started = time.monotonic()
    states, pooled, truncated = await capture(
        backend, layers[layer], data.texts, batch_size=batch_size, max_text_tokens=max_text_tokens
    )
    seconds = time.monotonic() - started
    tensors = {
        "states": torch.cat(states),
        "lengths": torch.tensor([len(s) for s in states], dtype=torch.long),
        "pooled": pooled,
    }
    cache.save_tensors(key, tensors, truncated)
    log.info("layer inputs of %s: %d inputs in %.0f s", data.name, len(states), seconds)
    return LayerInputs(states, pooled, seconds, False, truncated)


async def capture(
    backend: FeatureBackend,
    module: torch.nn.Module,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_text_tokens: int,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(states entering ``module`` per text, pooled features ``[N, hidden]``, truncated).

    The extraction of the pooled features (training.features.extract: batches in order of
    length, the placeholder image), with a pre-hook on ``module``; each row is cut to its
    own tokens (right padding: the backend's), which the causal mask makes independent of
    the padding."""
    seen: list[torch.Tensor] = []
    states: list[torch.Tensor] = [torch.empty(0)] * len(texts)

    def take(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.detach().float().cpu())

    def keep(rows: list[int], batch: list[Prepared]) -> None:
        hidden = seen.pop()
        if seen:
            raise RuntimeError("the hooked layer ran more than once in one forward")
        for row, (i, prepared) in enumerate(zip(rows, batch, strict=True)):
            states[i] = hidden[row, : prepared.tokens].clone()

    handle = module.register_forward_pre_hook(take, with_kwargs=True)
    try:
        pooled, truncated = await extract(
            backend,
            texts,
            batch_size=batch_size,
            max_text_tokens=max_text_tokens,
            after_batch=keep,
        )
    finally:
        handle.remove()
    return states, pooled, truncated
