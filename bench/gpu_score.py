"""GPU check for Score: a LLaVA-1.5-7B-shaped reward model, random bf16 weights, served
in-process (transformers backend, dynamic batching, real gRPC over loopback), 64 concurrent
clients. Prints samples/s and the ratio to the FLOP bound:
    bound = measured bf16 matmul rate / (2 x parameters x tokens per sample),
the same model's forward called directly at the server's batch size on inputs prepared
beforehand (the gap to served is what serving, image preparation included, costs), and a
profile of a short served window (``--profile-samples``, 0: none): the share of the wall
time the device ran kernels, and the kernels that took the most of it.

    python bench/gpu_score.py            # on a CUDA machine
    python bench/gpu_score.py --tiny     # the same code path on CPU with tiny shapes

The weights are random and built in device memory (nothing 14 GB is written to disk); the
processor is the offline tiny one with LLaVA-1.5's image size (336 px -> 576 image tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from align2.client import Sample, Turn
from align2.server import backends
from align2.server.backends.base import ModelDescription
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import ModelConfig
from align2.server.models.builders import build_llava_reward
from align2.server.testing import ServerThread

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpu_shapes import CLIP_L_336, TINY_TEXT, TINY_VISION, VICUNA_7B, server_config
from score import images, load  # COCO-sized (640x480) JPEGs, distinct content


def bf16_rate(device: torch.device, size: int, repeats: int) -> float:
    """Measured dense bf16 matmul FLOP/s on this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def build_backend(tiny: bool, folder: pathlib.Path, device: torch.device) -> TransformersScoring:
    """A LLaVA-1.5-7B-shaped reward model with random weights, made directly on the device."""
    processor_dir = build_llava_reward(folder / "processor", image_size=336, patch_size=14)
    processor = AutoProcessor.from_pretrained(processor_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlavaConfig(
        text_config=LlamaConfig(**(TINY_TEXT if tiny else VICUNA_7B)),
        vision_config=CLIPVisionConfig(**(TINY_VISION if tiny else CLIP_L_336)),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    hidden = config.text_config.hidden_size
    head = torch.randn(1, hidden, device=device) / hidden**0.5
    description = ModelDescription(
        name="rm-7b",
        model_id="llava-1.5-7b-shaped-random",
        revision="random",
        backend="transformers",
        family="llava",
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        max_length=2048,
        image_tokens=576,
        image_mode="pad",
    )
    return TransformersScoring(description, processor, model.model, head, "pad")


QUESTION = "What is unusual about this image? Describe the scene and explain what stands out."


async def drive(
    target: str, clients: int, per_client: int, warm: bool = True
) -> tuple[float, list[float]]:
    """Seconds and per-call latencies of ``clients`` clients scoring ``per_client`` samples
    each, one per call (bench/score.py's load). Every sample on its own image, as the
    question stage sees them: batch-mates share no prefix past BOS (with one image reused,
    shared prefixes would skip nearly all)."""
    data = [
        Sample(id=str(i), image=picture, turns=[Turn(QUESTION)])
        for i, picture in enumerate(images(clients * per_client))
    ]
    row = await load(target, clients, per_client, "served", data, warm=warm)
    return row.seconds, row.latencies


def direct_rate(backend: TransformersScoring, batch: int, repeats: int) -> float:
    """Samples/s of ``backend.score`` on ``batch`` inputs, each on its own image, called
    directly (no server): the model's own rate at the server's batch size."""
    prepared = [
        backend.prepare(
            f"<image>\n{QUESTION}",
            Image.open(io.BytesIO(picture)).convert("RGB"),
            max_text_tokens=2048,
            truncate=False,
        )
        for picture in images(batch)
    ]

    async def run(times: int) -> None:
        for _ in range(times):
            await backend.score(prepared)  # returns floats: the device has finished

    asyncio.run(run(2))  # warm: kernels chosen, memory pooled
    started = time.perf_counter()
    asyncio.run(run(repeats))
    return batch * repeats / (time.perf_counter() - started)


def profile_served(target: str, clients: int, samples: int) -> list[str]:
    """Summary lines of torch.profiler over ``samples`` served samples: the share of the
    wall time the device ran kernels, and the top kernels by device time (CUPTI sees the
    kernels of every thread; CPU operators of the server's threads are not recorded, so
    none are listed)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    per_client = max(1, samples // clients)
    with profile(activities=activities) as prof:
        seconds, _ = asyncio.run(drive(target, clients, per_client, warm=False))
    averages = prof.key_averages()
    kernels = sorted(
        (e for e in averages if e.device_type.name == "CUDA" and e.self_device_time_total > 0),
        key=lambda e: e.self_device_time_total,
        reverse=True,
    )
    busy = sum(e.self_device_time_total for e in kernels) / 1e6  # microseconds
    lines = [
        f"profile: {clients * per_client} samples in {seconds:.2f} s, device kernels "
        f"{busy:.2f} s = {busy / seconds:.1%} of the wall time"
    ]
    for event in kernels[:8]:
        share = event.self_device_time_total / 1e6 / max(busy, 1e-9)
        lines.append(f"profile kernel {share:6.1%}  x{event.count:<6d} {event.key[:90]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a dry run)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--profile-samples", type=int, default=128, help="0: no profile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    rate = bf16_rate(
        device, 8192 if device.type == "cuda" else 1024, 50 if device.type == "cuda" else 3
    )
    print(f"measured matmul rate: {rate / 1e12:.1f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        backend = build_backend(args.tiny, pathlib.Path(tmp), device)
        params = sum(p.numel() for p in backend._base.parameters())
        registry = backends.Registry().adding(
            scoring={"bench-7b": lambda name, config, path: backend}
        )
        models = {n: ModelConfig(path=tmp, backend="bench-7b") for n in ("question", "answer")}
        config = server_config(models, args.max_batch_size)
        server = ServerThread(config, registry).start()
        try:
            probe = backend.prepare(
                f"<image>\n{QUESTION}",
                Image.new("RGB", (640, 480)),
                max_text_tokens=2048,
                truncate=False,
            )
            seconds, latencies = asyncio.run(drive(server.target, args.clients, args.per_client))
            profiled = (
                profile_served(server.target, args.clients, args.profile_samples)
                if args.profile_samples
                else []
            )
            # The server idle, before it closes the backend: the model's own rate.
            direct = direct_rate(backend, args.max_batch_size, 2 if args.tiny else 4)
        finally:
            server.stop()
    samples = args.clients * args.per_client
    throughput = samples / seconds
    flop_per_sample = 2 * params * probe.tokens
    bound = rate / flop_per_sample
    print(f"model: {params / 1e9:.2f} B parameters, {probe.tokens} tokens per sample")
    print(
        f"served: {throughput:.2f} samples/s with {args.clients} clients "
        f"(p50 {statistics.median(latencies) * 1000:.0f} ms)"
    )
    print(f"FLOP bound: {bound:.2f} samples/s -> {throughput / bound:.1%} of the bound")
    print(
        f"direct: forwards of {args.max_batch_size} prepared inputs, no server: "
        f"{direct:.2f} samples/s = "
        f"{direct / bound:.1%} of the bound; served/direct {throughput / direct:.3f}"
    )
    for line in profiled:
        print(line)


if __name__ == "__main__":
    main()
