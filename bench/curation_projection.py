"""The whole-curation figure: each stage's rate through the service, projected onto the
paper's job (LLaVA-Instruct-158K curated to about 14k).

    python bench/curation_projection.py --data ../shared/data/align2llava-preference
        # this machine: `align2 serve` on its embedded default models, a separate process
    python bench/curation_projection.py --gpu --data ...
        # a CUDA machine: LLaVA-1.5-7B-shaped reward model and Vicuna-7B-shaped inner LLM,
        # random bf16 weights made on the device (bench/gpu_score.py, bench/gpu_align.py)
    python bench/curation_projection.py --gpu --tiny --data ...   # that path's CPU dry run

Stages, each measured on its own through align2's client over loopback gRPC, ``--clients``
concurrent callers of ``--per-call`` samples:
  question  Score, heads ["question"]: one pass per conversation;
  answer    Score, heads ["answer"]: one pass per turn;
  align     Align (rewrite question and answer, then review): per turn, two generations.
Texts are the human-scored conversations of the preference data (answer-dev.json, the
first candidate of each turn: 1-, 4- and 5-turn conversations); images are COCO-sized
(640x480) JPEGs made here, since the annotation images are not available offline.

The job (../shared/METHOD.md): complex_reasoning 77k conversations of one turn, conversation
58k of ``--conversation-turns`` turns, detail 23k of one turn; every conversation through the
question head, the kept 30% of each task type through the answer head, the kept 9% aligned.
LLaVA-Instruct's own turn count per conversation is not in the data here: the default, 4.5,
is the preference data's conversation block (25 groups of 4 turns, 25 of 5; STATS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align2.client import AsyncCurationClient, Sample, Turn

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from score import images  # COCO-sized (640x480) JPEGs, distinct content

TASKS = {
    "complex_reasoning": (77_000, 1.0),
    "conversation": (58_000, None),
    "detail": (23_000, 1.0),
}
KEEP = 0.3  # per stage, per task type


@dataclass(frozen=True)
class Stage:
    name: str
    unit: str
    count: float  # units in the paper's job
    rate: float  # units per second, measured

    @property
    def seconds(self) -> float:
        return self.count / self.rate


def job_counts(conversation_turns: float) -> dict[str, float]:
    """Units of each stage in the paper's job."""
    tasks = {k: (n, t or conversation_turns) for k, (n, t) in TASKS.items()}
    return {
        "question": sum(n for n, _ in tasks.values()),
        "answer": sum(int(KEEP * n) * t for n, t in tasks.values()),
        "align": sum(int(KEEP * int(KEEP * n)) * t for n, t in tasks.values()),
    }


def conversations(data: pathlib.Path, count: int) -> list[Sample]:
    """``count`` conversations from answer-dev.json, the first candidate answer of each turn
    (its records carry human scores, which the LLaVA reader refuses). The file lists its
    1-turn records first: taken with a stride of 7 (prime to its 112 records), any 16 or
    more in a row mix 1-, 4- and 5-turn conversations about as the file does (70/23/19).
    Each conversation has its own image: with one image reused, conversations would share
    the image's prefix in a batch (models.NAME.share_prefixes) as the paper's data, about
    two conversations per COCO image spread over the whole set, mostly would not."""
    records = json.loads((data / "answer-dev.json").read_text())
    pictures = images(count)
    out = []
    for i in range(count):
        record = records[(7 * i) % len(records)]
        talk = record["conversations"]
        turns = [
            Turn(h["value"], g["value"][0]) for h, g in zip(talk[::2], talk[1::2], strict=True)
        ]
        out.append(Sample(id=f"{record['id']}-{i}", image=pictures[i], turns=turns))
    return out


async def measure(
    target: str,
    samples: Sequence[Sample],
    call: Callable[[AsyncCurationClient, list[Sample]], Any],
    clients: int,
    per_call: int,
) -> tuple[float, list[Any]]:
    """Seconds for ``clients`` callers to send ``samples`` in calls of ``per_call``, and
    the results in the order of ``samples``."""
    chunks = [list(samples[i : i + per_call]) for i in range(0, len(samples), per_call)]
    replies: list[list[Any]] = [[] for _ in chunks]
    async with AsyncCurationClient(target, timeout=3600) as client:
        await call(client, chunks[0][:1])  # connect, warm the path
        pending = iter(range(len(chunks)))

        async def worker() -> None:
            for index in pending:
                results = await call(client, chunks[index])
                failed = [r.error for r in results if r.error is not None]
                if failed:
                    raise RuntimeError(f"{len(failed)} failed: {failed[0]}")
                replies[index] = list(results)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return seconds, [r for reply in replies for r in reply]


