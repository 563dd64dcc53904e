"""The inner LLM on transformers: a causal LM (AutoModelForCausalLM), CPU or CUDA,
fp32/bf16/fp16. Two ways to batch (``models.NAME.continuous_rows``): by the core's Batcher
(0, :class:`TransformersGeneration`, ``continuous`` False: a batch decodes to its end before
the next starts), or continuously (:class:`ContinuousGeneration`: a request joins the
running batch at the next decoding step, :mod:`.continuous`).

Contract (shared with the vLLM backend): the prompt is the messages rendered by
:mod:`align2.server.backends.chat` (the tokenizer's chat template, or Vicuna v1.1 for a
tokenizer without one) and tokenised without special tokens; temperature 0 is greedy;
sampling is seeded per request; ``finished`` is False only when generation stopped at
``max_new_tokens`` or at the model's ``max_length``; ``choose`` gives each label's
next-token probability renormalised over the labels (the softmax of the label logits).
Decoding details and their batch-composition caveats: :mod:`.decoding`.

One thread owns the device: batches (or decoding steps) run one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from align2.server.backends.base import (
    ChoiceRequest,
    Generation,
    GenerationRequest,
    Message,
    ModelDescription,
)
from align2.server.backends.chat import Prompts, as_invalid_argument, choice_ids
from align2.server.backends.checkpoint import folder_revision
from align2.server.backends.continuous import Choice, DecodeLoop, Row
from align2.server.backends.decoding import Decoded, generate_batch, last_logits
from align2.server.backends.torch_device import (
    BatchAbandoned,
    Interrupt,
    classify_device_error,
    prepare_device,
    resolve_device,
    torch_dtype,
)
from align2.server.config import ModelConfig
from align2.server.models.sentencepiece_merges import load_tokenizer

log = logging.getLogger(__name__)


class TransformersGeneration:
    """GenerationBackend on transformers (see the module docstring)."""

    continuous = False

    def __init__(
        self, description: ModelDescription, tokenizer: PreTrainedTokenizerBase, model: Any
    ) -> None:
        self.description = description
        self._tokenizer = tokenizer
        self._prompts = Prompts(tokenizer, longest=description.max_length)
        self.control_tokens = self._prompts.control_tokens
        self._model = model
        self._device = torch.device(description.device)
        prepare_device(self._device)
        self._eos = _eos_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else min(self._eos)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"device-{description.name}")
        self._interrupt = Interrupt(model, description.name)

    @classmethod
    def load(cls, name: str, config: ModelConfig, path: pathlib.Path) -> TransformersGeneration:
        """Load the causal LM in folder ``path`` (config.json, weights, tokenizer); batched
        continuously when ``config.continuous_rows`` is above 0."""
        device = resolve_device(config.device)
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(config.dtype))
        # transformers wraps ``to`` with functools.wraps, which hides the bound self from mypy.
        torch.nn.Module.to(model, device)
        model.eval()
        description = ModelDescription(
            name=name,
            model_id=path.absolute().name,
            revision=config.revision or folder_revision(path),
            backend="transformers",
            family=str(model.config.model_type),
            dtype=config.dtype,
            device=str(device),
            max_length=config.max_length,
            image_tokens=0,
        )
        if config.continuous_rows > 0:
            return ContinuousGeneration(description, tokenizer, model, config.continuous_rows)
        return cls(description, tokenizer, model)

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt. Raises InvalidArgument for an unknown role."""
        with as_invalid_argument():
            return len(self._prompts.ids(messages))

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        """One Generation per request, in order. A prompt that leaves no room under
        ``max_length`` gives an empty, unfinished generation (it fails alone)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate, list(batch))

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        """Per request, one probability per choice label, in order, summing to 1. Raises
        InvalidArgument when a label is not exactly one token (see chat.choice_ids)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._choose, list(batch))

    def close(self) -> None:
        """Stop the batch still running (within one layer), then free the device."""
        self._interrupt.set()
        self._executor.shutdown(wait=True)
        self._interrupt.release()
        del self._model
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the device thread ---------------------------------------------------------------
    def _generate(self, batch: list[GenerationRequest]) -> list[Generation]:
        with as_invalid_argument():
            prompts = [self._prompts.ids(r.messages) for r in batch]
        limit = self.description.max_length
        budgets = [
            max(0, min(r.decoding.max_new_tokens, limit - len(p)))
            for r, p in zip(batch, prompts, strict=True)
        ]
        events = [r.abandoned for r in batch]

        def gone() -> bool:  # every caller left: stop within a layer, even mid-prefill
            return all(e is not None and e.is_set() for e in events)

        with self._on_device():
            try:
                with self._interrupt.abandoning(gone):
                    decoded = generate_batch(
                        self._model,
                        prompts,
                        [r.decoding for r in batch],
                        budgets,
                        eos_ids=self._eos,
                        pad_id=self._pad,
                        device=self._device,
                        abandoned=events,
                    )
            except BatchAbandoned:  # nobody reads these
                decoded = [Decoded([], finished=False) for _ in batch]
        return [
            Generation(
                text=str(self._tokenizer.decode(d.tokens, skip_special_tokens=True)).strip(),
                prompt_tokens=len(p),
                generated_tokens=len(d.tokens) + d.finished,  # the EOS was generated too
                finished=d.finished,
            )
            for p, d in zip(prompts, decoded, strict=True)
        ]

    def _choose(self, batch: list[ChoiceRequest]) -> list[list[float]]:
        with as_invalid_argument():
            prompts = [self._prompts.ids(r.messages) for r in batch]
            labels = [choice_ids(self._tokenizer, r.choices) for r in batch]
        with self._on_device():
            logits = last_logits(self._model, prompts, self._pad, self._device)
        return [
            torch.softmax(row[ids], dim=-1).tolist()
            for row, ids in zip(logits.cpu(), labels, strict=True)
        ]

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Inference mode; a device failure becomes the core's error for this batch."""
        try:
            with torch.inference_mode():
                yield
        except Exception as exc:
            raise classify_device_error(exc, self.description.name) from exc


