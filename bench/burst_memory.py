"""Server memory through bursts of large-image Score calls or Curate streams
(docs/operating.md, "Memory").

Starts ``python -m align2.server`` on loopback with a tiny reward model (built offline), then
runs ``--rounds`` rounds of ``--calls`` concurrent Score calls, each of ``--samples`` samples
with a ``--image-mb`` MB incompressible PNG (8 x 6 MB = 48 MB per call by default, as in
issue 13), through align2.client without retries. The server's RSS (psutil) is sampled
every 20 ms: before the first round (warm, idle), its peak during each round, after each
round, and for ``--idle`` seconds after the last one. Prints one line per phase and a JSON
summary. ``--curate``: each call is a Curate stream of the same samples instead (decided at
once, ``min_window`` 1), whose samples the server holds from reading to decision.

The queue admits ``--queue-items`` forward passes (default 80: five calls of 8 samples x 2
heads), so the server without a byte budget admits as many calls as the one with
``limits.max_inflight_bytes`` 256 MiB (five of 48 MB): the comparison is about what the
refused calls cost. ``--set SECTION.KEY=VALUE`` sets a config key (none: the defaults, so
the script also runs against a server that predates a key); ``--env KEY=VALUE`` passes
glibc malloc tunables to the server.

    python bench/burst_memory.py                                  # rounds 7, calls 20
    python bench/burst_memory.py --set limits.max_inflight_bytes=0  # byte budget off
    python bench/burst_memory.py --set server.trim_idle_seconds=-1  # no malloc_trim
    python bench/burst_memory.py --env MALLOC_ARENA_MAX=2
    python bench/burst_memory.py --curate --rounds 3 --calls 8 --samples 16 --image-mb 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import random
import statistics
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import psutil
from PIL import Image

from align2.client import AsyncCurationClient, Sample, Turn
from align2.server.testing import ServerProcess

MB = 1_000_000


class Sampler:
    """RSS of one process every ``interval`` seconds, on a thread; ``peak()`` since reset."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.rss())

    def reset(self) -> None:
        self._peak = self.rss()

    def peak(self) -> int:
        return max(self._peak, self.rss())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def noise_png(megabytes: float, seed: int) -> bytes:
    side = int((megabytes * MB / 3) ** 0.5)
    pixels = random.Random(seed).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def start_server(args: argparse.Namespace, folder: pathlib.Path) -> ServerProcess:
    from align2.server.models.builders import build_llava_reward

    model = folder / "tiny-llava"
    if not (model / "config.json").exists():
        build_llava_reward(model, image_size=56, patch_size=14)
    sections: dict[str, list[str]] = {
        "server": ["port = 0", "metrics_port = -1"],
        "batching": [f"max_queue_items = {args.queue_items}"],
    }
    for item in args.set:  # SECTION.KEY=VALUE, the value as TOML
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {value}")
    sections["models.question"] = [f'path = "{model}"']
    sections["models.answer"] = [f'path = "{model}"']
    config = folder / "burst.toml"
    config.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{line}\n" for line in lines)
            for name, lines in sections.items()
        )
    )
    env = dict(os.environ)
    env.update(dict(item.split("=", 1) for item in args.env))
    args_ = ["--config", str(config), "--log-level", "INFO"]
    return ServerProcess(args_, folder / "server.log", env=env).start(timeout=120)


async def burst(
    target: str, calls: list[list[Sample]], curate: bool = False
) -> tuple[int, int, int]:
    """One round: every call (or stream) at once; (ok, refused, other failures)."""
    async with AsyncCurationClient(target, retry=False, timeout=300) as client:

        async def stream(samples: list[Sample]) -> int:
            return len([r async for r in client.curate(samples, min_window=1)])

        outcomes = await asyncio.gather(
            *(stream(s) if curate else client.score(s) for s in calls), return_exceptions=True
        )
    refused = sum(
        isinstance(o, grpc.RpcError) and o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for o in outcomes
    )
    failed = sum(isinstance(o, BaseException) for o in outcomes) - refused
    return len(outcomes) - refused - failed, refused, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="concurrent calls per round")
    parser.add_argument("--samples", type=int, default=8, help="samples (images) per call")
    parser.add_argument("--image-mb", type=float, default=6.0)
    parser.add_argument("--queue-items", type=int, default=80)
    parser.add_argument(
        "--set", action="append", default=[], help="SECTION.KEY=VALUE (TOML) for the server"
    )
    parser.add_argument("--idle", type=float, default=10.0, help="seconds watched after")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--folder", help="model and logs (default: a temporary folder)")
    parser.add_argument("--curate", action="store_true", help="Curate streams, not Score calls")
    args = parser.parse_args()

    folder = pathlib.Path(args.folder or tempfile.mkdtemp(prefix="align2-burst-"))
    folder.mkdir(parents=True, exist_ok=True)
    images = [noise_png(args.image_mb, seed) for seed in range(args.samples)]
    samples = [
        Sample(id=f"s{i}", image=image, turns=[Turn("What is in the picture?", "Noise.")])
        for i, image in enumerate(images)
    ]
    call_mb = sum(len(i) for i in images) / MB
    kind = "Curate streams" if args.curate else "calls"
    print(f"{args.rounds} rounds x {args.calls} {kind} x {call_mb:.1f} MB; {args.set} {args.env}")
    server = start_server(args, folder)
    assert server.proc is not None
    sampler = Sampler(server.proc.pid)
    summary: dict[str, object] = {
        "call_mb": round(call_mb, 1),
        "curate": args.curate,
        "set": args.set,
        "env": args.env,
    }
    try:
        time.sleep(1.0)
        baseline = sampler.rss()
        print(f"baseline (warm, idle)  {baseline / MB:8.0f} MB")
        peaks, afters, counts = [], [], []
        for round_ in range(args.rounds):
            sampler.reset()
            counts.append(asyncio.run(burst(server.target, [samples] * args.calls, args.curate)))
            peaks.append(sampler.peak())
            afters.append(sampler.rss())
            ok, refused, failed = counts[-1]
            print(
                f"round {round_ + 1}: ok {ok:2d} refused {refused:2d} failed {failed}   "
                f"peak {peaks[-1] / MB:8.0f} MB   after {afters[-1] / MB:8.0f} MB"
            )
        idle = []
        started = time.monotonic()
        for wait in (1.0, args.idle):
            time.sleep(max(0.0, started + wait - time.monotonic()))
            idle.append(sampler.rss())
            print(f"idle {wait:4.0f} s after       {idle[-1] / MB:8.0f} MB")
        summary.update(
            baseline_mb=round(baseline / MB),
            peak_mb=round(max(peaks) / MB),
            median_round_peak_mb=round(statistics.median(peaks) / MB),
            after_last_round_mb=round(afters[-1] / MB),
            idle_mb=round(idle[-1] / MB),
            ok=sum(c[0] for c in counts),
            refused=sum(c[1] for c in counts),
            failed=sum(c[2] for c in counts),
        )
        print(json.dumps(summary))
    finally:
        sampler.close()
        server.stop()


if __name__ == "__main__":
    main()
