"""align2 against LitServe serving the same reward model through align2's own backend.

    pip install --no-deps litserve==0.2.19   # bench only; its dependencies are in the lock
    python bench/litserve_score.py [--size tiny|38m] [--clients 32] [--rounds 3]

The model (bench/score.py's tiny LLaVA or ~38M bench model) is served three ways, each
with 32 concurrent clients sending one sample per call over loopback, on the same CPUs:
  direct    in-process, the best batch size of a sweep (bench/score.py's "(a)");
  align2    `python -m align2.server`, gRPC, max_batch_size = direct's best batch, its
            default delay (batching.max_delay_ms 2) and thread budget;
  LitServe  a LitAPI whose decode_request runs align2's ``backend.prepare`` and whose
            predict runs ``backend.score`` on the batch (so the model code is the same),
            HTTP/JSON with the image base64-encoded, the same max_batch_size and a
            batch_timeout of 2 ms, one worker.
Every LitServe score is compared with align2's for the same sample (the same forward): the
run fails when they differ by more than 1e-4, else the largest difference is printed.
Prints samples/s and the ratios. One run: this machine is noisy, compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from score import Direct, Threads, build_model, load, samples, start_server

from align2.server.testing import ChildProcess, free_port, http_ok

SERVE_FLAG = "--serve-litserve"


# -- the LitServe side (runs in its own process) -----------------------------------------
try:  # bench only: `pip install --no-deps litserve==0.2.19`
    import litserve as ls
except ImportError:
    ls = None

if ls is not None:
    # At module level: LitServe starts its worker by spawning, which pickles the API.

    class RewardAPI(ls.LitAPI):  # type: ignore[misc]
        def __init__(self, path: str, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.path = path

        def setup(self, device: str) -> None:
            self.direct = Direct(pathlib.Path(self.path))  # the same backend and preparation

        def decode_request(self, request: dict) -> object:  # type: ignore[type-arg]
            return self.direct.prepare(request["text"], base64.b64decode(request["image"]))

        def predict(self, batch: list) -> list[float]:  # type: ignore[type-arg]
            return asyncio.run(self.direct.backend.score(batch))

        def encode_response(self, score: float) -> dict:  # type: ignore[type-arg]
            return {"score": score}


def serve_litserve(path: str, port: int, max_batch_size: int) -> None:
    # litserve 0.2.19 turns its MCP endpoint on when `mcp` is installed (vLLM brings it) but
    # defines it only when `fastmcp` is: off, as it is without mcp.
    import litserve.server

    litserve.server._MCP_AVAILABLE = False
    api = RewardAPI(path, max_batch_size=max_batch_size, batch_timeout=0.002)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600)
    server.run(port=port, generate_client_file=False)


# -- the bench --------------------------------------------------------------------------
def start_litserve(
    path: pathlib.Path, max_batch_size: int, log: pathlib.Path
) -> tuple[ChildProcess, int]:
    port = free_port()
    command = [sys.executable, __file__, SERVE_FLAG, str(path), str(port), str(max_batch_size)]
    server = ChildProcess(command, log).start()
    server.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 300, "LitServe")
    return server, port


async def drive_litserve(port: int, data: list, clients: int) -> tuple[float, list[float]]:  # type: ignore[type-arg]
    import aiohttp

    from align2.server.core import templates

    bodies = [
        {"image": base64.b64encode(s.image).decode(), "text": templates.question_text(s.turns)}
        for s in data
    ]
    scores: list[float] = [0.0] * len(data)
    url = f"http://127.0.0.1:{port}/predict"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, json=bodies[0]) as r:  # warm
            r.raise_for_status()
        pending = iter(range(len(data)))

        async def worker() -> None:
            for i in pending:
                async with session.post(url, json=bodies[i]) as r:
                    r.raise_for_status()
                    scores[i] = float((await r.json())["score"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, scores


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == SERVE_FLAG:
        serve_litserve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("38m", "tiny"), default="tiny")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    args = parser.parse_args()
    if ls is None:
        raise SystemExit("pip install --no-deps litserve==0.2.19 (bench only)")
    n = args.clients * args.rounds
    with tempfile.TemporaryDirectory(prefix="align2-litserve-") as tmp:
        folder = pathlib.Path(tmp)
        path = build_model(folder, args.size)
        print(
            f"model {path.name}; {n} samples per measurement; {os.cpu_count()} CPUs; "
            f"litserve {ls.__version__}"
        )
        data = samples(n)  # the same samples (images made once) for all three
        sweep = Direct(path).sweep([int(b) for b in args.batch_sizes.split(",")], data)
        direct = max(sweep.values(), key=lambda r: r.throughput)
        best = int(direct.name.rsplit(" ", 1)[1])
        server = start_server(path, best, folder, Threads())
        try:
            ours = asyncio.run(load(server.target, args.clients, args.rounds, "align2", data))
        finally:
            server.stop()
        litserve, port = start_litserve(path, best, folder / "litserve.log")
        try:
            seconds, theirs = asyncio.run(drive_litserve(port, data, args.clients))
        finally:
            litserve.stop(grace=30)  # with its worker processes
    worst = max(abs(a - b) for a, b in zip(theirs, ours.scores, strict=True))
    if worst > 1e-4:
        raise SystemExit(f"LitServe and align2 scores differ by {worst:.1e} (> 1e-4)")
    lit = n / seconds
    print(f"\ndirect best (batch {best})  {direct.throughput:8.2f} samples/s")
    print(f"align2 (gRPC)           {ours.throughput:8.2f} samples/s")
    print(f"LitServe (HTTP)         {lit:8.2f} samples/s")
    print(
        f"align2/direct {ours.throughput / direct.throughput:.3f}   LitServe/direct "
        f"{lit / direct.throughput:.3f}   align2/LitServe {ours.throughput / lit:.3f}   "
        f"largest score difference {worst:.1e}"
    )


if __name__ == "__main__":
    main()
