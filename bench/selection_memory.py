"""Server memory when clients fill Curate's selection windows with seed scores
(docs/operating.md, "Memory"; config curate.max_stored_scores).

Seeds are the cheap way to make a server store scores: one stream's options carry up to
``curate.max_seed_scores`` (100,000) of them, about 400 KB on the wire, and a selection key
keeps them for its idle TTL after the stream ends. This starts ``python -m align2.server``
on loopback with a tiny reward model (built offline), then sends ``--streams`` short
streams, ``--concurrency`` at a time, each naming one of ``--keys`` selection keys and
seeding ``--tasks`` new task types of it (both stages, ``curate.window`` scores each), with
no samples. The server's RSS (psutil, every 20 ms) is reported before, at its peak and
after, with how many streams were accepted and refused (RESOURCE_EXHAUSTED).

    python bench/selection_memory.py                                   # the default bound
    python bench/selection_memory.py --set curate.max_stored_scores=0  # unbounded
    python bench/selection_memory.py --keys 64 --streams 700 --expire 10  # RSS once expired
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import tempfile
import time

import grpc
from burst_memory import MB, Sampler, start_server

from align2.client import AsyncCurationClient


async def fill(target: str, args: argparse.Namespace, window: int) -> tuple[int, int, int]:
    """Every stream, ``args.concurrency`` at a time: (accepted, refused, other failures)."""
    rng = random.Random(0)
    seeds = [rng.random() for _ in range(window)]
    limit = asyncio.Semaphore(args.concurrency)
    tasks_per_key = args.max_task_types // args.tasks  # then the key's task types are full

    async with AsyncCurationClient(target, retry=False, timeout=300) as client:

        async def stream(i: int) -> None:
            key, first = divmod(i, tasks_per_key)
            tasks = {f"task{first * args.tasks + t}": seeds for t in range(args.tasks)}
            async with limit:
                call = client.curate(
                    [],
                    selection_key=f"key{key % args.keys}",
                    question_seed_scores=tasks,
                    answer_seed_scores=tasks,
                    resume=False,
                )
                _ = [r async for r in call]

        outcomes = await asyncio.gather(
            *(stream(i) for i in range(args.streams)), return_exceptions=True
        )
    refused = sum(
        isinstance(o, grpc.RpcError) and o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for o in outcomes
    )
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if len(failed) > refused:
        print(
            "first failure:",
            next(
                o
                for o in failed
                if not isinstance(o, grpc.RpcError)
                or o.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
            ),
        )
    return len(outcomes) - len(failed), refused, len(failed) - refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=16, help="selection keys filled")
    parser.add_argument("--tasks", type=int, default=5, help="task types seeded per stream")
    parser.add_argument("--max-task-types", type=int, default=256)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--streams", type=int, help="default: enough to fill every key")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--queue-items", type=int, default=80)
    parser.add_argument(
        "--set", action="append", default=[], help="SECTION.KEY=VALUE (TOML) for the server"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--folder", help="model and logs (default: a temporary folder)")
    parser.add_argument(
        "--expire",
        type=float,
        help="selection keys' idle TTL (s); also measure the RSS once they have expired",
    )
    args = parser.parse_args()
    if args.streams is None:
        args.streams = args.keys * (args.max_task_types // args.tasks)
    args.set = [
        f"curate.window={args.window}",
        f"curate.max_task_types={args.max_task_types}",
        f"curate.max_seed_scores={2 * args.tasks * args.window}",
        f"curate.max_selection_keys={args.keys}",
        *([f"curate.selection_key_idle_seconds={args.expire}"] if args.expire else []),
        *args.set,
    ]
    folder = pathlib.Path(args.folder or tempfile.mkdtemp(prefix="align2-selection-"))
    folder.mkdir(parents=True, exist_ok=True)
    scores = args.streams * 2 * args.tasks * args.window
    print(
        f"{args.streams} streams x {2 * args.tasks * args.window} seed scores "
        f"({scores / 1e6:.1f} M scores, {16 * scores / MB:.0f} MB at 16 B) over "
        f"{args.keys} keys; {args.set}"
    )
    server = start_server(args, folder)
    assert server.proc is not None
    sampler = Sampler(server.proc.pid)
    try:
        time.sleep(1.0)
        baseline = sampler.rss()
        sampler.reset()
        started = time.monotonic()
        accepted, refused, failed = asyncio.run(fill(server.target, args, args.window))
        seconds = time.monotonic() - started
        peak, after = sampler.peak(), sampler.rss()
        summary = {
            "set": args.set,
            "streams": args.streams,
            "accepted": accepted,
            "refused": refused,
            "failed": failed,
            "seconds": round(seconds, 1),
            "baseline_mb": round(baseline / MB),
            "peak_mb": round(peak / MB),
            "after_mb": round(after / MB),
            "growth_mb": round((after - baseline) / MB),
        }
        if args.expire:
            time.sleep(args.expire + 5.0)  # the keys expire, then the heap trim's idle second
            summary["expired_mb"] = round(sampler.rss() / MB)
        print(json.dumps(summary))
    finally:
        sampler.close()
        server.stop()


if __name__ == "__main__":
    main()
