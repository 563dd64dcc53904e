"""GPU check for Align: a Vicuna-7B-shaped Llama with random bf16 weights on the transformers
generation backend, 64 concurrent rewrites of exactly 256 new tokens each: generated tokens/s.

    python bench/gpu_align.py            # on a CUDA machine
    python bench/gpu_align.py --tiny     # the same code path on CPU with tiny shapes

Measurements, all on the same in-memory model:
  direct: ``TransformersGeneration.generate`` on one batch of 64 rewrite requests (the
          backend's batched generation, no service around it);
  served: align2 in-process (``ServerThread``, real gRPC over loopback; Align only,
          question rewrites, review off), tokens counted from the responses, under two
          load shapes: 64 concurrent clients sending one sample per call, and one client
          sending 64 samples per call; ``--rounds`` calls each; for each
          ``align.max_delay_ms`` of ``--max-delay-ms``. The batch sizes the server's
          batcher formed are printed: a batch that starts before every rewrite has arrived
          holds the rest back for a whole 256-token generation.
It also prints the weight-streaming bound of a decode step (batch x measured copy
bandwidth / weight bytes: each step reads every weight once) and each rate's share of it.

The weights are random and made directly in device memory (nothing is written to disk).
The tokenizer is align2's tiny offline BPE without a chat template, so prompts are rendered
Vicuna v1.1 style from the default template set. Random weights would stop at EOS at
random: the EOS row of the LM head is zeroed, so the EOS logit is exactly 0 while the
largest of the other (31999) random logits is positive, and greedy decoding runs the whole
budget; the script checks that every rewrite generated exactly ``--new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from gpu_shapes import TINY_TEXT, VICUNA_7B, server_config
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from align2.client import AsyncCurationClient, Sample, Turn
from align2.server import backends
from align2.server.backends.base import (
    Decoding,
    Generation,
    GenerationRequest,
    ModelDescription,
)
from align2.server.backends.transformers_generation import (
    ContinuousGeneration,
    TransformersGeneration,
)
from align2.server.config import Config, ModelConfig
from align2.server.core.prompts import TemplateLibrary
from align2.server.models.tokenizers import build_tokenizer
from align2.server.testing import ServerThread

TINY: dict[str, Any] = {
    **TINY_TEXT,
    "vocab_size": 1024,  # above the tokenizer's 512, like Vicuna's: the same decode path
}
MODEL_NAME = "llm"
BACKEND_NAME = "bench-7b"
MAX_LENGTH = 2048
DTYPE = torch.bfloat16
QUESTIONS = (
    "What is the man doing on the busy city street?",
    "Describe the image in detail.",
    "How many people are sitting on the wooden bench?",
    "Why might the dog be carrying a frisbee at the beach?",
    "What color is the bus parked next to the sidewalk?",
    "What do you see happening in this image?",
    "Is there anything unusual about the giraffe in this picture?",
    "What might the woman with the umbrella be waiting for?",
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make new floating-point tensors ``dtype`` inside the block (weights born bf16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(tiny: bool, device: torch.device) -> tuple[PreTrainedTokenizerBase, Any]:
    """The tokenizer and the shaped Llama, random weights made on ``device`` in bf16, with
    the LM head's EOS row zeroed (see the module docstring)."""
    tokenizer = build_tokenizer((), vocab_size=512, model_max_length=MAX_LENGTH)
    tokenizer.chat_template = None  # Vicuna checkpoints have none: FastChat v1.1 rendering
    config = LlamaConfig(
        **(TINY if tiny else VICUNA_7B),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device), default_dtype(DTYPE):
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    synchronize(device)
    return tokenizer, model


class RecordingBackend(TransformersGeneration):
    """The transformers generation backend, recording the size of each generate batch."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batch_sizes: list[int] = []

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        self.batch_sizes.append(len(batch))
        return await super().generate(batch)


def make_backend(
    tokenizer: PreTrainedTokenizerBase,
    model: Any,
    device: torch.device,
    tiny: bool,
    continuous_rows: int = 0,
) -> TransformersGeneration:
    """The transformers generation backend around in-memory objects (nothing loaded):
    batched by the core (recording its batch sizes), or continuously batched with at most
    ``continuous_rows`` rows (models.NAME.continuous_rows)."""
    description = ModelDescription(
        name=MODEL_NAME,
        model_id="tiny-llama-random" if tiny else "vicuna-7b-shaped-random",
        revision="random",
        backend="transformers",
        family="llama",
        dtype=str(DTYPE).removeprefix("torch."),
        device=str(device),
        max_length=MAX_LENGTH,
        image_tokens=0,
    )
    if continuous_rows > 0:
        return ContinuousGeneration(description, tokenizer, model, continuous_rows)
    return RecordingBackend(description, tokenizer, model)


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int) -> float:
    """Measured device memory bandwidth in bytes/s (a copy reads and writes each byte)."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Rate:
    """One measurement: rewrites, generated tokens and wall seconds."""

    name: str
    rewrites: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def line(self, bound: float) -> str:
        return (
            f"{self.name:<46} {self.tokens_per_s:9.1f} gen tok/s   ({self.rewrites} rewrites, "
            f"{self.tokens} tokens, {self.seconds:.2f} s; {self.tokens_per_s / bound:.1%} "
            "of the weight-streaming bound)"
        )


