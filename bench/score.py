"""Score throughput and latency: the model called directly vs the service (`make bench-score`).

A LLaVA-1.5-shaped reward model big enough that compute dominates (~38M parameters, CLIP at
336 px: 576 image tokens) is built offline. From one run this prints throughput and
p50/p99 latency for:
  (a) the model called directly in-process at its best batch size (a sweep: the limit on
      this machine),
  (b) the service with dynamic batching, N concurrent clients, its max_batch_size set to
      (a)'s batch size (what an operator tunes; the batcher may form smaller batches),
  (c) the service with max_batch_size 1, same load,
  (d) the model called directly at batch size 1,
and one client's latency through the idle service against a direct call, interleaved call
by call so that both see the same machine state. "Directly" means what a user would write
in-process: decode, pad, tokenise and run the image processor, then forward. The service
runs as a separate process (`python -m align2.server`); clients use align2.client's
AsyncCurationClient over loopback, on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import tempfile
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align2.server.testing import ServerProcess


@dataclass
class Row:
    name: str
    items: int
    seconds: float
    latencies: list[float]
    scores: list[float] = field(default_factory=list)
    """Question scores in the order of the samples (service rows)."""

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


def build_model(folder: pathlib.Path, size: str) -> pathlib.Path:
    from align2.server.models.builders import build_llava_reward

    if size == "tiny":  # the integration tests' tiny LLaVA: 16 image tokens, a few ms a pass
        return build_llava_reward(folder / "bench-llava-tiny", image_size=56, patch_size=14)
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
    """Question-head samples, each on its own image: with images reused, batch-mates of one
    image would share its prefix (models.NAME.share_prefixes) in the service and not in
    the direct batches of consecutive samples, and the comparison would be of work, not of
    serving."""
    from align2.client import Sample, Turn

    pics = images(count)
    return [
        Sample(
            id=str(i),
            image=pics[i],
            turns=[Turn(f"What is happening in region {i % 7} of the picture?", "")],
        )
        for i in range(count)
    ]


# -- direct ---------------------------------------------------------------------------
class Direct:
    """The model called in-process as a user would: decode, pad, tokenise, forward."""

    def __init__(self, path: pathlib.Path) -> None:
        from align2.server.backends.transformers_scoring import TransformersScoring
        from align2.server.config import ModelConfig

        self.backend = TransformersScoring.load("bench", ModelConfig(path=str(path)), path)

    def prepare(self, text: str, image: bytes):  # -> Prepared
        """One input as a user would prepare it: decode the image, then the backend's own
        preparation (padding, tokenising, the image processor)."""
        from align2.server.core.images import decode_image

        decoded = decode_image(image, max_bytes=1 << 26, max_pixels=1 << 26)
        return self.backend.prepare(text, decoded, max_text_tokens=2048, truncate=False)

    def run(self, batch: list) -> list[float]:  # type: ignore[type-arg]
        from align2.server.core import templates

        prepared = [self.prepare(templates.question_text(s.turns), s.image) for s in batch]
        return asyncio.run(self.backend.score(prepared))

    def sweep(self, batch_sizes: list[int], data: list) -> dict[int, Row]:  # type: ignore[type-arg]
        items = len(data)
        self.run(data[:1])  # warm-up
        rows = {}
        for size in batch_sizes:
            latencies, started = [], time.perf_counter()
            for lo in range(0, items, size):
                t0 = time.perf_counter()
                self.run(data[lo : lo + size])
                latencies += [time.perf_counter() - t0] * len(data[lo : lo + size])
            seconds = time.perf_counter() - started
            rows[size] = Row(f"direct, batch {size}", items, seconds, latencies)
            print("  " + rows[size].line(), flush=True)
        return rows


# -- service --------------------------------------------------------------------------
@dataclass
class Threads:
    """The server's thread settings (0: its default, sized from the machine)."""

    torch_threads: int = 0
    preprocess_workers: int = 0
    wait_policy: str = ""
    """OMP_WAIT_POLICY of the server: "" align2 serve's own choice; "unset" the OpenMP
    runtime's default (align2 before it chose one); else the value."""

    extra_env: tuple[str, ...] = ()
    """KEY=VALUE pairs for the server process (e.g. GOMP_SPINCOUNT=10000)."""

    def env(self) -> dict[str, str]:
        env = dict(os.environ) | dict(kv.split("=", 1) for kv in self.extra_env)
        if self.wait_policy:
            env["OMP_WAIT_POLICY"] = "" if self.wait_policy == "unset" else self.wait_policy
        return env


