"""The Curate stream core with a scripted scorer (scores by sample id, gated by events):
the in-flight bound, one decision per accepted sample, the two-stage selection, errors of
one sample, and stream-level failures that first answer what was accepted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from support import spin

from align2.client.types import Sample, Turn
from align2.server.config import CurateConfig, LimitsConfig
from align2.server.core import curation
from align2.server.core.align_types import (
    AlignCall,
    AlignedTurn,
    AlignOutcome,
    Kept,
    SampleAlignment,
)
from align2.server.core.budget import ByteBudget
from align2.server.core.curation import Curated, CurateOptions, Curator, Decision
from align2.server.core.lifecycle import Lifecycle, Phase
from align2.server.core.priority import Priority
from align2.server.core.scoring import (
    Head,
    SampleScore,
    ScoringSample,
    TurnCandidates,
)
from align2.server.errors import (
    Code,
    DeadlineExpired,
    InvalidArgument,
    Overloaded,
    Unavailable,
)


class ScriptedScorer:
    """question score = ``questions[id]``, answer scores = ``answers[id]``; a sample whose
    question score is None fails with a bad image. ``gate`` (when set) holds every call;
    the first ``refusals`` calls are refused at admission (queue full)."""

    def __init__(self, questions: dict[str, float | None], answers: dict[str, list[float]]):
        self.questions = questions
        self.answers = answers
        self.gate: asyncio.Event | None = None
        self.refusals = 0
        self.running = 0
        self.most_running = 0
        self.calls: list[tuple[str, Head]] = []

    def begin(self, sample: Sample, where: str) -> ScoringSample:
        return ScoringSample(sample, where, None, None, None, SampleScore(id=sample.id))

    async def score_sample(
        self, work: ScoringSample, head: Head, priority: Priority, deadline: float | None
    ) -> None:
        sample = work.sample
        if self.refusals:
            self.refusals -= 1
            raise Overloaded("samples: queue full (batching.max_queue_items 4)")
        self.calls.append((sample.id, head))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
        finally:
            self.running -= 1
        result = work.result
        if head is Head.QUESTION:
            score = self.questions[sample.id]
            if score is None:  # named as the real Scorer names it
                result.error = InvalidArgument(f"{work.where}.image: not an image (corrupt)")
            result.question_score = score
        else:
            result.answer_scores = self.answers.get(sample.id, [0.0])


def sample(i: int, task: str = "detail") -> Sample:
    return Sample(id=f"s{i}", image=b"", task=task, turns=[Turn("q?", "a.")])


def curator(
    scorer: ScriptedScorer,
    inflight: int = 4,
    lifecycle: Lifecycle | None = None,
    min_window: int = 1,
    budget: ByteBudget | None = None,
    **config: Any,
) -> Curator:
    """A Curator over ``scorer``. ``min_window`` 1 (decide each sample as its score comes,
    the first of a task kept) unless a test is about the warm-up: the stream mechanics
    tested here read more plainly with decisions made at once."""
    lifecycle = lifecycle or Lifecycle()
    lifecycle.phase = Phase.SERVING if lifecycle.phase is Phase.STARTING else lifecycle.phase
    limits = LimitsConfig(max_stream_inflight=inflight)
    settings = CurateConfig(window=100, min_window=min_window, **config)
    return Curator(scorer, None, settings, limits, lifecycle, budget)  # type: ignore[arg-type]


async def feed(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        await asyncio.sleep(0)
        yield item


async def collect(stream: AsyncIterator[Curated]) -> list[Curated]:
    return [c async for c in stream]


async def test_at_most_max_stream_inflight_samples_are_worked_on_at_once() -> None:
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(10)}, {})
    scorer.gate = asyncio.Event()
    task = asyncio.ensure_future(
        collect(curator(scorer, inflight=3).stream(feed(sample(i) for i in range(10)), None))
    )
    await spin()
    assert scorer.running == 3  # the rest wait (the reader holds at most one more)
    assert len(scorer.calls) == 3
    scorer.gate.set()
    results = await task
    assert sorted(r.id for r in results) == [f"s{i}" for i in range(10)]
    assert scorer.most_running == 3


def sized(i: int, nbytes: int, task: str = "detail") -> Sample:
    """A sample whose image and texts hold ``nbytes`` request bytes (as streams count them)."""
    texts = len(f"s{i}") + len(task) + len("q?") + len("a.") + 2 * curation._TEXT_OVERHEAD
    return Sample(id=f"s{i}", image=b"x" * (nbytes - texts), task=task, turns=[Turn("q?", "a.")])


async def test_stream_samples_share_the_request_bytes_budget_and_wait_for_room() -> None:
    """Across streams, the samples held at once fit limits.max_inflight_bytes: a sample that
    does not fit is not read until bytes are freed (no refusal), while a unary call is
    refused meanwhile. Fails on: streams bounded only by their slots (6 held at once)."""
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(6)}, {})
    scorer.gate = asyncio.Event()
    budget = ByteBudget(3000)
    curate = curator(scorer, inflight=4, budget=budget)
    streams = [
        asyncio.ensure_future(
            collect(curate.stream(feed(sized(i, 1000) for i in range(k, k + 3)), None))
        )
        for k in (0, 3)
    ]
    await spin()
    assert len(scorer.calls) == 3 and budget.in_flight == 3000  # three of six are read
    assert budget.waiting == 2  # one sample of each stream waits; neither is refused
    assert not budget.fits(1)  # a Score or Align call is refused while streams wait
    scorer.gate.set()
    decided = [r for stream in streams for r in await stream]
    assert sorted(r.id for r in decided) == [f"s{i}" for i in range(6)]
    assert all(r.error is None for r in decided)
    assert budget.in_flight == 0 and budget.waiting == 0


async def test_a_stream_waiting_for_bytes_decides_its_warm_up_instead_of_deadlocking() -> None:
    """With warm_up_idle_ms 0, held warm-up decisions are released only when the stream
    can read no more: waiting for request bytes is such a moment. Fails on: the stalled
    stream keeping its held samples, whose bytes it waits for (a deadlock)."""
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(4)}, {})
    budget = ByteBudget(2000)
    curate = curator(scorer, inflight=4, min_window=100, budget=budget, warm_up_idle_ms=0)
    stream = curate.stream(feed(sized(i, 1000) for i in range(4)), None)
    decided = await asyncio.wait_for(collect(stream), timeout=10)
    assert sorted(r.id for r in decided) == ["s0", "s1", "s2", "s3"]
    assert all(r.warm_up for r in decided[:2])  # decided before 100 scores: said so
    assert budget.in_flight == 0


async def test_each_decision_carries_its_samples_position_whatever_the_ids() -> None:
    scorer = ScriptedScorer({"dup": 1.0, "": 2.0}, {})
    scorer.gate = asyncio.Event()
    items = [
        CurateOptions(),
        *(Sample(id=i, image=b"", turns=[Turn("q?", "a.")]) for i in ["dup", "", "dup", ""]),
    ]
    task = asyncio.ensure_future(collect(curator(scorer, inflight=4).stream(feed(items), None)))
    await spin()
    scorer.gate.set()
    results = await task
    # The options message is not counted: samples are numbered 0..3 in the order they came.
    assert sorted((r.sequence, r.id) for r in results) == [
        (0, "dup"),
        (1, ""),
        (2, "dup"),
        (3, ""),
    ]


async def test_two_stages_per_task_and_answers_scored_only_when_questions_pass() -> None:
    questions = {"s0": 1.0, "s1": 5.0, "s2": 0.5, "s3": 9.0}
    answers = {"s0": [3.0], "s1": [1.0, 2.0], "s3": [0.0]}
    scorer = ScriptedScorer(questions, answers)
    options = CurateOptions(question_keep_fraction=0.5, answer_keep_fraction=0.5)
    items = [options, sample(0), sample(1), sample(2), sample(3, task="other")]
    results = {r.id: r for r in await collect(curator(scorer, 1).stream(feed(items), None))}
    # s0 first of "detail": kept at both stages (its own threshold).
    assert results["s0"].decision is Decision.KEPT
    assert (results["s0"].question_threshold, results["s0"].answer_threshold) == (1.0, 3.0)
    # s1: question 5 >= top half of {1, 5}; answer mean 1.5 below top half of {3, 1.5}.
    assert results["s1"].decision is Decision.DROPPED_ANSWER
    assert results["s1"].scores.answer_scores == [1.0, 2.0]
    assert results["s1"].answer_threshold == 3.0
    # s2: 0.5 is not in the top 2 of {1, 5, 0.5}: dropped, answers never scored.
    assert results["s2"].decision is Decision.DROPPED_QUESTION
    assert results["s2"].question_threshold == 1.0 and results["s2"].answer_threshold is None
    assert ("s2", Head.ANSWER) not in scorer.calls and results["s2"].scores.answer_scores == []
    # s3: another task starts its own window.
    assert results["s3"].decision is Decision.KEPT


async def test_a_failed_sample_is_a_decision_with_its_error_and_its_mates_go_on() -> None:
    scorer = ScriptedScorer({"s0": 1.0, "s1": None, "s2": 2.0}, {})
    results = {
        r.id: r
        for r in await collect(
            curator(scorer).stream(feed([sample(0), sample(1), sample(2)]), None)
        )
    }
    assert results["s1"].decision is Decision.ERROR
    assert results["s1"].error is not None and results["s1"].error.code is Code.INVALID_ARGUMENT
    assert results["s1"].error.message.startswith("sample.image: not an image")  # not samples[0]
    assert results["s0"].decision is Decision.KEPT and results["s2"].decision is Decision.KEPT


async def test_options_after_a_sample_fail_the_stream_after_answering_the_accepted() -> None:
    scorer = ScriptedScorer({"s0": 1.0, "s1": 2.0}, {})
    seen: list[str] = []
    stream = curator(scorer).stream(feed([sample(0), sample(1), CurateOptions()]), None)
    with pytest.raises(InvalidArgument, match="options: message 2 carries options"):
        async for result in stream:
            seen.append(result.id)
    assert sorted(seen) == ["s0", "s1"]


@pytest.mark.parametrize("fraction", [0.0, 1.5])
async def test_a_bad_fraction_names_the_option(fraction: float) -> None:
    scorer = ScriptedScorer({}, {})
    items = [CurateOptions(answer_keep_fraction=fraction), sample(0)]
    with pytest.raises(InvalidArgument, match=r"options.answer_keep_fraction: .* not in \(0, 1\]"):
        await collect(curator(scorer).stream(feed(items), None))


@pytest.mark.parametrize(
    ("phase", "message"),
    [(Phase.DRAINING, "shutting down"), (Phase.FAILED, "unrecoverable device error")],
)
async def test_a_stopping_server_ends_an_idle_stream_after_answering_what_it_took(
    phase: Phase, message: str
) -> None:
    """Draining, or failed on a device error: a stream waiting on a quiet producer ends
    UNAVAILABLE at once, so its client resumes on another replica."""
    lifecycle = Lifecycle()
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(5)}, {})
    more = asyncio.Event()  # never set: the producer goes quiet after two samples

    async def items() -> AsyncIterator[Sample]:
        yield sample(0)
        yield sample(1)
        await more.wait()
        yield sample(2)

    async def drain_soon() -> None:
        await spin(30)
        lifecycle.phase = phase

    seen: list[str] = []
    drain = asyncio.ensure_future(drain_soon())

    async def consume() -> None:
        async for result in curator(scorer, lifecycle=lifecycle).stream(items(), None):
            seen.append(result.id)

    with pytest.raises(Unavailable, match=message):
        await asyncio.wait_for(consume(), 10)  # not held open until a restart
    await drain
    assert sorted(seen) == ["s0", "s1"]


async def test_a_stopping_server_ends_a_stream_waiting_for_bytes_and_leaves_no_waiter() -> None:
    """A stream whose next sample waits for request bytes when the server starts draining
    answers what it took, ends UNAVAILABLE, and leaves no waiter or claim in the budget
    (else every later claim would queue behind it). Fails on: a waiter left behind."""
    lifecycle = Lifecycle()
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(3)}, {})
    scorer.gate = asyncio.Event()
    budget = ByteBudget(1000)
    stream = curator(scorer, lifecycle=lifecycle, budget=budget).stream(
        feed(sized(i, 1000) for i in range(3)), None
    )
    seen: list[str] = []

    async def consume() -> None:
        async for result in stream:
            seen.append(result.id)

    consuming = asyncio.ensure_future(consume())
    await spin()
    assert budget.waiting == 1  # s1 waits for s0's bytes
    lifecycle.phase = Phase.DRAINING
    await spin()
    assert budget.waiting == 0
    scorer.gate.set()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(consuming, 10)
    assert seen == ["s0"] and budget.in_flight == 0


async def test_a_slow_reader_of_decisions_holds_back_the_reading_of_samples() -> None:
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(10)}, {})
    pulled: list[int] = []

    async def items() -> AsyncIterator[Sample]:
        for i in range(10):
            pulled.append(i)
            yield sample(i)

    stream = curator(scorer, inflight=2).stream(items(), None)
    first = await stream.__anext__()
    await spin()  # decisions are ready, nobody reads them
    # Two slots: the first decision (handed over, slot not yet given back) and one more;
    # the reader may hold one more sample while it waits for a slot.
    assert {i for i, _ in scorer.calls} == {"s0", "s1"} and len(pulled) <= 3
    rest = [r async for r in stream]
    assert sorted([first.id] + [r.id for r in rest]) == sorted(f"s{i}" for i in range(10))


async def test_the_priority_of_a_stream_without_options_is_the_given_one() -> None:
    scorer = ScriptedScorer({"s0": 1.0}, {})
    priorities: list[Priority] = []
    original = scorer.score_sample

    async def spy(
        work: ScoringSample, head: Head, priority: Priority, deadline: float | None
    ) -> None:
        priorities.append(priority)
        await original(work, head, priority, deadline)

    scorer.score_sample = spy  # type: ignore[method-assign]
    stream = curator(scorer).stream(feed([sample(0)]), None, lambda: Priority.INTERACTIVE)
    await collect(stream)
    assert priorities and set(priorities) == {Priority.INTERACTIVE}


async def test_a_consumer_that_stops_cancels_the_work_in_flight() -> None:
    scorer = ScriptedScorer({f"s{i}": float(i) for i in range(4)}, {})
    scorer.gate = asyncio.Event()
    stream = curator(scorer, inflight=4).stream(feed(sample(i) for i in range(4)), None)
    task = asyncio.ensure_future(stream.__anext__())
    await spin()
    assert scorer.running == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await spin(10)
    assert scorer.running == 0


async def test_a_full_queue_is_waited_out_instead_of_failing_the_sample() -> None:
    scorer = ScriptedScorer({"s0": 1.0}, {})
    scorer.refusals = 3
    [result] = await collect(curator(scorer).stream(feed([sample(0)]), None))
    assert result.decision is Decision.KEPT and scorer.refusals == 0


async def test_past_the_deadline_a_full_queue_is_the_samples_error() -> None:
    scorer = ScriptedScorer({"s0": 1.0}, {})
    scorer.refusals = 1000
    deadline = time.monotonic() + 0.2
    [result] = await collect(curator(scorer).stream(feed([sample(0)]), deadline))
    assert result.decision is Decision.ERROR
    assert result.error is not None and result.error.code is Code.RESOURCE_EXHAUSTED
    assert time.monotonic() < deadline + 0.5


class FailingAligner:
    """Align settings pass; every alignment fails with a deadline on its sample."""

    def check(self, call: AlignCall) -> None:
        pass

    async def align(self, call: AlignCall) -> AlignOutcome:
        [sample] = call.samples
        where = call.sample_field.format(index=0)  # as the real Aligner names it
        error = DeadlineExpired(f"{where}.turns[0]: deadline passed before the rewrite")
        result = SampleAlignment(id=sample.id, error=error)
        return AlignOutcome([result], None, "t", "h", 0, 0, 0.0, 0.0)  # type: ignore[arg-type]


async def test_a_kept_sample_whose_alignment_fails_stays_kept_with_the_error() -> None:
    scorer = ScriptedScorer({"s0": 1.0}, {})
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.SERVING
    limits = LimitsConfig(max_stream_inflight=2)
    curate = Curator(scorer, FailingAligner(), CurateConfig(), limits, lifecycle)  # type: ignore[arg-type]
    items = [CurateOptions(align=AlignCall(samples=())), sample(0)]
    [result] = await collect(curate.stream(feed(items), None))
    assert result.decision is Decision.KEPT_ALIGN_FAILED and result.error is None
    assert result.aligned is not None and result.aligned.error is not None
    assert result.aligned.error.message.startswith("sample.turns[0]: deadline passed")


class RefusingAligner(FailingAligner):
    """Every Align call fails as a whole: the LLM queue stays full."""

    async def align(self, call: AlignCall) -> AlignOutcome:
        raise Overloaded("samples: model 'llm' is full (limits.max_llm_inflight)")


async def test_a_kept_sample_whose_align_call_fails_as_a_whole_stays_kept() -> None:
    scorer = ScriptedScorer({"s0": 1.0}, {})
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.SERVING
    limits = LimitsConfig(max_stream_inflight=2)
    curate = Curator(scorer, RefusingAligner(), CurateConfig(), limits, lifecycle)  # type: ignore[arg-type]
    items = [CurateOptions(align=AlignCall(samples=())), sample(0)]
    deadline = time.monotonic() + 0.05  # the queue stays full until the stream's deadline
    [result] = await collect(curate.stream(feed(items), deadline))
    assert result.decision is Decision.KEPT_ALIGN_FAILED and result.error is None
    assert result.aligned is not None and isinstance(result.aligned.error, Overloaded)
    assert result.scores.question_score == 1.0


class CandidateScorer(ScriptedScorer):
    """The answer head scores each answer by its length, each candidate alone; the sample's
    result is filled as the real Scorer fills it (best per turn, every candidate kept)."""

    async def score_sample(
        self, work: ScoringSample, head: Head, priority: Priority, deadline: float | None
    ) -> None:
        if head is Head.QUESTION:
            return await super().score_sample(work, head, priority, deadline)
        sample, result = work.sample, work.result
        for turn in sample.turns:
            scores = [float(len(a)) for a in turn.answers]
            candidates = TurnCandidates(scores, [False] * len(scores))
            result.candidates.append(candidates)
            result.answer_scores.append(scores[candidates.best])
            result.answer_truncated.append(False)
        if not sample.has_candidates:
            result.candidates = []
        return None


class RecordingAligner(FailingAligner):
    """Keeps every turn as it came (reason "unchanged") and records the samples it got."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    async def align(self, call: AlignCall) -> AlignOutcome:
        [sample] = call.samples
        self.samples.append(sample)
        turns = [AlignedTurn(t, t, Kept.ORIGINAL, "unchanged") for t in sample.turns]
        result = SampleAlignment(id=sample.id, turns=turns)
        return AlignOutcome([result], None, "t", "h", 0, 0, 0.0, 0.0)  # type: ignore[arg-type]


