"""The reference reward backend: a transformers vision-language model plus a scalar head.

Contract (the method's definition of a score): the ids are the reference's
(``preprocess.reward_ids``: LLaVA's ``tokenizer_image_token``, BOS kept, no EOS) with the
``<image>`` marker replaced by the ids the processor expands it into, and the score is
``score.weight @ h`` where ``h`` is the base model's final hidden state at the last
non-padding position. Inputs are prepared one at a time and right-padded only when
batched, so a score does not depend on its batch-mates (position ids are unchanged by
right padding, padded keys are masked). Inputs of one batch that carry the same image and
begin with the same ids run that prefix once (:mod:`.prefixes`; ``share_prefixes``): the
same scores within float rounding. A batch of very different lengths runs as a few forwards
of neighbouring lengths (:mod:`.length_groups`; ``length_split_tokens``): less padding, the
same scores within float rounding.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from align2.server import metrics
from align2.server.backends import length_groups, prefixes
from align2.server.backends.base import ModelDescription, Prepared
from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.backends.preprocess import (
    IMAGE_BACKEND,
    pad_to_square,
    reward_ids_and_image_end,
    text_budget,
)
from align2.server.backends.torch_device import (
    Interrupt,
    classify_device_error,
    prepare_device,
    resolve_device,
    torch_dtype,
)
from align2.server.config import ModelConfig
from align2.server.formats import IMAGE_TOKEN

log = logging.getLogger(__name__)


@dataclass
class _Inputs:
    """One prepared input: token ids and the processor's image tensors (no batch dim)."""

    input_ids: torch.Tensor  # [L]
    images: dict[str, torch.Tensor]  # e.g. pixel_values [3, H, W] or [N, 3, H, W]
    image_key: bytes = b""  # a digest of ``images``: shared prefixes, cached image features
    image_end: int = 0  # ids before it are BOS and the image expansion