def rewrite_requests(count: int, new_tokens: int) -> list[GenerationRequest]:
    """``count`` question rewrites as Align builds them (default template set), greedy."""
    template = TemplateLibrary().get("default-v1")
    decoding = Decoding(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, seed=0)
    return [
        GenerationRequest(template.question_messages(QUESTIONS[i % len(QUESTIONS)]), decoding)
        for i in range(count)
    ]


def direct(backend: TransformersGeneration, count: int, new_tokens: int) -> Rate:
    """One batch of ``count`` rewrites through ``backend.generate``, timed on its second run:
    the first full-length run grows the allocator's cache and meets every KV length once.
    On an H100, with cuDNN attention still on (before ``prepare_device``), a 4-token
    warm-up left the timed run at 22.3 s against 6.9 s for this second run."""
    requests = rewrite_requests(count, new_tokens)
    asyncio.run(backend.generate(requests))
    started = time.perf_counter()
    made = asyncio.run(backend.generate(requests))
    seconds = time.perf_counter() - started
    lengths = [g.generated_tokens for g in made]
    if set(lengths) != {new_tokens} or any(g.finished for g in made):
        raise RuntimeError(f"expected {new_tokens} tokens per rewrite, got {sorted(set(lengths))}")
    return Rate(f"direct: backend.generate, batch {count}", count, sum(lengths), seconds)


def serve_config(max_batch_size: int, max_delay_ms: float, new_tokens: int) -> Config:
    """Align only, the inner LLM on the pre-built backend, one batch may hold every client."""
    config = server_config(llm_models(), max_batch_size)
    config.score.enabled = False
    enable_align(config, new_tokens)
    config.align.review = False
    config.align.max_delay_ms = max_delay_ms
    return config


def llm_models() -> dict[str, ModelConfig]:
    """The inner LLM's model entry, on the pre-built backend (BACKEND_NAME)."""
    return {MODEL_NAME: ModelConfig(path=".", backend=BACKEND_NAME, max_length=MAX_LENGTH)}


def enable_align(config: Config, new_tokens: int) -> None:
    """Align on the inner LLM, allowing ``new_tokens`` per generation."""
    config.align.enabled = True
    config.align.model = MODEL_NAME
    config.align.max_new_tokens_limit = max(new_tokens, config.align.max_new_tokens_limit)


@dataclass(frozen=True)
class Load:
    """How the rewrites reach the server: ``clients`` concurrent clients, each making
    ``rounds`` Align calls of ``per_call`` one-turn samples in turn."""

    name: str
    clients: int
    per_call: int
    rounds: int

    @property
    def rewrites(self) -> int:
        return self.clients * self.per_call * self.rounds


async def drive(target: str, load: Load, new_tokens: int) -> tuple[float, int]:
    """Run ``load`` (question rewrites, review off, greedy); returns the seconds and the
    generated tokens the responses report, after checking each rewrite's count."""
    options: dict[str, Any] = dict(
        parts="questions", review=False, max_new_tokens=new_tokens, temperature=0.0
    )
    tokens: list[int] = []
    async with AsyncCurationClient(target, timeout=3600) as client:

        async def worker(k: int) -> None:
            for j in range(load.rounds):
                samples = [
                    Sample(id=f"{k}-{j}-{i}", image=b"", turns=[Turn(question(k + j + i), "")])
                    for i in range(load.per_call)
                ]
                reply = await client.align_with_info(samples, **options)
                for result in reply.results:
                    if result.error is not None:
                        raise RuntimeError(f"Align failed: {result.error}")
                tokens.append(reply.tokens.generated_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(load.clients)))
        seconds = time.perf_counter() - started
    if set(tokens) != {new_tokens * load.per_call}:
        raise RuntimeError(f"expected {new_tokens} tokens per rewrite, got {sorted(set(tokens))}")
    return seconds, sum(tokens)


