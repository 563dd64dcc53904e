"""The backend seam: what the core needs from a model runtime.

One Protocol per capability. The core calls ``prepare`` (CPU work for one input, from a
worker thread) before an item joins a batch, so that a bad input fails alone and the
batcher knows each item's token cost; then ``score`` once per batch on the device.
Fakes for unit tests implement the same Protocol.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class ModelDescription:
    """What GetServerInfo and each response report about a loaded model."""

    name: str  # the name in the server config
    model_id: str
    revision: str
    backend: str  # transformers | vllm
    family: str  # llava | idefics3 | llama | ...
    dtype: str
    device: str
    max_length: int  # tokens per input, text and image together
    image_tokens: int  # tokens one image takes; 0 when it varies with the image
    image_mode: str = ""  # pad | square (vision models)
    settings: str = ""  # digest of the server settings that change its outputs (with_settings)


def with_settings(description: ModelDescription, **settings: object) -> ModelDescription:
    """``description`` with ``settings`` set to a 12-hex-digit sha256 over what changes the
    model's outputs beyond its files (revision) and the input template: its backend, dtype,
    image_mode and max_length, and the server settings given (ModelRef.settings). A score
    stored under the same revision, settings and template version is the score the server
    computes now (to the last bits of float arithmetic)."""
    parts = {
        "backend": description.backend,
        "dtype": description.dtype,
        "image_mode": description.image_mode,
        "max_length": description.max_length,
        **settings,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return replace(description, settings=hashlib.sha256(text.encode()).hexdigest()[:12])


@dataclass
class Prepared:
    """One model-ready input.

    ``tokens`` (text + image) is what the batcher budgets; ``truncated`` says the text was
    cut to fit (the score is then pooled at the last kept token); ``payload`` is the
    backend's own representation (tensors, or a prompt for an engine).
    """

    tokens: int
    truncated: bool
    payload: Any


class InputTooLong(Exception):
    """An input's text exceeds the limit and the truncation policy is ``reject``.

    ``limit`` says which limit and its value, e.g. ``limits.max_text_tokens 2048``.
    """

    def __init__(self, tokens: int, limit: str) -> None:
        super().__init__(f"{tokens} text tokens exceeds {limit}")
        self.tokens = tokens
        self.limit = limit


@runtime_checkable
class ScoringBackend(Protocol):
    """A reward model: a scalar score per (image, text) input.

    Contract: ``score`` returns exactly one float per input, in input order, and a score
    never depends on the other inputs of the batch.
    """

    description: ModelDescription

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        """Tokenise and preprocess one input (thread-safe, CPU only).

        ``text`` is the rendered reward template, starting with the ``<image>`` marker;
        ``image`` is decoded RGB. Raises InputTooLong when the text has more than
        ``max_text_tokens`` tokens (or does not fit ``max_length``) and not ``truncate``.
        """
        ...

    async def score(self, batch: Sequence[Prepared]) -> list[float]:
        """Score a batch on the device. Raises DeviceOutOfMemory or BackendError."""
        ...

    def close(self) -> None:
        """Free the device memory; the backend is unusable afterwards."""
        ...


# -- generation (the inner LLM) ---------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of one generation; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": "..."}."""


@dataclass(frozen=True)
class GenerationRequest:
    """Chat messages to render with the LLM's own chat template, then continue."""

    messages: Sequence[Message]
    decoding: Decoding
    priority: int = 1
    """Scheduling class for engines that schedule by priority (vLLM: lower runs first):
    0 interactive, 1 bulk."""
    abandoned: threading.Event | None = field(default=None, compare=False, repr=False)
    """Set (from any thread) once nobody waits for this generation: its caller was cancelled
    or its deadline passed. A batched backend stops the request's row at its next decoding
    step, and a batch whose rows are all abandoned at its next layer, mid-prefill too
    (transformers, batched by the core or continuously: there the joining rows' prefill);
    a continuous engine is aborted by cancelling its task instead."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    generated_tokens: int
    finished: bool  # False: stopped at max_new_tokens, the text may be cut


@dataclass(frozen=True)
class ChoiceRequest:
    """A constrained choice: which of ``choices`` (single-token labels such as "A", "B")
    the model puts next after the rendered messages."""

    messages: Sequence[Message]
    choices: Sequence[str]
    priority: int = 1


@runtime_checkable
class GenerationBackend(Protocol):
    """The inner LLM.

    ``continuous`` engines (vLLM) batch by themselves: the core calls them once per item,
    concurrently, with no batcher in front. Others get batches from the core's batcher.
    Contract: one result per request, same order; cancelling the awaiting task aborts the
    work in the engine.
    """

    description: ModelDescription
    continuous: bool
    control_tokens: tuple[str, ...]
    """The strings its tokenizer reads as special tokens wherever they stand (its chat
    format's markers): a prompt whose text holds one is refused by ``prompt_tokens``, and a
    rewrite that spells one is not used (guard ``control_token``)."""

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt (for admission and the batcher's budget). Raises
        InvalidArgument for an unknown role or a message text holding a control token."""
        ...

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]: ...

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        """Per request, the probability of each choice (renormalised over the choices)."""
        ...

    def close(self) -> None: ...
