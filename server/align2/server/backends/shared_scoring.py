"""Several reward heads over ONE base in memory (``models.NAME.share_base``).

The paper's two reward models are LoRA adapters over the same LLaVA-1.5-7B, each with its
own projector and score head. Merged, they are two full copies of the base (2 x 13.9 GB in
bf16); shared, one base plus both adapters (models/shared_llava.py builds it).

How batches of two heads use one model object safely: the shared model owns ONE device
thread (:class:`SharedBase`). Each head is a ScoringBackend of its own
(:class:`SharedHeadScoring`, with its own batcher in the core, as any model), whose batches
all run on that thread; a batch activates its head's LoRA adapter (PEFT ``set_adapter``),
projector and score head and runs its forward as one task there, so the switch and the
forward are atomic and batches of the two heads run one after the other, never
interleaved. Nothing else touches the model.

The vision tower is frozen and the same for every head, so its output for an image is
computed once: features are kept by image content (a digest of the pixel values, taken
while preparing the input) for the last FEATURE_CACHE_IMAGES images, and one image in a
batch runs the tower once however many of its inputs carry it. A sample scored by both
heads (its question and each answer turn) thus runs the tower once, not once per input;
only the projector, which differs per head, runs per head.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, cast

import torch
from peft.functional import set_adapter
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.backends.torch_device import Interrupt, resolve_device, torch_dtype
from align2.server.backends.transformers_scoring import (
    TransformersScoring,
    _Inputs,
    image_digest,
)
from align2.server.config import ModelConfig
from align2.server.models.shared_llava import HeadInputs, SharedLlava, build_shared

log = logging.getLogger(__name__)

FEATURE_CACHE_IMAGES = 128
"""Images whose vision-tower features a shared base keeps (least recently used go first):
enough for every image of a full Score call (limits.max_samples_per_call 64) to wait from
one head's batch to the other's. LLaVA-1.5-7B in bf16: 576 x 1024 x 2 B = 1.2 MB an
image, 151 MB in all. A miss only recomputes."""


class SharedBase:
    """The device side of one shared LLaVA base: its thread, active head and image cache.

    Contract: :meth:`hidden` runs only on :attr:`executor` (one thread), so activating a
    head and the forward that uses it are one step. Each head calls :meth:`attach` once
    and :meth:`release` once; the last release frees the model.
    """

    def __init__(
        self, shared: SharedLlava, device: torch.device, cache_images: int = FEATURE_CACHE_IMAGES
    ) -> None:
        self.model = shared.model
        cast(torch.nn.Module, self.model).to(device)
        self.processor = shared.processor
        self.heads = shared.heads
        self.projectors = {n: h.projector.to(device) for n, h in shared.heads.items()}
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("a shared base needs one vision feature layer")
        self._layer: int = config.vision_feature_layer
        self._drop_cls = config.vision_feature_select_strategy == "default"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="device-shared-base")
        # Stops a running batch when the last head closes (one head closing stops nothing).
        self._interrupt = Interrupt(self.model, "+".join(shared.heads))
        self._thread: threading.Thread | None = None
        self._active: str | None = None
        self._cache: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._cache_images = cache_images
        self.tower_images = 0
        """Images run through the vision tower so far (tests and benchmarks read it)."""
        self._users = 0

    def attach(self) -> None:
        self._users += 1

    # -- the device thread ---------------------------------------------------------------
    def run(
        self,
        head: str,
        inputs: list[_Inputs] | None,
        ids: torch.Tensor,
        mask: torch.Tensor,
        **kwargs: Any,
    ) -> Any:
        """The output of ``head``'s model for a padded batch, with the images of ``inputs``
        or text only (``None``: remainders after a cached prefix; ``kwargs`` hold its cache)."""
        self._check_thread()
        if self._active != head:
            set_adapter(self.model.language_model, self.heads[head].adapter_name, True)
            self._active = head
        if inputs is None:
            return self.model(input_ids=ids, attention_mask=mask, **kwargs)
        features = self._tower_features(inputs)
        projected = self.projectors[head](features)
        # One [patches, hidden] tensor per image, as LlavaModel.get_image_features returns.
        image = BaseModelOutputWithPooling(pooler_output=cast(Any, list(projected)))
        encoded = {"image": image}
        return self.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoded, **kwargs)

    def _tower_features(self, inputs: list[_Inputs]) -> torch.Tensor:
        """The selected tower layer ``[B, patches, vision_hidden]``: from the cache, or one
        tower forward for the batch's images not in it (each image once)."""
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, torch.Tensor] = {}
        for x in inputs:
            key = x.image_key
            if not key:
                raise ValueError("a shared base needs each input's image_key")
            if key in found or key in todo:
                continue
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                found[key] = cached
            else:
                todo[key] = x.images["pixel_values"]
        if todo:
            pixels = torch.stack(list(todo.values())).to(self.device, self.dtype)
            out = self.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
            selected = out.hidden_states[self._layer]
            if self._drop_cls:
                selected = selected[:, 1:]
            self.tower_images += len(todo)
            for key, features in zip(todo, selected, strict=True):
                found[key] = features.clone()  # not a view: the batch tensor may go
                self._remember(key, found[key])
        return torch.stack([found[x.image_key] for x in inputs])

    def _remember(self, key: bytes, features: torch.Tensor) -> None:
        if self._cache_images <= 0:
            return
        self._cache[key] = features
        while len(self._cache) > self._cache_images:
            self._cache.popitem(last=False)

    def _check_thread(self) -> None:
        current = threading.current_thread()
        if self._thread is None:
            self._thread = current
        elif current is not self._thread:
            raise RuntimeError("a shared base runs on its own device thread only")

    # -- lifecycle -----------------------------------------------------------------------
    def release(self) -> None:
        """One head is done with the base; the last one frees it."""
        self._users -= 1
        if self._users > 0:
            return
        self._interrupt.set()
        self.executor.shutdown(wait=True)
        self._interrupt.release()
        self._cache.clear()
        del self.model, self.projectors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class SharedHeadScoring(TransformersScoring):
    """One reward head over a :class:`SharedBase`: a ScoringBackend like any other (its own
    description, prepare and batcher); its forwards run on the shared base's thread."""

    def __init__(
        self,
        description: ModelDescription,
        shared: SharedBase,
        head: str,
        image_mode: str,
        share_prefixes: bool = True,
        length_split_tokens: int = -1,
    ) -> None:
        weight = shared.heads[head].weight.to(shared.device, torch.float32, copy=True)
        super().__init__(
            description,
            shared.processor,
            shared.model,
            weight,
            image_mode,
            executor=shared.executor,
            share_prefixes=share_prefixes,
            length_split_tokens=length_split_tokens,
        )
        self._shared = shared
        self._head_name = head
        shared.attach()

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        prepared = super().prepare(text, image, max_text_tokens=max_text_tokens, truncate=truncate)
        payload: _Inputs = prepared.payload
        if not payload.image_key:  # the tower's features are cached by it
            payload.image_key = image_digest(payload.images)
        return prepared

    @property
    def shared_base(self) -> SharedBase:
        """The base this head runs on (the training tool hooks its layers)."""
        return self._shared

    def _run(
        self, inputs: list[_Inputs] | None, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any
    ) -> Any:
        return self._shared.run(self._head_name, inputs, ids, mask, **kwargs)

    def close(self) -> None:
        del self._base  # this head's reference: the last head's release frees the model
        self._shared.release()