def rates(target: str, data: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    """Units per second of each stage."""
    scored = conversations(data, args.conversations)
    aligned = conversations(data, args.align_conversations)

    def question(client: AsyncCurationClient, chunk: list[Sample]) -> Any:
        return client.score(chunk, heads=["question"])

    def answer(client: AsyncCurationClient, chunk: list[Sample]) -> Any:
        return client.score(chunk, heads=["answer"])

    def align(client: AsyncCurationClient, chunk: list[Sample]) -> Any:
        return client.align(chunk, max_new_tokens=args.new_tokens, temperature=0.0)

    out = {}
    for name, samples, call, units in (
        ("question", scored, question, len(scored)),
        ("answer", scored, answer, sum(len(s.turns) for s in scored)),
        ("align", aligned, align, sum(len(s.turns) for s in aligned)),
    ):
        seconds, _ = asyncio.run(measure(target, samples, call, args.clients, args.per_call))
        out[name] = units / seconds
        print(f"  {name:<9} {units:6d} units in {seconds:8.1f} s: {out[name]:9.2f} /s", flush=True)
    return out


def report(measured: dict[str, float], conversation_turns: float, device: str) -> None:
    counts = job_counts(conversation_turns)
    units = {"question": "conversations", "answer": "turns", "align": "turns (2 generations)"}
    stages = [Stage(k, units[k], counts[k], measured[k]) for k in ("question", "answer", "align")]
    total = sum(s.seconds for s in stages)
    print(f"\nprojection of the paper's job on {device} (conversation turns {conversation_turns}):")
    print(f"{'stage':<9} {'units':>9} {'':<22} {'rate /s':>9} {'hours':>8} {'share':>6}")
    for s in stages:
        print(
            f"{s.name:<9} {s.count:9.0f} {s.unit:<22} {s.rate:9.2f} {s.seconds / 3600:8.2f} "
            f"{s.seconds / total:6.1%}"
        )
    print(f"{'total':<9} {'':>9} {'':<22} {'':>9} {total / 3600:8.2f}  (goal: under 1 GPU-hour)")


# -- the servers ------------------------------------------------------------------------
def embedded_server(folder: pathlib.Path, continuous_rows: int):  # -> ServerProcess
    """`align2 serve` on its defaults (the embedded models), port 0, no metrics port;
    ``continuous_rows`` > 0: the inner LLM batched continuously."""
    from align2.server.config import Config
    from align2.server.testing import ServerProcess

    config = folder / "projection.toml"
    text = '[server]\nport = 0\nmetrics_port = -1\nlog_level = "WARNING"\n'
    if continuous_rows:  # [models] replaces the default models: all three, as they are
        for name, model in Config().models.items():
            text += f'[models.{name}]\npath = "{model.path}"\n'
            if model.adapter:
                text += f'adapter = "{model.adapter}"\nvision_tower = "{model.vision_tower}"\n'
                text += f"share_base = {str(model.share_base).lower()}\n"
            if name == "llm":
                text += f"continuous_rows = {continuous_rows}\n"
    config.write_text(text)
    args = ["--config", str(config), "--log-level", "INFO"]  # INFO: the ready line
    return ServerProcess(args, folder / "server.log").start(timeout=900)


def gpu_server(
    tiny: bool, folder: pathlib.Path, continuous_rows: int, new_tokens: int
):  # -> (ServerThread, name)
    """The 7B-shaped reward model and inner LLM, in-process (random weights, on the device)."""
    import gpu_align
    import gpu_score
    import gpu_shapes
    import torch

    from align2.server import backends
    from align2.server.config import ModelConfig
    from align2.server.testing import ServerThread

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    scorer = gpu_score.build_backend(tiny, folder, device)
    tokenizer, model = gpu_align.build_model(tiny, device)
    llm = gpu_align.make_backend(tokenizer, model, device, tiny, continuous_rows)
    registry = backends.Registry().adding(
        scoring={"projection-rm": lambda name, config, path: scorer},
        generation={gpu_align.BACKEND_NAME: lambda name, config, path: llm},
    )
    heads = {
        n: ModelConfig(path=str(folder), backend="projection-rm") for n in ("question", "answer")
    }
    config = gpu_shapes.server_config(heads | gpu_align.llm_models(), max_batch_size=32)
    gpu_align.enable_align(config, new_tokens)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    return ServerThread(config, registry).start(), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--data", type=pathlib.Path, default=os.environ.get("ALIGN2_PREFERENCE_DATA"))
    add("--gpu", action="store_true", help="7B-shaped random models (see the docstring)")
    add("--tiny", action="store_true", help="with --gpu: tiny shapes on CPU (a dry run)")
    add("--conversations", type=int, default=64, help="conversations scored per head")
    add("--align-conversations", type=int, default=8, help="conversations aligned")
    add("--new-tokens", type=int, default=256, help="max_new_tokens of each generation")
    add("--clients", type=int, default=16)
    add("--per-call", type=int, default=4, help="samples per call")
    add("--conversation-turns", type=float, default=4.5)
    add("--continuous-rows", type=int, default=0, help="models.llm.continuous_rows")
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data (or ALIGN2_PREFERENCE_DATA): the preference data folder")
    with tempfile.TemporaryDirectory(prefix="align2-projection-") as tmp:
        folder = pathlib.Path(tmp)
        if args.gpu:
            server, device = gpu_server(args.tiny, folder, args.continuous_rows, args.new_tokens)
        else:
            server = embedded_server(folder, args.continuous_rows)
            device = f"this machine ({os.cpu_count()} CPUs)"
        print(f"device: {device}; server at {server.target}")
        try:
            measured = rates(server.target, args.data, args)
        finally:
            server.stop()
    report(measured, args.conversation_turns, device)


if __name__ == "__main__":
    main()
