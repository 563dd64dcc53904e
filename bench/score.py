"""Score throughput and latency: the model called directly vs the service (`make bench-score`).

A LLaVA-1.5-shaped reward model big enough that compute dominates (~38M parameters, CLIP at
336 px: 576 image tokens) is built offline. From one run this prints throughput and
p50/p99 latency for:
  (a) the model called directly in-process at its best batch size (the machine's limit),
  (b) the service with dynamic batching, N concurrent clients,
  (c) the service with max_batch_size 1, same load,
  (d) the model called directly at batch size 1,
and the one-client latency of (b) against a single direct call. "Directly" means what a
user would write in-process: prepare (decode, pad, tokenise, image processor) + forward.
The service runs as a separate process (`python -m align2.server`), clients use
align2.client's AsyncCurationClient over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align2.server.testing import ServerProcess


@dataclass
class Row:
    name: str
    items: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.items / self.seconds

    def pct(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    def line(self) -> str:
        return (
            f"{self.name:<44} {self.throughput:8.2f} samples/s   p50 {self.pct(0.5):8.1f} ms"
            f"   p99 {self.pct(0.99):8.1f} ms   ({self.items} samples)"
        )


def build_model(folder: pathlib.Path) -> pathlib.Path:
    from align2.server.models.builders import build_llava_reward

    path = folder / "bench-llava-38m"
    if not (path / "config.json").exists():
        build_llava_reward(
            path,
            text_hidden=512,
            text_layers=8,
            text_heads=8,
            vocab_size=2048,
            vision_hidden=256,
            vision_layers=4,
            vision_heads=4,
            image_size=336,
            patch_size=14,
        )
    return path


def images(count: int) -> list[bytes]:
    """COCO-sized JPEGs (640x480), distinct content."""
    from PIL import Image

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.effect_noise((640, 480), 20 + i % 50).convert("RGB").save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def samples(count: int):  # -> list[Sample]
    from align2.client import Sample, Turn

    pics = images(min(count, 16))
    return [
        Sample(
            id=str(i),
            image=pics[i % len(pics)],
            turns=[Turn(f"What is happening in region {i % 7} of the picture?", "")],
        )
        for i in range(count)
    ]


# -- direct ---------------------------------------------------------------------------
def direct(path: pathlib.Path, batch_sizes: list[int], items: int) -> dict[int, Row]:
    from align2.server.backends.transformers_scoring import TransformersScoring
    from align2.server.config import ModelConfig
    from align2.server.core import templates
    from align2.server.core.images import decode_image

    backend = TransformersScoring.load("bench", ModelConfig(path=str(path)), path)
    data = samples(items)

    def prepare(sample):  # type: ignore[no-untyped-def]
        image = decode_image(sample.image, max_bytes=1 << 26, max_pixels=1 << 26)
        text = templates.question_text(sample.turns)
        return backend.prepare(text, image, max_text_tokens=2048, truncate=False)

    asyncio.run(backend.score([prepare(data[0])]))  # warm-up
    rows = {}
    for size in batch_sizes:
        latencies, started = [], time.perf_counter()
        for lo in range(0, items, size):
            t0 = time.perf_counter()
            batch = [prepare(s) for s in data[lo : lo + size]]
            asyncio.run(backend.score(batch))
            latencies += [time.perf_counter() - t0] * len(batch)
        rows[size] = Row(f"direct, batch {size}", items, time.perf_counter() - started, latencies)
        print("  " + rows[size].line(), flush=True)
    backend.close()
    return rows


# -- service --------------------------------------------------------------------------
def start_server(path: pathlib.Path, max_batch_size: int, folder: pathlib.Path) -> ServerProcess:
    config = folder / f"bench-{max_batch_size}.toml"
    config.write_text(
        f'[server]\nport = 0\nmetrics_port = -1\nlog_level = "WARNING"\n'
        f"[batching]\nmax_batch_size = {max_batch_size}\nmax_batch_tokens = 1000000\n"
        f'[models.question]\npath = "{path}"\n[models.answer]\npath = "{path}"\n'
    )
    args = ["--config", str(config), "--log-level", "INFO"]
    return ServerProcess(args, folder / f"server-{max_batch_size}.log").start()


async def load(target: str, clients: int, per_client: int, name: str) -> Row:
    from align2.client import AsyncCurationClient

    data = samples(clients * per_client)
    latencies: list[float] = []
    async with AsyncCurationClient(target, timeout=600) as client:
        await client.score(data[:1], heads=["question"])  # connect + warm the path

        async def worker(k: int) -> None:
            for j in range(per_client):
                t0 = time.perf_counter()
                [result] = await client.score([data[k * per_client + j]], heads=["question"])
                assert result.error is None, result.error
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        seconds = time.perf_counter() - started
    return Row(name, clients * per_client, seconds, latencies)


def service(path: pathlib.Path, max_batch_size: int, runs: list[tuple[int, int]], folder):  # type: ignore[no-untyped-def]
    server = start_server(path, max_batch_size, folder)
    rows = []
    try:
        for clients, per_client in runs:
            name = f"service, max_batch_size {max_batch_size}, {clients} clients"
            rows.append(asyncio.run(load(server.target, clients, per_client, name)))
            print("  " + rows[-1].line(), flush=True)
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--single", type=int, default=20, help="one-client requests")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="align2-bench-") as tmp:
        folder = pathlib.Path(tmp)
        path = build_model(folder)
        n = args.clients * args.rounds
        print(f"model: {path.name}; {n} samples per measurement; {os.cpu_count()} CPUs")
        print("direct (prepare + forward, in-process):")
        direct_rows = direct(path, sizes, n)
        print("service (separate process, gRPC over loopback):")
        dynamic = service(path, 32, [(args.clients, args.rounds), (1, args.single)], folder)
        single = service(path, 1, [(args.clients, args.rounds)], folder)
    a = max(direct_rows.values(), key=lambda r: r.throughput)
    d = direct_rows[1] if 1 in direct_rows else direct(path, [1], args.single)[1]
    b, b1, c = dynamic[0], dynamic[1], single[0]
    print("\nsummary")
    for label, row in (("(a)", a), ("(b)", b), ("(c)", c), ("(d)", d), ("(b) 1 client", b1)):
        print(f"{label:<13} {row.line()}")
    ratio_ba = b.throughput / a.throughput
    gain_service = b.throughput / c.throughput
    gain_model = a.throughput / d.throughput
    single_ms = statistics.median(d.latencies) * 1000
    print(f"(b)/(a) = {ratio_ba:.3f}   target >= 0.85")
    print(
        f"(b)/(c) = {gain_service:.3f} vs (a)/(d) = {gain_model:.3f}: kept "
        f"{gain_service / gain_model:.3f} of the model's batching gain   target >= 0.85"
    )
    print(
        f"one client: (b) p50 {b1.pct(0.5):.1f} ms vs one direct call p50 {single_ms:.1f} ms: "
        f"+{b1.pct(0.5) - single_ms:.1f} ms   target <= 3 ms"
    )
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps([asdict(r) | {"throughput": r.throughput} for r in (a, b, c, d, b1)])
        )


if __name__ == "__main__":
    main()