def start_server(
    path: pathlib.Path,
    max_batch_size: int,
    folder: pathlib.Path,
    threads: Threads,
    tag: str = "",
    **model_keys: bool | int,
) -> ServerProcess:
    """``python -m align2.server`` with ``path`` as both heads; ``model_keys``: more keys
    of each head's [models.NAME] table (e.g. share_prefixes=False); ``tag`` names its
    files (default: the batch size)."""
    tag = tag or str(max_batch_size)
    model = f'path = "{path}"\n' + "".join(
        f"{key} = {str(value).lower()}\n" for key, value in model_keys.items()
    )
    config = folder / f"bench-{tag}.toml"
    config.write_text(
        f'[server]\nport = 0\nmetrics_port = -1\nlog_level = "WARNING"\n'
        f"torch_threads = {threads.torch_threads}\n"
        f"[batching]\nmax_batch_size = {max_batch_size}\nmax_batch_tokens = 1000000\n"
        f"preprocess_workers = {threads.preprocess_workers}\n"
        f"[models.question]\n{model}[models.answer]\n{model}"
    )
    args = ["--config", str(config), "--log-level", "INFO"]  # INFO: the ready line
    log = folder / f"server-{tag}.log"
    return ServerProcess(args, log, env=threads.env()).start()


def largest_difference(got: list[float], reference: list[float], what: str) -> float:
    """The largest relative difference (to max(1, |reference|)) between two score lists;
    the run fails (SystemExit naming ``what``) when it exceeds 1e-4."""
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, reference, strict=True))
    if worst > 1e-4:
        raise SystemExit(f"{what}: scores differ by {worst:.1e} (> 1e-4)")
    return worst


async def load(
    target: str,
    clients: int,
    per_client: int,
    name: str,
    data: list | None = None,  # type: ignore[type-arg]
    warm: bool = True,
) -> Row:
    """``clients`` concurrent clients, each scoring ``per_client`` samples of ``data``
    (default: new ones) one per call, in turn; first one call outside the time unless
    ``warm`` is False (a window measured from outside, e.g. a profile, is warm already)."""
    from align2.client import AsyncCurationClient

    data = data or samples(clients * per_client)
    latencies: list[float] = []
    scores = [0.0] * (clients * per_client)
    async with AsyncCurationClient(target, timeout=600) as client:
        if warm:
            await client.score(data[:1], heads=["question"])  # connect + warm the path

        async def worker(k: int) -> None:
            for j in range(per_client):
                t0 = time.perf_counter()
                i = k * per_client + j
                [result] = await client.score([data[i]], heads=["question"])
                assert result.error is None, result.error
                latencies.append(time.perf_counter() - t0)
                scores[i] = float(result.question_score)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        seconds = time.perf_counter() - started
    return Row(name, clients * per_client, seconds, latencies, scores)


def service(
    path: pathlib.Path,
    max_batch_size: int,
    runs: list[tuple[int, int]],
    folder: pathlib.Path,
    threads: Threads,
) -> list[Row]:
    server = start_server(path, max_batch_size, folder, threads)
    rows = []
    try:
        for clients, per_client in runs:
            name = f"service, max_batch_size {max_batch_size}, {clients} clients"
            rows.append(asyncio.run(load(server.target, clients, per_client, name)))
            print("  " + rows[-1].line(), flush=True)
    finally:
        server.stop()
    return rows


