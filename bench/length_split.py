"""Question and answer stages with and without length-aware batches
(`models.NAME.length_split_tokens`).

The bench model of bench/score.py (LLaVA-1.5-shaped, ~38M parameters, 576 image tokens)
serves both heads of a real server (`python -m align2.server`, a separate process). The
texts are the preference data's conversations (bench/curation_projection.py: 1-, 4- and
5-turn, first candidate per turn), each on its own COCO-sized image, so that a batch mixes
one-question and five-question inputs under the question head and short and long answers
under the answer head (its shared prefixes stay on). Each stage is timed on a server per
setting of ``--splits`` (0: one forward per batch); the run fails when scores differ from
the unsplit ones by more than 1e-4 (relative), and prints each setting's time over the
unsplit one. One run; the machine is noisy.

    python bench/length_split.py --data ../shared/data/align2llava-preference
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from curation_projection import conversations, measure
from score import Threads, build_model, largest_difference, start_server

from align2.client import AsyncCurationClient, Sample

HEADS = ("question", "answer")


def run(
    target: str, samples: list[Sample], head: str, clients: int, per_call: int
) -> tuple[float, list[float]]:
    """Seconds for ``clients`` callers to score ``samples`` under ``head``, and the scores."""

    def call(client: AsyncCurationClient, chunk: list[Sample]) -> Any:
        return client.score(chunk, heads=[head])

    seconds, results = asyncio.run(measure(target, samples, call, clients, per_call))
    if head == "question":
        return seconds, [float(r.question_score) for r in results]
    return seconds, [float(s) for r in results for s in r.answer_scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-call", type=int, default=2, help="conversations per call")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--splits", default="0,512,64", help="length_split_tokens values")
    parser.add_argument("--size", choices=("38m", "tiny"), default="38m")
    args = parser.parse_args()
    splits = [0, *(int(s) for s in args.splits.split(",") if int(s))]  # 0: the reference
    samples = conversations(args.data, args.conversations)  # made once (C rand in images)
    inputs = {"question": len(samples), "answer": sum(len(s.turns) for s in samples)}
    times: dict[tuple[str, int], float] = {}
    scores: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="align2-split-") as tmp:
        folder = pathlib.Path(tmp)
        path = build_model(folder, args.size)
        for split in splits:
            server = start_server(
                path,
                args.max_batch_size,
                folder,
                Threads(),
                f"split-{split}",
                length_split_tokens=split,
            )
            try:
                for head in HEADS:
                    seconds, got = run(server.target, samples, head, args.clients, args.per_call)
                    times[head, split], scores[head, split] = seconds, got
                    print(
                        f"  length_split_tokens {split:4d}  {head:<8} {inputs[head]:4d} inputs "
                        f"{seconds:8.2f} s",
                        flush=True,
                    )
            finally:
                server.stop()
    print(
        f"\n{args.size} model, {args.conversations} conversations, {args.clients} clients x "
        f"{args.per_call} per call, max_batch_size {args.max_batch_size}:"
    )
    for head in HEADS:
        for split in splits[1:]:
            worst = largest_difference(
                scores[head, split], scores[head, 0], f"{head}, split {split}"
            )
            base, now = times[head, 0], times[head, split]
            print(
                f"{head:<8} length_split_tokens {split:4d}: {now:7.2f} s vs {base:7.2f} s "
                f"unsplit, speed-up {base / now:5.2f}x, largest score difference {worst:.1e}"
            )


if __name__ == "__main__":
    main()