class ContinuousGeneration(TransformersGeneration):
    """The same model, contract and results, batched continuously: the core sends each
    request on its own (``continuous``), and :class:`.continuous.DecodeLoop` decodes every
    running request one step at a time on the device thread, at most ``max_rows`` at once.
    Cancelling an awaiting ``generate`` stops its row at the next step."""

    continuous = True

    def __init__(
        self,
        description: ModelDescription,
        tokenizer: PreTrainedTokenizerBase,
        model: Any,
        max_rows: int,
    ) -> None:
        super().__init__(description, tokenizer, model)
        self._loop = DecodeLoop(
            model,
            eos_ids=self._eos,
            pad_id=self._pad,
            device=self._device,
            max_rows=max_rows,
            run_on_device=self._call,
            name=description.name,
            abandoning=self._interrupt.abandoning,
        )

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in batch)))

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        return list(await asyncio.gather(*(self._choose_one(r) for r in batch)))

    def close(self) -> None:
        if self._loop.closed:
            return
        self._interrupt.set()
        self._loop.close()
        super().close()

    async def _generate_one(self, request: GenerationRequest) -> Generation:
        with as_invalid_argument():
            prompt = self._prompts.ids(request.messages)
        limit = self.description.max_length
        budget = max(0, min(request.decoding.max_new_tokens, limit - len(prompt)))
        future, done = _future()
        row = Row(prompt, request.decoding, budget, done)
        if request.abandoned is not None and request.abandoned.is_set():
            row.abandoned.set()
        self._loop.submit(row)
        try:
            decoded = await future
        except asyncio.CancelledError:
            row.abandoned.set()  # its row leaves at the next step
            raise
        return Generation(
            text=str(self._tokenizer.decode(decoded.tokens, skip_special_tokens=True)).strip(),
            prompt_tokens=len(prompt),
            generated_tokens=len(decoded.tokens) + decoded.finished,
            finished=decoded.finished,
        )

    async def _choose_one(self, request: ChoiceRequest) -> list[float]:
        with as_invalid_argument():
            prompt = self._prompts.ids(request.messages)
            labels = choice_ids(self._tokenizer, request.choices)
        future, done = _future()
        self._loop.submit(Choice(prompt, done))
        logits = await future
        return torch.softmax(logits[labels], dim=-1).tolist()

    def _call(self, forward: Callable[[], Any]) -> Any:
        """One model call on the loop's thread; a device failure becomes the core's error."""
        try:
            return forward()
        except BatchAbandoned:  # not the device's: the loop drops those rows
            raise
        except Exception as exc:
            raise classify_device_error(exc, self.description.name) from exc


def _future() -> tuple[asyncio.Future[Any], Callable[[Any], None]]:
    """A future on the running event loop and a callback that settles it from any thread
    (an exception value sets the exception)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any) -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    def done(value: Any) -> None:
        loop.call_soon_threadsafe(settle, value)

    return future, done


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> frozenset[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("the model has no EOS token: generation could not stop")
    return frozenset(ids)
