"""Answer-stage time with and without shared prefixes (`models.NAME.share_prefixes`).

The bench model of bench/score.py (LLaVA-1.5-shaped, ~38M parameters, CLIP at 336 px: 576
image tokens) serves as the answer head of a real server (`python -m align2.server`, a
separate process); align2's client sends conversations of three shapes, heads ["answer"]:
  1 turn           one input per conversation: nothing to share within it;
  4 turns          the turns share BOS, the image and "\\nQuestion: ";
  4 turns x 5      candidate answers per turn (Score with candidates): 20 inputs, the
                   candidates of a turn also share their question.
Each shape is timed on a server with sharing on and on one with it off; the run fails when
their scores differ by more than 1e-4 (relative), else prints the largest difference; the
ratio off/on is the gain. One run; the machine is noisy.

    python bench/prefix_sharing.py [--conversations 12] [--size 38m|tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from curation_projection import measure
from score import Threads, build_model, images, largest_difference, start_server

from align2.client import AsyncCurationClient, Sample, Turn

SHAPES = {"1 turn": (1, 0), "4 turns": (4, 0), "4 turns x 5 candidates": (4, 5)}
QUESTIONS = [
    "What is the man on the left holding in his hand?",
    "Why might the street be so crowded at this time of day?",
    "What colour is the bus parked next to the sidewalk?",
    "What could happen next in this scene?",
]
ANSWERS = [
    "He is holding a red umbrella, probably because rain is expected later.",
    "The street is crowded because it is rush hour and people are heading home from work.",
    "The bus is white with a blue stripe along its side.",
    "The pedestrians will likely cross once the traffic light turns green.",
    "A cyclist may weave through the stopped cars to reach the intersection first.",
]


def conversations(count: int, turns: int, candidates: int) -> list[Sample]:
    pictures = images(count)
    out = []
    for i in range(count):
        rows = []
        for t in range(turns):
            question = QUESTIONS[(i + t) % len(QUESTIONS)]
            if candidates:
                options = [ANSWERS[(i + t + c) % len(ANSWERS)] for c in range(candidates)]
                rows.append(Turn(question, candidates=options))
            else:
                rows.append(Turn(question, ANSWERS[(i + t) % len(ANSWERS)]))
        out.append(Sample(id=str(i), image=pictures[i], turns=rows))
    return out


def run(target: str, samples: list[Sample], per_call: int) -> tuple[float, list[list[float]]]:
    """Seconds to score ``samples`` under the answer head, every call of ``per_call`` at
    once, and each sample's scores (every candidate's, or each turn's)."""

    def call(client: AsyncCurationClient, chunk: list[Sample]) -> Any:
        return client.score(chunk, heads=["answer"])

    calls = -(-len(samples) // per_call)  # one client per call: all in flight together
    seconds, results = asyncio.run(measure(target, samples, call, calls, per_call))
    scores = [
        [v for c in r.answer_candidates for v in c.scores] or list(r.answer_scores) for r in results
    ]
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--per-call", type=int, default=2, help="conversations per call")
    parser.add_argument("--size", choices=("38m", "tiny"), default="38m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="align2-prefix-") as tmp:
        folder = pathlib.Path(tmp)
        path = build_model(folder, args.size)
        times: dict[tuple[str, bool], float] = {}
        scores: dict[tuple[str, bool], list[list[float]]] = {}
        # Made once: Image.effect_noise draws from C rand(), so a second call differs.
        data = {
            shape: conversations(args.conversations, *shape_) for shape, shape_ in SHAPES.items()
        }
        for share in (False, True):
            server = start_server(
                path, 32, folder, Threads(), f"share-{share}", share_prefixes=share
            )
            try:
                for shape, (turns, candidates) in SHAPES.items():
                    seconds, got = run(server.target, data[shape], args.per_call)
                    times[shape, share], scores[shape, share] = seconds, got
                    inputs = args.conversations * turns * max(1, candidates)
                    print(
                        f"  sharing {'on ' if share else 'off'} {shape:<24} {inputs:4d} inputs "
                        f"{seconds:8.2f} s",
                        flush=True,
                    )
            finally:
                server.stop()
    print(f"\nanswer stage, {args.size} model, {args.conversations} conversations per shape:")
    for shape in SHAPES:
        off, on = times[shape, False], times[shape, True]
        worst = largest_difference(
            [v for x in scores[shape, True] for v in x],
            [v for y in scores[shape, False] for v in y],
            f"{shape}, with and without sharing",
        )
        print(
            f"{shape:<24} off {off:7.2f} s   on {on:7.2f} s   off/on {off / on:5.2f}x   "
            f"largest score difference {worst:.1e}"
        )


if __name__ == "__main__":
    main()