def question(index: int) -> str:
    return f"<image>\n{QUESTIONS[index % len(QUESTIONS)]}"


def served(
    backend: TransformersGeneration, args: argparse.Namespace, load: Load, max_delay_ms: float
) -> tuple[Rate, list[int]]:
    """The backend behind align2 in-process (which closes it at the end) under ``load``;
    the rate and the sizes of the batches the server's batcher formed meanwhile (none when
    the backend batches continuously)."""
    recorded = backend.batch_sizes if isinstance(backend, RecordingBackend) else []
    registry = backends.Registry().adding(
        generation={BACKEND_NAME: lambda name, config, path: backend}
    )
    config = serve_config(args.clients, max_delay_ms, args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        config.server.cache_dir = tmp
        server = ServerThread(config, registry).start()
        try:
            before = len(recorded)  # the server's warm-up ran batches too
            seconds, tokens = asyncio.run(drive(server.target, load, args.new_tokens))
            sizes = recorded[before:]
        finally:
            server.stop()
    how = "continuous" if backend.continuous else f"delay {max_delay_ms:g} ms"
    name = f"served: {load.name}, {how}"
    return Rate(name, load.rewrites, tokens, seconds), sizes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="tiny shapes on CPU (a dry run)")
    add("--clients", type=int, default=64, help="concurrent rewrites")
    add("--new-tokens", type=int, default=256, help="exact new tokens per rewrite")
    add("--rounds", type=int, default=2, help="Align calls per served client")
    add(
        "--continuous-rows",
        default="0",
        help="comma-separated: each N>0 serves with continuous batching of at most N rows, "
        "0 with the core's batcher (0,64: both, on one model build)",
    )
    add(
        "--max-delay-ms",
        default="50",
        help="align.max_delay_ms of the served runs, comma-separated (50: the default)",
    )
    return parser.parse_args()


def describe(
    device: torch.device, model: Any, backend: TransformersGeneration, clients: int
) -> float:
    """Print the device, model and prompts; return the weight-streaming bound (tok/s)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    bandwidth = copy_bandwidth(device, 2048 if device.type == "cuda" else 256, 20)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompts = [backend.prompt_tokens(r.messages) for r in rewrite_requests(len(QUESTIONS), 1)]
    bound = clients * bandwidth / weight_bytes
    print(
        f"model: {params / 1e9:.2f} B parameters, {weight_bytes / 2**30:.1f} GiB "
        f"({next(model.parameters()).dtype})\n"
        f"prompts (Vicuna v1.1, default-v1 question rewrite): {min(prompts)}-{max(prompts)} "
        f"tokens, median {statistics.median(prompts):.0f}\n"
        f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s -> weight-streaming bound at "
        f"batch {clients}: {bound:.0f} gen tok/s"
    )
    return bound


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    started = time.perf_counter()
    tokenizer, model = build_model(args.tiny, device)
    print(f"built the model on {device} in {time.perf_counter() - started:.1f} s")

    def backend(rows: int = 0) -> TransformersGeneration:  # one per use: closing drops it
        return make_backend(tokenizer, model, device, args.tiny, rows)

    with contextlib.closing(backend()) as probe:
        bound = describe(device, model, probe, args.clients)
    print(
        f"load: {args.clients} concurrent rewrites x exactly {args.new_tokens} new tokens "
        "(EOS suppressed), greedy"
    )
    with contextlib.closing(backend()) as plain:
        reference = direct(plain, args.clients, args.new_tokens)
    print(reference.line(bound), flush=True)
    loads = (
        Load(f"{args.clients} clients x {args.rounds} calls of 1", args.clients, 1, args.rounds),
        Load(f"1 client x {args.rounds} calls of {args.clients}", 1, args.clients, args.rounds),
    )
    delays = [float(d) for d in args.max_delay_ms.split(",")]
    for rows in (int(r) for r in args.continuous_rows.split(",")):
        # A continuous backend has no batcher in front: the delay does not apply, run once.
        for delay, load in itertools.product([0.0] if rows else delays, loads):
            rate, sizes = served(backend(rows), args, load, delay)
            print(rate.line(bound))
            ratio = rate.tokens_per_s / reference.tokens_per_s
            print(f"  served/direct = {ratio:.3f}; batches while serving: {sizes}", flush=True)
    if device.type == "cuda":
        print(f"peak device memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