async def test_candidates_rank_by_their_best_and_the_kept_sample_is_the_best() -> None:
    """Best-of-n: a turn counts with its best candidate (here "yyyy", 4.0, not the mean
    2.33 of all three) in the selection, and a kept sample is aligned with that candidate
    as its answer."""
    scorer = CandidateScorer({"s0": 1.0, "s1": 1.0, "s2": 1.0}, {})
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.SERVING
    aligner = RecordingAligner()
    limits = LimitsConfig(max_stream_inflight=1)  # decisions in input order
    curate = Curator(scorer, aligner, CurateConfig(), limits, lifecycle)  # type: ignore[arg-type]
    options = CurateOptions(
        question_keep_fraction=1.0, answer_keep_fraction=0.5, align=AlignCall(samples=())
    )
    best_of_three = Turn("q?", candidates=("x", "yyyy", "zz"))
    items = [
        options,
        Sample(id="s0", image=b"", task="t", turns=[best_of_three, Turn("r?", "bb")]),  # 3.0
        Sample(id="s1", image=b"", task="t", turns=[Turn("q?", "ccc")]),  # 3.0: kept, tie
        Sample(id="s2", image=b"", task="t", turns=[Turn("q?", "dd")]),  # 2.0: dropped
    ]
    results = await collect(curate.stream(feed(items), None))
    assert [r.decision for r in results] == [Decision.KEPT, Decision.KEPT, Decision.DROPPED_ANSWER]
    # The 2nd highest of 3.0, 3.0, 2.0; with the mean of all candidates it would be 2.17.
    assert results[2].answer_threshold == 3.0
    first = results[0]
    assert first.scores.answer_scores == [4.0, 2.0] and first.scores.answer_score == 3.0
    assert [c.scores for c in first.scores.candidates] == [[1.0, 4.0, 2.0], [2.0]]
    assert first.scores.best_candidates == [1, 0]
    assert results[1].scores.candidates == []  # a sample without candidates: none reported
    assert aligner.samples[0].turns == [Turn("q?", "yyyy"), Turn("r?", "bb")]
    assert first.aligned is not None and first.aligned.turns[0].original == Turn("q?", "yyyy")


