"""Online Curate selection against the method's exact selection (`make bench-select`).

A shuffled stream of synthetic scored samples (LLaVA-Instruct's three task types in their
77:58:23 proportions; per task type a question score from a two-component normal mixture
and a mean answer score correlated with it, fixed seeds) goes through the real Curate core
(align2.server.core.curation.Curator) with a scripted scorer that answers after a random
number of event-loop turns, so that decisions overlap as on a server (64 samples in flight
per stream, the default). No model runs. For each way of streaming:

  1 stream               one producer, the whole stream;
  8 streams, own         8 workers, samples dealt round-robin, each with its own windows
                         (no selection key: the behaviour before selection keys);
  8 streams, one key     the same 8 workers naming one selection key on one server;
  8 streams, 2 replicas  the 8 workers spread over two servers, one key (4 per replica);

and each warm-up:

  none        min_window 1 (decide at once; a task's first sample is kept);
  hold        min_window 100 (the default): decisions wait for 100 scores of their task;
  seed        the windows seeded with a calibration's scores (1,000 other samples);
  thresholds  the calibration's thresholds, no window;

it reports, against the exact selection on the same stream (per task type the top
int(0.3 N) by question score, then the top int(0.3 N1) of those by answer score):
recall (share of the exact kept set that the stream kept, the "overlap"), precision
(share of the stream's kept that the exact selection kept) and the kept fraction's
distance from the exact one, each as the mean (and worst) over --seeds data sets.

    python bench/online_selection.py [--samples 6000] [--seeds 10] [--calibration 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from align2.client.calibration import Calibration, calibrate
from align2.client.selection import select_task
from align2.client.types import Sample, Turn
from align2.server.config import CurateConfig, LimitsConfig
from align2.server.core.curation import Curated, CurateOptions, Curator, Decision
from align2.server.core.lifecycle import Lifecycle, Phase
from align2.server.core.scoring import Head, SampleScore, ScoreCall, ScoreOutcome

TASKS = {"complex_reasoning": 77, "conversation": 58, "detail": 23}  # thousands in LLaVA-158K
# Per task type: (weight, mean, sd) of the question score's two components, and the answer
# score's correlation with it. Reward scores are unbounded reals; the shapes differ per task.
MIXTURES = {
    "complex_reasoning": ([(0.7, 0.0, 1.0), (0.3, 1.5, 0.6)], 0.4),
    "conversation": ([(0.6, -0.5, 0.8), (0.4, 0.8, 1.2)], 0.3),
    "detail": ([(0.8, 1.0, 0.5), (0.2, -1.0, 1.5)], 0.5),
}
KEEP = 0.3
INFLIGHT = 64
WORKERS = 8


@dataclass(frozen=True)
class Scored:
    id: str
    task: str
    question: float
    answer: float


def draw(count: int, rng: random.Random, prefix: str) -> list[Scored]:
    """``count`` samples, task types in LLaVA's proportions, in a shuffled order."""
    tasks = rng.choices(list(TASKS), weights=list(TASKS.values()), k=count)
    samples = []
    for i, task in enumerate(tasks):
        components, rho = MIXTURES[task]
        _, mean, sd = rng.choices(components, weights=[c[0] for c in components])[0]
        z = rng.gauss(0, 1)
        question = mean + sd * z
        answer = 0.5 + rho * z + (1 - rho**2) ** 0.5 * rng.gauss(0, 0.8)
        samples.append(Scored(f"{prefix}{i}", task, question, answer))
    return samples


def exact_kept(samples: Sequence[Scored]) -> set[str]:
    """The method's selection on the whole stream (align2.client.selection)."""
    kept: set[str] = set()
    for task in TASKS:
        mine = [s for s in samples if s.task == task]
        answers = {i: [s.answer] for i, s in enumerate(mine)}
        selection = select_task([s.question for s in mine], answers, KEEP, KEEP)
        kept |= {mine[i].id for i in selection.answer_kept}
    return kept


def calibration_of(samples: Sequence[Scored]) -> Calibration:
    questions: dict[str, list[float]] = {}
    answers: dict[str, list[float | None]] = {}
    for s in samples:
        questions.setdefault(s.task, []).append(s.question)
        answers.setdefault(s.task, []).append(s.answer)
    return calibrate(questions, answers, KEEP, KEEP)