class TransformersScoring:
    """ScoringBackend on transformers: CPU or CUDA, fp32/bf16/fp16."""

    def __init__(
        self,
        description: ModelDescription,
        processor: Any,
        base: torch.nn.Module,
        head: torch.Tensor,
        image_mode: str,
        executor: ThreadPoolExecutor | None = None,
        share_prefixes: bool = True,
        length_split_tokens: int = -1,
    ) -> None:
        """``executor``: the one thread that runs this model's forwards; by default its own,
        which ``close`` stops. Backends over one shared model pass that model's thread and
        leave stopping it to that model (see shared_scoring). ``share_prefixes``: run a
        prefix that inputs of a batch share once; ``length_split_tokens``: split a batch by
        length when each extra forward saves more than that many padded tokens, 0 never, -1
        by device (see the module docstring)."""
        self.description = description
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._base = base
        self._head = head  # [1, hidden], float32 on the device
        self._image_mode = image_mode
        self._share_prefixes = share_prefixes
        self.prefix_tokens_saved = 0
        """Ids not run again thanks to shared prefixes, so far (tests and benchmarks)."""
        self.padded_tokens_saved = 0
        """Padding not computed thanks to length-aware splits, so far (tests, benchmarks)."""
        self._device = torch.device(description.device)
        self._length_split_tokens = length_groups.overhead(length_split_tokens, self._device.type)
        prepare_device(self._device)
        self._dtype = next(base.parameters()).dtype
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._tokenizer.eos_token_id or 0
        self._mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self._around_marker = _around_marker(self._tokenizer)
        # One thread owns the device: batches run one at a time, in order.
        self._executor = executor or ThreadPoolExecutor(
            1, thread_name_prefix=f"device-{description.name}"
        )
        # Whoever owns that thread stops its running batch at close.
        self._interrupt = Interrupt(base, description.name) if executor is None else None

    @classmethod
    def load(cls, name: str, config: ModelConfig, path: pathlib.Path) -> TransformersScoring:
        checkpoint = read_reward_checkpoint(path, revision=config.revision or None)
        device = resolve_device(config.device)
        dtype = torch_dtype(config.dtype)
        processor = AutoProcessor.from_pretrained(path, backend=IMAGE_BACKEND)
        _quiet_expected_head_report()
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        base = model.model  # the LM head is not needed: the scalar head replaces it
        del model
        base.to(device).eval()
        head = checkpoint.score_weight.to(device=device, dtype=torch.float32)
        description = ModelDescription(
            name=name,
            model_id=checkpoint.model_id,
            revision=checkpoint.revision,
            backend="transformers",
            family=checkpoint.family,
            dtype=config.dtype,
            device=str(device),
            max_length=config.max_length,
            image_tokens=0,
            image_mode=config.image_mode,
        )
        backend = cls(
            description,
            processor,
            base,
            head,
            config.image_mode,
            share_prefixes=config.share_prefixes,
            length_split_tokens=config.length_split_tokens,
        )
        backend.description = replace(description, image_tokens=backend.image_tokens())
        return backend

    # -- prepare (worker threads) --------------------------------------------------------
    def image_tokens(self) -> int:
        """Tokens one image takes, measured on a probe image; 0 when it varies by image."""
        if getattr(self._processor.image_processor, "do_image_splitting", False):
            return 0
        return len(self._encode(Image.new("RGB", (32, 32)))[0])

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        if self._image_mode == "pad":
            image = pad_to_square(image, self._mean)
        expansion, images = self._encode(image)
        listed, image_end = reward_ids_and_image_end(self._tokenizer, text, expansion)
        ids = torch.tensor(listed, dtype=torch.long)
        image_tokens = len(expansion)
        payload = _Inputs(ids, images)
        if self._share_prefixes:
            payload.image_key = image_digest(images)
            payload.image_end = image_end
        text_tokens = len(ids) - image_tokens  # BOS and the text
        keep = text_budget(
            text_tokens=text_tokens,
            image_tokens=image_tokens,
            max_text_tokens=max_text_tokens,
            max_length=self.description.max_length,
            model_name=self.description.name,
            truncate=truncate,
        )
        if keep < text_tokens:
            payload.input_ids = ids[: image_tokens + keep]  # the image comes right after BOS
        return Prepared(len(payload.input_ids), keep < text_tokens, payload)

    def _encode(self, image: Image.Image) -> tuple[list[int], dict[str, torch.Tensor]]:
        """The ids the processor expands ``<image>`` into for ``image``, and its image
        tensors. The text around the marker is tokenised by reward_ids, as the reference
        does, not by the processor."""
        # Idefics3 takes one list of images per text; LLaVA a flat list.
        images: list[Any] = [[image]] if self.description.family == "idefics3" else [image]
        out = dict(self._processor(text=[IMAGE_TOKEN], images=images, return_tensors="pt"))
        ids = out.pop("input_ids")[0].tolist()
        out.pop("attention_mask", None)
        # The processor's ids are the marker's own special tokens (BOS) around the expansion.
        start, end = self._around_marker
        tensors = {k: v[0] for k, v in out.items() if isinstance(v, torch.Tensor)}
        return ids[start : len(ids) - end], tensors

    # -- score (the device thread) -------------------------------------------------------
    async def score(self, batch: Sequence[Prepared]) -> list[float]:
        loop = asyncio.get_running_loop()
        inputs = [p.payload for p in batch]
        return await loop.run_in_executor(self._executor, self._forward, inputs)

    async def features(self, batch: Sequence[Prepared]) -> torch.Tensor:
        """The pooled hidden states ``[B, hidden]`` (float32, CPU), one row per input.

        Contract: ``score(batch)[i] == features(batch)[i] @ head`` (the head as float32), up
        to float32 rounding; the head is not applied. Heads are trained on these
        (align2.server.training), so they must come from the very forward that scores; each
        input runs whole (no shared prefixes) and the batch in one forward (no length
        split), so that hooks see every input's full sequence, once per batch.
        """
        loop = asyncio.get_running_loop()
        inputs = [p.payload for p in batch]
        pooled = await loop.run_in_executor(self._executor, self._pooled, inputs, False, False)
        return pooled.cpu()

    def _forward(self, inputs: list[_Inputs]) -> list[float]:
        scores = self._pooled(inputs, self._share_prefixes) @ self._head.T
        return [float(s) for s in scores[:, 0].cpu()]

    def _pooled(self, inputs: list[_Inputs], share: bool, split: bool = True) -> torch.Tensor:
        """Final hidden state at each input's last non-padding token, float32 on the device.
        ``share``: shared prefixes; ``split``: length-aware forwards (else one forward)."""
        try:
            with torch.inference_mode():
                if not split:
                    return self._pooled_padded(inputs)
                if not share:
                    return self._pooled_whole(inputs)
                groups = prefixes.plan(inputs)
                return self._in_order(
                    [g.members for g in groups],
                    [
                        self._pooled_shared([inputs[i] for i in g.members], g.prefix)
                        if g.prefix
                        else self._pooled_whole([inputs[i] for i in g.members])
                        for g in groups
                    ],
                )
        except Exception as exc:
            raise classify_device_error(exc, self.description.name) from exc

    def _pooled_whole(self, inputs: list[_Inputs]) -> torch.Tensor:
        """Each input whole: one padded forward, or one per group of neighbouring lengths."""
        lengths = [len(x.input_ids) for x in inputs]
        groups = length_groups.split(lengths, self._length_split_tokens)
        if len(groups) == 1:
            return self._pooled_padded(inputs)
        saved = len(inputs) * max(lengths) - length_groups.padded_tokens(lengths, groups)
        self._skipped("padding", saved)
        return self._in_order(groups, [self._pooled_padded([inputs[i] for i in g]) for g in groups])

    def _in_order(self, groups: Sequence[Sequence[int]], parts: list[torch.Tensor]) -> torch.Tensor:
        """The rows of ``parts`` (one tensor per group, rows in the group's order) put back
        in the batch's order: ``groups`` list each group's indices into the batch."""
        order = torch.tensor([i for g in groups for i in g], device=self._device)
        rows = torch.cat(parts)
        return rows.index_copy(0, order, rows)

    def _skipped(self, reason: str, tokens: int) -> None:
        """Count tokens not computed: the backend's own tally and the Prometheus counter."""
        if reason == "padding":
            self.padded_tokens_saved += tokens
        else:
            self.prefix_tokens_saved += tokens
        metrics.SKIPPED_TOKENS.labels(model=self.description.name, reason=reason).inc(tokens)

    def _pooled_padded(self, inputs: list[_Inputs]) -> torch.Tensor:
        ids, mask = _pad_right([x.input_ids for x in inputs], self._pad_id)
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._run(inputs, ids, mask).last_hidden_state
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(len(inputs), device=self._device), last].float()

    def _pooled_shared(self, inputs: list[_Inputs], prefix: int) -> torch.Tensor:
        """Inputs that share their first ``prefix`` ids (the image among them): the prefix
        runs once, its cache is repeated over the group, each remainder runs against it."""
        ids = inputs[0].input_ids[:prefix][None].to(self._device)
        cache = self._run(inputs[:1], ids, torch.ones_like(ids), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(inputs))
        rest, rest_mask = _pad_right([x.input_ids[prefix:] for x in inputs], self._pad_id)
        rest, rest_mask = rest.to(self._device), rest_mask.to(self._device)
        mask = torch.cat([rest_mask.new_ones((len(inputs), prefix)), rest_mask], dim=1)
        hidden = self._run(None, rest, mask, past_key_values=cache).last_hidden_state
        self._skipped("shared_prefix", prefix * (len(inputs) - 1))
        last = rest_mask.sum(dim=1) - 1
        return hidden[torch.arange(len(inputs), device=self._device), last].float()

    def _run(
        self, inputs: list[_Inputs] | None, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any
    ) -> Any:
        """The base model's output for a padded batch: with the image tensors of ``inputs``,
        or text only (``None``: the remainders after a cached prefix)."""
        images: dict[str, torch.Tensor] = {}
        if inputs is not None:
            images = {
                key: _stack_padded([x.images[key] for x in inputs]).to(self._device)
                for key in inputs[0].images
            }
            if "pixel_values" in images:
                images["pixel_values"] = images["pixel_values"].to(self._dtype)
        return self._base(input_ids=ids, attention_mask=mask, **images, **kwargs)

    def close(self) -> None:
        """Stop the batch still running (within one layer), then free the device."""
        if self._interrupt is not None:
            self._interrupt.set()
        self._executor.shutdown(wait=True)
        if self._interrupt is not None:
            self._interrupt.release()
        del self._base
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def image_digest(images: Mapping[str, torch.Tensor]) -> bytes:
    """A digest of the tensors an image became (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(images):
        tensor = images[name].contiguous()
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.digest()


def _around_marker(tokenizer: Any) -> tuple[int, int]:
    """How many ids the tokenizer puts before and after a lone ``<image>`` marker (BOS: 1, 0)."""
    ids = list(tokenizer(IMAGE_TOKEN)["input_ids"])
    marker = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ids.count(marker) != 1:
        raise ValueError(f"the tokenizer does not keep {IMAGE_TOKEN} as one token: {ids}")
    start = ids.index(marker)
    return start, len(ids) - start - 1


def _pad_right(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors into [B, L] ids and attention mask."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-item image tensors; pad the first dim with zeros where counts differ
    (Idefics3 skips all-zero padding images)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    longest = max(t.shape[0] for t in tensors)
    out = torch.zeros((len(tensors), longest, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
    for row, t in enumerate(tensors):
        out[row, : t.shape[0]] = t
    return out


class _ExpectedHeadReport(logging.Filter):
    """transformers reports ``score.weight`` as UNEXPECTED on every reward-checkpoint load
    (the head is not part of the VLM class; we read it ourselves). Drop that report only;
    any report naming another key passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [line for line in text.splitlines() if line.count("|") >= 2 and "Key" not in line]
        flagged = [r for r in rows if any(w in r for w in ("UNEXPECTED", "MISSING", "MISMATCH"))]
        expected = [r for r in flagged if r.split("|")[0].strip() == "score.weight"]
        return not flagged or expected != flagged


_HEAD_REPORT_FILTER = _ExpectedHeadReport()


def _quiet_expected_head_report() -> None:
    logging.getLogger("transformers.modeling_utils").addFilter(_HEAD_REPORT_FILTER)  # idempotent
