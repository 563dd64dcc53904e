"""A burst of one-sample Score calls against a small queue, through the library client
(docs/operating.md, "Retries under load").

Starts ``python -m align2.server`` on loopback with a tiny reward model (built offline) and
``batching.max_queue_items`` ``--queue-items`` (16: eight one-turn samples, two forward
passes each), then sends ``--calls`` (200) concurrent one-sample Score calls through one
AsyncCurationClient with its default retry policy (gRPC's own retries), each with a
``--deadline`` (10 s). Prints how many calls completed within their deadline, how the
others failed, their latency, the attempts the server saw (``align2_requests_total`` of
Score by code, from /metrics) and its refused items (``align2_items_rejected_total``
{reason="overloaded"}). ``--bursts`` repeats the burst on the same client, one after the
other. ``--throttle MAX_TOKENS:RATIO`` (or ``off``) sets the client's retry throttling
(only with a client that has it); ``--torch-threads`` the server's ``server.torch_threads``
(0: torch's default).

    python bench/retry_burst.py --bursts 3
    python bench/retry_burst.py --bursts 3 --torch-threads 1
    # before: the same script against an older checkout
    PYTHONPATH=OLD/client:OLD/server python bench/retry_burst.py --bursts 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import pathlib
import re
import tempfile
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
from PIL import Image

from align2.client import AsyncCurationClient, Sample, Turn
from align2.server.testing import ServerProcess

_SERIES = re.compile(r"^(align2_\w+)\{([^}]*)\} (\S+)$", re.M)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """align2_requests_total{rpc="Score"} by code and align2_items_rejected_total by reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    found: dict[tuple[str, str], float] = collections.defaultdict(float)
    for name, labels, value in _SERIES.findall(text.decode()):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "align2_requests_total" and pairs.get("rpc") == "Score":
            found["requests", pairs["code"]] += float(value)
        elif name == "align2_items_rejected_total":
            found["rejected", pairs["reason"]] += float(value)
    return found


def start_server(args: argparse.Namespace, folder: pathlib.Path) -> ServerProcess:
    from align2.server.models.builders import build_llava_reward

    model = folder / "tiny-llava"
    if not (model / "config.json").exists():
        build_llava_reward(model, image_size=56, patch_size=14)
    config = folder / "retry.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\nmetrics_port = 0\n'
        f"torch_threads = {args.torch_threads}\n"
        f"[batching]\nmax_queue_items = {args.queue_items}\n"
        f'[models.question]\npath = "{model}"\n[models.answer]\npath = "{model}"\n'
    )
    arguments = ["--config", str(config), "--log-level", "INFO"]  # the ready line is INFO
    return ServerProcess(arguments, folder / "server.log").start(timeout=120)


def client_options(throttle: str | None) -> dict[str, object]:
    if throttle is None:
        return {}
    from align2.client import RetryPolicy

    if throttle == "off":
        return {"retry": RetryPolicy(throttle_max_tokens=0)}
    tokens, ratio = throttle.split(":")
    return {
        "retry": RetryPolicy(throttle_max_tokens=int(tokens), throttle_token_ratio=float(ratio))
    }


async def burst(client: AsyncCurationClient, calls: int, deadline: float) -> dict[str, object]:
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 130, 140)).save(image, format="PNG")
    sample = Sample(id="s", image=image.getvalue(), turns=[Turn("What is it?", "A grey box.")])

    details: dict[str, str] = {}

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        try:
            [result] = await client.score([sample], timeout=deadline)
            code = "OK" if result.error is None else f"item {result.error.code}"
        except grpc.RpcError as error:
            code = error.code().name
            details.setdefault(code, error.details())
        return code, time.monotonic() - started

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one() for _ in range(calls)))
    wall = time.monotonic() - started
    codes = collections.Counter(code for code, _ in outcomes)
    ok = sorted(seconds for code, seconds in outcomes if code == "OK")
    failed = sorted(seconds for code, seconds in outcomes if code != "OK")

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None

    return {
        "codes": dict(codes),
        "details": details,
        "wall_s": round(wall, 2),
        "ok_p50_s": pct(ok, 0.5),
        "ok_max_s": pct(ok, 1.0),
        "failed_min_s": pct(failed, 0.0),
        "failed_max_s": pct(failed, 1.0),
    }


async def run(args: argparse.Namespace, target: str, metrics_port: int) -> None:
    async with AsyncCurationClient(target, **client_options(args.throttle)) as client:  # type: ignore[arg-type]
        await client.server_info()  # connect first: the burst measures the server, not the dial
        for number in range(args.bursts):
            before = scrape(metrics_port)
            result = await burst(client, args.calls, args.deadline)
            after = scrape(metrics_port)
            delta = {f"{k[0]}_{k[1]}": after[k] - before.get(k, 0.0) for k in after}
            attempts = sum(v for k, v in delta.items() if k.startswith("requests_"))
            result.update(
                burst=number + 1,
                server_attempts=int(attempts),
                server_refused_calls=int(delta.get("requests_RESOURCE_EXHAUSTED", 0)),
                server_refused_items=int(delta.get("rejected_overloaded", 0)),
            )
            print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--queue-items", type=int, default=16)
    parser.add_argument("--bursts", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=0, help="server.torch_threads")
    parser.add_argument("--throttle", help="MAX_TOKENS:RATIO or off (default: the client's)")
    parser.add_argument("--folder", help="model and logs (default: a temporary folder)")
    args = parser.parse_args()
    folder = pathlib.Path(args.folder or tempfile.mkdtemp(prefix="align2-retry-"))
    folder.mkdir(parents=True, exist_ok=True)
    server = start_server(args, folder)
    assert server.metrics_port is not None
    try:
        print(
            f"{args.calls} concurrent one-sample Score calls, deadline {args.deadline} s, "
            f"queue {args.queue_items} items, throttle {args.throttle or 'default'}"
        )
        asyncio.run(run(args, server.target, server.metrics_port))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