async def test_a_waited_out_refusal_counts_as_waited_and_the_last_one_as_overloaded() -> None:
    """Refusals a Curate sample waits out count as rejected "waited" (one per refusal);
    the one that ends its wait at the deadline, and fails it, counts as "overloaded"."""
    from align2.server import metrics
    from align2.server.core.curation import _when_admitted

    def rejected(reason: str) -> float:
        return metrics.REJECTED.labels(reason=reason)._value.get()

    tries = 0

    async def refused_twice_then_room() -> str:
        nonlocal tries
        tries += 1
        if tries <= 2:
            metrics.refused(3)
            raise Overloaded("full", retry_after=0.01)
        return "admitted"

    waited, overloaded = rejected("waited"), rejected("overloaded")
    assert await _when_admitted(refused_twice_then_room, None) == "admitted"
    assert (rejected("waited") - waited, rejected("overloaded") - overloaded) == (6, 0)

    async def always_refused() -> str:
        metrics.refused(1)
        raise Overloaded("full", retry_after=0.05)

    waited, overloaded = rejected("waited"), rejected("overloaded")
    with pytest.raises(Overloaded):
        await _when_admitted(always_refused, time.monotonic() + 0.3)
    assert rejected("overloaded") - overloaded == 1
    assert rejected("waited") - waited >= 1
    # Outside a wait, a refusal is the caller's: overloaded at once.
    metrics.refused(2)
    assert rejected("overloaded") - overloaded == 3

    async def part_refused_inside() -> str:  # a refusal the attempt turned into its result
        metrics.refused(4)
        return "one part failed"

    waited, overloaded = rejected("waited"), rejected("overloaded")
    assert await _when_admitted(part_refused_inside, None) == "one part failed"
    assert (rejected("waited") - waited, rejected("overloaded") - overloaded) == (0, 4)


def test_a_stream_sample_claims_its_texts_count_and_not_what_it_is_refused_for() -> None:
    """Empty texts are not free (each is an object the server holds), and a sample over
    the turn limit claims its image alone: its turns are refused unread. Fails on: the
    claim counting characters only (0 bytes for empty turns), or reading every turn."""
    limits = LimitsConfig(max_turns=64)
    empty = Sample(id="", image=b"x" * 10, turns=[Turn("", "")] * 64)
    assert curation._nbytes(empty, limits) == 10 + 64 * 2 * curation._TEXT_OVERHEAD
    over = Sample(id="", image=b"x" * 10, turns=[Turn("q" * 1000, "")] * 65)
    assert curation._nbytes(over, limits) == 10