def load_shared(
    base: pathlib.Path, heads: Mapping[str, tuple[ModelConfig, HeadInputs]]
) -> dict[str, SharedHeadScoring]:
    """Build one shared base for ``heads`` (config name -> its config and read adapter)
    and one backend per head. The heads' configs agree on dtype and device (config check)."""
    first = next(iter(heads.values()))[0]
    device = resolve_device(first.device)
    shared_model = build_shared({n: h for n, (_, h) in heads.items()}, torch_dtype(first.dtype))
    shared = SharedBase(shared_model, device)
    log.info("one shared base %s for %s", base, ", ".join(heads))
    backends: dict[str, SharedHeadScoring] = {}
    for name, (config, _) in heads.items():
        head = shared_model.heads[name]
        description = ModelDescription(
            name=name,
            model_id=head.model_id,
            revision=config.revision or head.revision,
            backend="transformers",
            family="llava",
            dtype=config.dtype,
            device=str(device),
            max_length=config.max_length,
            image_tokens=0,
            image_mode=config.image_mode,
        )
        backend = SharedHeadScoring(
            description,
            shared,
            name,
            config.image_mode,
            config.share_prefixes,
            config.length_split_tokens,
        )
        backend.description = replace(description, image_tokens=backend.image_tokens())
        backends[name] = backend
    return backends