def one_client(direct: Direct, target: str, pairs: int) -> tuple[Row, Row]:
    """One direct call, then the same sample through the idle service, ``pairs`` times:
    interleaved, so that both see the same machine state."""
    from align2.client import CurationClient

    data = samples(pairs)
    direct_lat, service_lat = [], []
    with CurationClient(target, timeout=600) as client:
        client.score(data[:1], heads=["question"])
        for sample in data:
            t0 = time.perf_counter()
            direct.run([sample])
            t1 = time.perf_counter()
            [result] = client.score([sample], heads=["question"])
            service_lat.append(time.perf_counter() - t1)
            direct_lat.append(t1 - t0)
            assert result.error is None, result.error
    return (
        Row("direct, one call at a time", pairs, sum(direct_lat), direct_lat),
        Row("service, 1 client", pairs, sum(service_lat), service_lat),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--single", type=int, default=20, help="one-client request pairs")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--size", choices=("38m", "tiny"), default="38m", help="the bench model or a tiny one"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="server.torch_threads (0: its default)"
    )
    parser.add_argument(
        "--preprocess-workers",
        type=int,
        default=0,
        help="batching.preprocess_workers (0: its default)",
    )
    parser.add_argument(
        "--wait-policy",
        default="",
        help="OMP_WAIT_POLICY of the server process ('unset': the runtime's default)",
    )
    parser.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE for the server process"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    threads = Threads(
        args.torch_threads, args.preprocess_workers, args.wait_policy, tuple(args.server_env)
    )
    with tempfile.TemporaryDirectory(prefix="align2-bench-") as tmp:
        folder = pathlib.Path(tmp)
        path = build_model(folder, args.size)
        n = args.clients * args.rounds
        print(
            f"model: {path.name}; {n} samples per measurement; {os.cpu_count()} CPUs; "
            f"server threads {threads}"
        )
        print("direct (decode + prepare + forward, in-process):")
        model = Direct(path)
        sweep = model.sweep(sizes, samples(n))
        a = max(sweep.values(), key=lambda r: r.throughput)
        best = int(a.name.rsplit(" ", 1)[1])
        print(f"service (separate process, gRPC over loopback), max_batch_size {best} = (a)'s:")
        runs = [(args.clients, args.rounds)]
        b = service(path, best, runs, folder, threads)[0]
        c = service(path, 1, runs, folder, threads)[0]
        print("one client, interleaved with direct calls:")
        server = start_server(path, best, folder, threads)
        try:
            d1, b1 = one_client(model, server.target, args.single)
        finally:
            server.stop()
    d = sweep[1]
    print("\nsummary")
    rows = (
        ("(a)", a),
        ("(b)", b),
        ("(c)", c),
        ("(d)", d),
        ("1 client: direct", d1),
        ("1 client: (b)", b1),
    )
    for label, row in rows:
        print(f"{label:<17} {row.line()}")
    gain_service, gain_model = b.throughput / c.throughput, a.throughput / d.throughput
    print(f"(b)/(a) = {b.throughput / a.throughput:.3f}   target >= 0.85")
    print(
        f"(b)/(c) = {gain_service:.3f} vs (a)/(d) = {gain_model:.3f}: kept "
        f"{gain_service / gain_model:.3f} of the model's batching gain   target >= 0.85"
    )
    print(
        f"one client: (b) p50 {b1.pct(0.5):.1f} ms vs a direct call p50 {d1.pct(0.5):.1f} ms: "
        f"+{b1.pct(0.5) - d1.pct(0.5):.1f} ms   target <= 3 ms"
    )
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({label: asdict(row) | {"throughput": row.throughput} for label, row in rows})
        )


if __name__ == "__main__":
    main()