class ScriptedScorer:
    """Scores by sample id, each after 0-7 event-loop turns (seeded), so that samples in
    flight reach the selector out of order, as from batches on a server."""

    def __init__(self, samples: Sequence[Scored], seed: int) -> None:
        self._by_id = {s.id: s for s in samples}
        self._rng = random.Random(seed)

    async def score(self, call: ScoreCall) -> ScoreOutcome:
        [sample] = call.samples
        for _ in range(self._rng.randrange(8)):
            await asyncio.sleep(0)
        scored = self._by_id[sample.id]
        result = SampleScore(id=sample.id)
        if Head.QUESTION in call.heads:
            result.question_score = scored.question
        else:
            result.answer_scores = [scored.answer]
        return ScoreOutcome([result], None, None, "bench", 0.0, 0.0)


def curator(samples: Sequence[Scored], seed: int) -> Curator:
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.SERVING
    limits = LimitsConfig(max_stream_inflight=INFLIGHT)
    scorer = ScriptedScorer(samples, seed)
    return Curator(scorer, None, CurateConfig(), limits, lifecycle)  # type: ignore[arg-type]


async def produce(options: CurateOptions, samples: Sequence[Scored]) -> AsyncIterator[Any]:
    yield options
    for s in samples:
        await asyncio.sleep(0)  # a generator between samples: the workers interleave
        yield Sample(id=s.id, image=b"", task=s.task, turns=[Turn("q", "a")])


async def run_stream(
    server: Curator, options: CurateOptions, part: Sequence[Scored]
) -> list[Curated]:
    return [r async for r in server.stream(produce(options, part), None)]


WARM_UPS = ("none", "hold", "seed", "thresholds")
TOPOLOGIES = ("1 stream", "8 streams, own", "8 streams, one key", "8 streams, 2 replicas")


def options_for(warm_up: str, calibration: Calibration, key: str) -> CurateOptions:
    settings: dict[str, Any] = {"selection_key": key}
    if warm_up == "none":
        settings["min_window"] = 1
    elif warm_up == "hold":
        settings["min_window"] = 100
    elif warm_up == "seed":
        settings.update(calibration.seeds(), min_window=100)
    else:
        settings.update(calibration.thresholds())
    return CurateOptions(**settings)


async def online_kept(
    samples: Sequence[Scored], topology: str, warm_up: str, calibration: Calibration, seed: int
) -> set[str]:
    if topology == "1 stream":
        parts, servers, key = [list(samples)], [curator(samples, seed)], ""
    else:
        parts = [list(samples[w::WORKERS]) for w in range(WORKERS)]
        replicas = 2 if topology.endswith("replicas") else 1
        servers = [curator(samples, seed + r) for r in range(replicas)]
        key = "" if topology.endswith("own") else "pipeline"
    options = options_for(warm_up, calibration, key)
    runs = [run_stream(servers[w % len(servers)], options, part) for w, part in enumerate(parts)]
    decided = [r for results in await asyncio.gather(*runs) for r in results]
    assert len(decided) == len(samples) and all(r.error is None for r in decided)
    return {r.id for r in decided if r.decision is Decision.KEPT}


@dataclass
class Row:
    recall: list[float]
    precision: list[float]
    distance: list[float]  # |online kept fraction - exact kept fraction|, points

    def line(self, name: str) -> str:
        def cell(values: list[float], worst: float, scale: float = 100) -> str:
            return f"{statistics.fmean(values) * scale:5.1f} ({worst * scale:5.1f})"

        return (
            f"| {name} | {cell(self.recall, min(self.recall))} "
            f"| {cell(self.precision, min(self.precision))} "
            f"| {cell(self.distance, max(self.distance))} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = {(t, w): Row([], [], []) for t in TOPOLOGIES for w in WARM_UPS}
    started = time.perf_counter()
    exact_fractions = []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        samples = draw(args.samples, rng, "s")
        calibration = calibration_of(draw(args.calibration, rng, "c"))
        exact = exact_kept(samples)
        exact_fractions.append(len(exact) / len(samples))
        for (topology, warm_up), row in rows.items():
            kept = asyncio.run(online_kept(samples, topology, warm_up, calibration, seed))
            both = len(kept & exact)
            row.recall.append(both / len(exact))
            row.precision.append(both / len(kept) if kept else 0.0)
            row.distance.append(abs(len(kept) - len(exact)) / len(samples))
    print(
        f"{args.samples} samples x {args.seeds} seeds, calibration {args.calibration} samples, "
        f"exact kept fraction {statistics.fmean(exact_fractions):.4f} "
        f"({time.perf_counter() - started:.0f} s)\n"
    )
    print(
        "| streams, warm-up | recall % mean (worst) | precision % mean (worst) "
        "| kept-fraction distance, points, mean (worst) |"
    )
    print("| --- | --- | --- | --- |")
    for (topology, warm_up), row in rows.items():
        print(row.line(f"{topology}, {warm_up}"))


if __name__ == "__main__":
    main()
