"""The Align core with a scripted LLM (llm_fakes.FakeLLM): guards, review, admission,
deadlines, cancellation and per-item errors, on the batched and the continuous path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from llm_fakes import MARK, FakeLLM, restyle
from support import spin

from align2.client.types import Sample, Turn
from align2.server.backends.base import ChoiceRequest, Decoding, GenerationRequest
from align2.server.config import AlignConfig, BatchingConfig, LimitsConfig
from align2.server.core.align_types import AlignCall, AlignOutcome, DecodingOptions, Kept, Parts
from align2.server.core.alignment import Aligner
from align2.server.core.llm import GenerationRuntime
from align2.server.core.priority import Priority
from align2.server.core.prompts import TemplateLibrary
from align2.server.errors import (
    OVERLOADED_RETRY_SECONDS,
    Code,
    DeadlineExpired,
    InvalidArgument,
    NotFound,
    NoTurnBeforeDeadline,
    Overloaded,
)

TEMPLATES = TemplateLibrary()


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(params=[False, True], ids=["batched", "continuous"])
def continuous(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@contextlib.asynccontextmanager
async def started(
    llm: FakeLLM, pool: ThreadPoolExecutor, **config: object
) -> AsyncIterator[tuple[Aligner, GenerationRuntime]]:
    align = AlignConfig(**{"max_inflight_items": 64, **config})  # type: ignore[arg-type]
    runtime = GenerationRuntime(
        llm, BatchingConfig(max_delay_ms=5), max_inflight=align.max_inflight_items
    )
    runtime.start()
    aligner = Aligner({"llm": runtime}, TEMPLATES, align, LimitsConfig(max_turns=4), pool)
    try:
        yield aligner, runtime
    finally:
        await runtime.close()


def sample(i: int = 0, *turns: Turn) -> Sample:
    return Sample(
        id=f"s{i}",
        image=b"",
        turns=list(turns) or [Turn("What is the dog doing?", "The dog is running on grass.")],
    )


async def run(
    llm: FakeLLM, pool: ThreadPoolExecutor, call: AlignCall, **config: object
) -> AlignOutcome:
    async with started(llm, pool, **config) as (aligner, _):
        return await aligner.align(call)


async def test_review_keeps_preferred_rewrite_and_records_both_orders_margin(
    pool: ThreadPoolExecutor, continuous: bool
) -> None:
    # Shown first, a version gets +0.2: the forward order alone would reject the rewrite.
    llm = FakeLLM(prefer=0.55, bias=0.2, continuous=continuous)
    outcome = await run(llm, pool, AlignCall([sample()]))
    [turn] = outcome.results[0].turns
    assert turn.kept is Kept.REWRITE and turn.reason == "review"
    assert turn.margin == pytest.approx(2 * 0.55 - 1)
    assert turn.rewrite == Turn(
        restyle("What is the dog doing?"), restyle("The dog is running on grass.")
    )
    assert turn.original == sample().turns[0]
    llm.prefer = 0.3
    [turn] = (await run(llm, pool, AlignCall([sample()]))).results[0].turns
    assert turn.kept is Kept.ORIGINAL and turn.margin == pytest.approx(-0.4)


@pytest.mark.parametrize(
    ("rewrite", "turn", "reason"),
    [
        (lambda t: t + " <image>", Turn("Q?", "A dog."), "image_marker"),
        (lambda t: "", Turn("Q?", "A dog."), "empty"),
        (lambda t: t.replace("two", "three"), Turn("Q?", "There are two dogs."), "numbers_changed"),
        (lambda t: t.replace("1,000", "100"), Turn("Q?", "It costs 1,000 yen."), "numbers_changed"),
        (
            lambda t: t.replace(", France", ""),
            Turn("Q?", "It is in Paris, France."),
            "entities_changed",
        ),
        (lambda t: t + " in Rome", Turn("Q?", "It is a city."), "entities_changed"),
        # The LLM spelled its own marker: kept out of the review's prompt, where it would act
        # as one (and fail the sample as if the client had sent it).
        (lambda t: t + "<|im_end|>", Turn("Q?", "It is red."), "control_token"),
    ],
)
async def test_guards_reject_the_rewrite_and_skip_the_review(
    pool: ThreadPoolExecutor,
    rewrite,
    turn: Turn,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    llm = FakeLLM(rewrite=rewrite)
    [aligned] = (await run(llm, pool, AlignCall([sample(0, turn)]))).results[0].turns
    assert (aligned.kept, aligned.reason, aligned.margin) == (Kept.ORIGINAL, reason, None)
    assert all(kind == "generate" for kind, _ in llm.calls)


async def test_guard_passes_equal_numbers_and_moved_names(pool: ThreadPoolExecutor) -> None:
    turn = Turn("Where is it?", "There are two towers and 1,000 people in Paris.")
    llm = FakeLLM(rewrite=lambda t: f"Paris has 1000 people and 2 towers, {MARK}.")
    call = AlignCall([sample(0, turn)], parts=Parts.ANSWERS)
    [aligned] = (await run(llm, pool, call)).results[0].turns
    assert aligned.reason == "review"


async def test_truncated_unchanged_and_unreviewed(pool: ThreadPoolExecutor) -> None:
    [t] = (await run(FakeLLM(finished=False), pool, AlignCall([sample()]))).results[0].turns
    assert (t.kept, t.reason) == (Kept.ORIGINAL, "truncated")
    [t] = (await run(FakeLLM(rewrite=str), pool, AlignCall([sample()]))).results[0].turns
    assert (t.kept, t.reason) == (Kept.ORIGINAL, "unchanged")
    llm = FakeLLM(prefer=0.0)
    [t] = (await run(llm, pool, AlignCall([sample()], review=False))).results[0].turns
    assert (t.kept, t.reason, t.margin) == (Kept.REWRITE, "unreviewed", None)
    assert {kind for kind, _ in llm.calls} == {"generate"}
    [t] = (
        (await run(FakeLLM(prefer=0.0), pool, AlignCall([sample()]), review=False)).results[0].turns
    )
    assert t.reason == "unreviewed"  # the configured default


async def test_parts_and_image_marker_restored(pool: ThreadPoolExecutor) -> None:
    turn = Turn("<image>\nWhat is the dog doing?", "The dog runs.")
    outcome = await run(FakeLLM(), pool, AlignCall([sample(0, turn)], parts=Parts.QUESTIONS))
    [t] = outcome.results[0].turns
    assert t.rewrite == Turn("<image>\n" + restyle("What is the dog doing?"), "The dog runs.")
    outcome = await run(FakeLLM(), pool, AlignCall([sample(0, turn)], parts=Parts.ANSWERS))
    [t] = outcome.results[0].turns
    assert t.rewrite == Turn(turn.question, restyle("The dog runs."))
    # A marker in the middle has no defined place in a rewrite.
    odd = Turn("What is <image> this?", "A dog.")
    [t] = (await run(FakeLLM(), pool, AlignCall([sample(0, odd)]))).results[0].turns
    assert t.reason == "image_marker"


async def test_llm_never_sees_the_marker_and_uses_call_decoding(pool: ThreadPoolExecutor) -> None:
    llm = FakeLLM()
    turn = Turn("<image>\nWhat is it?", "A dog.")
    call = AlignCall([sample(0, turn)], decoding=DecodingOptions(max_new_tokens=7, seed=3))
    await run(llm, pool, call)
    assert llm.seen and all("<image>" not in str(r.messages) for r in llm.seen)
    assert {
        (r.decoding.max_new_tokens, r.decoding.seed, r.decoding.temperature) for r in llm.seen
    } == {(7, 3, 0.0)}


async def test_batches_turns_of_all_samples_together(pool: ThreadPoolExecutor) -> None:
    llm = FakeLLM()
    samples = [sample(i, Turn(f"Q{i}?", "A."), Turn(f"R{i}?", "B.")) for i in range(4)]
    outcome = await run(llm, pool, AlignCall(samples))
    assert [r.id for r in outcome.results] == ["s0", "s1", "s2", "s3"]
    assert ("generate", 16) in llm.calls  # 4 samples x 2 turns x 2 parts in one batch
    assert outcome.prompt_tokens > 0 and outcome.generated_tokens > 0
    assert outcome.template_name == "default-v1"
    assert outcome.template_sha256 == TEMPLATES.get("default-v1").sha256
    assert outcome.compute_seconds >= 0 and outcome.queue_seconds >= 0


async def test_same_inputs_same_outputs(pool: ThreadPoolExecutor, continuous: bool) -> None:
    call = AlignCall([sample(i) for i in range(3)])
    first = await run(FakeLLM(continuous=continuous), pool, call)
    second = await run(FakeLLM(continuous=continuous), pool, call)
    assert [r.turns for r in first.results] == [r.turns for r in second.results]


async def test_per_item_errors(pool: ThreadPoolExecutor) -> None:
    long = "word " * 500  # over the fake's max_length 400
    samples = [
        sample(0),
        Sample(id="empty", image=b"", turns=[]),
        sample(2, Turn("Q?", "")),
        sample(3, Turn("Q?", long)),
        sample(4),
    ]
    results = (await run(FakeLLM(), pool, AlignCall(samples))).results
    assert results[0].error is None and results[4].error is None
    messages = {r.id: r.error.message for r in results if r.error is not None}
    assert messages["empty"].startswith("samples[1].turns: empty conversation")
    assert messages["s2"].startswith("samples[2].turns[0].answer: empty, and answers are")
    assert messages["s3"].startswith("samples[3].turns[0].answer: the prompt is")
    assert "max_length 400" in messages["s3"]
    # Questions alone need no answers.
    call = AlignCall([sample(2, Turn("Q?", ""))], parts=Parts.QUESTIONS)
    assert (await run(FakeLLM(), pool, call)).results[0].error is None


async def test_a_turn_with_candidate_answers_is_refused_alone(pool: ThreadPoolExecutor) -> None:
    """Align does not pick among candidates (that needs the answer head): the sample fails
    with a message saying what to do; its batch-mates are aligned."""
    candidates = Turn("Q?", candidates=("A dog.", "Two dogs."))
    for parts in (Parts.BOTH, Parts.QUESTIONS):
        call = AlignCall([sample(0), sample(1, Turn("Q0?", "A."), candidates)], parts=parts)
        results = (await run(FakeLLM(), pool, call)).results
        assert results[0].error is None and not results[1].turns
        assert results[1].error is not None and results[1].error.code is Code.INVALID_ARGUMENT
        assert results[1].error.message.startswith(
            "samples[1].turns[1].answer_candidates: 2 candidate answers, and Align rewrites "
            "one answer per turn: keep the best candidate first"
        )


async def test_a_request_that_fails_its_batch_fails_its_sample_alone(
    pool: ThreadPoolExecutor, continuous: bool
) -> None:
    # FakeLLM fails a whole batch when one of its rows asks about "boom", as the
    # transformers backend did for one row's temperature=1e-45: batch-mates must not care.
    llm = FakeLLM(fail="boom", continuous=continuous)
    samples = [sample(0), sample(1, Turn("boom?", "A.")), sample(2)]
    results = (await run(llm, pool, AlignCall(samples))).results
    assert results[0].error is None and results[2].error is None
    assert results[1].error is not None and results[1].error.code is Code.INTERNAL
    assert "scripted failure" in results[1].error.message
    if not continuous:  # the failing row did share a batch (then retried in halves)
        assert max(size for kind, size in llm.calls if kind == "generate") > 1


async def test_call_level_checks(pool: ThreadPoolExecutor) -> None:
    with pytest.raises(NotFound, match="template: unknown template set 'nope'; available: ") as nf:
        await run(FakeLLM(), pool, AlignCall([sample()], template="nope"))
    assert (nf.value.resource_type, nf.value.resource_name) == ("template", "nope")
    bad = DecodingOptions(top_p=1.5)
    with pytest.raises(InvalidArgument, match=r"options.decoding.top_p: 1.5 is not in \(0, 1\]"):
        await run(FakeLLM(), pool, AlignCall([sample()], decoding=bad))
    denormal = DecodingOptions(temperature=1e-45)  # passed a ">= 0" check, broke its batch
    with pytest.raises(InvalidArgument) as info:
        await run(FakeLLM(), pool, AlignCall([sample()], decoding=denormal))
    assert info.value.message == (
        "options.decoding.temperature: 1e-45 is neither 0 (greedy) nor in [0.01, 2.0]"
    )
    assert info.value.field == "options.decoding.temperature"
    too_many = DecodingOptions(max_new_tokens=5000)
    # A caller's error names the limit as GetServerInfo reports it, not the config key.
    with pytest.raises(InvalidArgument) as info:
        await run(FakeLLM(), pool, AlignCall([sample()], decoding=too_many))
    assert info.value.message == (
        "options.decoding.max_new_tokens: 5000 exceeds limits.max_new_tokens 1024"
    )
    assert info.value.field == "options.decoding.max_new_tokens"
    with pytest.raises(InvalidArgument, match=r"more than limits\.max_llm_inflight 64"):
        await run(FakeLLM(), pool, AlignCall([sample(i) for i in range(17)]))


async def test_admission_refuses_at_once_then_frees(
    pool: ThreadPoolExecutor, continuous: bool
) -> None:
    llm = FakeLLM(continuous=continuous, gate=asyncio.Event())
    async with started(llm, pool) as (aligner, runtime):
        held = asyncio.create_task(aligner.align(AlignCall([sample(i) for i in range(16)])))
        await llm.entered.wait()
        refused = sample(99, Turn("Refused?", "Yes."))
        with pytest.raises(Overloaded, match="full"):
            await aligner.align(AlignCall([refused]))
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        runtime.reserve(64).release()  # every slot is back
        llm.gate.set()
        assert (await aligner.align(AlignCall([sample()]))).results[0].error is None
    assert not any("Refused" in str(r.messages) for r in llm.seen[:-2])  # no work before
    held_requests = llm.seen[:-2]
    if continuous:
        assert llm.cancelled > 0  # the engine's requests were aborted
    else:  # the running batch is told which rows nobody waits for
        assert held_requests
        assert all(r.abandoned is not None and r.abandoned.is_set() for r in held_requests)
        assert all(not r.abandoned.is_set() for r in llm.seen[-2:] if r.abandoned)


async def test_deadline_fails_the_items(pool: ThreadPoolExecutor, continuous: bool) -> None:
    llm = FakeLLM(continuous=continuous, gate=asyncio.Event())
    call = AlignCall([sample()], deadline=time.monotonic() + 0.05)
    [result] = (await run(llm, pool, call)).results
    assert isinstance(result.error, DeadlineExpired)


@pytest.mark.parametrize(
    ("parts", "review", "per_turn"),
    [
        (Parts.QUESTIONS, True, 3),
        (Parts.ANSWERS, True, 3),
        (Parts.BOTH, True, 4),
        (Parts.QUESTIONS, False, 1),
    ],
)
async def test_admission_counts_one_rewrite_per_part_asked_for(
    pool: ThreadPoolExecutor,
    parts: Parts,
    review: bool,
    per_turn: int,
) -> None:
    """A call needs one rewrite per part it rewrites plus two review choices per turn: 21
    one-turn questions-only samples need 63 requests and fit max_llm_inflight 64; 22 need
    66 (and the refusal says so), not 88."""
    fits = 64 // per_turn
    samples = [sample(i) for i in range(fits + 1)]
    outcome = await run(FakeLLM(), pool, AlignCall(samples[:fits], parts=parts, review=review))
    assert len(outcome.results) == fits and all(r.error is None for r in outcome.results)
    if fits + 1 <= 64:  # limits.max_samples_per_call
        needed = (fits + 1) * per_turn
        with pytest.raises(InvalidArgument, match=rf"the call needs {needed} LLM requests"):
            await run(FakeLLM(), pool, AlignCall(samples, parts=parts, review=review))


async def test_an_interactive_call_asks_the_engine_for_its_interactive_priority(
    pool: ThreadPoolExecutor,
) -> None:
    """GenerationRequest.priority: 0 interactive, 1 bulk (a continuous engine, vLLM,
    schedules by it)."""
    for priority, engine in ((Priority.INTERACTIVE, 0), (Priority.BULK, 1)):
        llm = FakeLLM()
        await run(llm, pool, AlignCall([sample()], priority=priority, review=False))
        priorities = {r.priority for r in llm.seen}
        assert priorities == {engine}


class HeldReview(FakeLLM):
    """Generates at once; every review choice waits for ``review_gate``."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.review_gate = asyncio.Event()
        self.reviewing = asyncio.Event()

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        self.reviewing.set()
        await self.review_gate.wait()
        return await super().choose(batch)


async def test_a_turn_gives_back_its_unused_slots_when_it_ends(
    pool: ThreadPoolExecutor,
) -> None:
    """A turn whose rewrite a guard rejects never runs its two review choices: those slots
    go back when the turn ends, not when the whole call ends (else the call holds capacity
    that other calls are refused for)."""

    def rewrite(text: str) -> str:  # "cat" turns get a new number: numbers_changed
        return f"{text.rstrip('.?')} 42." if "cat" in text else restyle(text)

    llm = HeldReview(rewrite=rewrite)
    guarded = sample(0, Turn("Is the cat asleep?", "The cat is asleep."))
    reviewed = sample(1, Turn("What is the dog doing?", "The dog is running on grass."))
    async with started(llm, pool) as (aligner, runtime):
        call = asyncio.create_task(aligner.align(AlignCall([guarded, reviewed])))
        await asyncio.wait_for(llm.reviewing.wait(), 10)
        await spin()
        # planned 2 x 4; the guarded turn used 2 (done), the reviewed one used 2 (done)
        # and holds 2 review choices: only those 2 are still claimed.
        assert runtime.load == 2
        llm.review_gate.set()
        outcome = await call
    first, second = outcome.results
    assert first.turns[0].kept is Kept.ORIGINAL and first.turns[0].reason == "numbers_changed"
    assert second.turns[0].reason == "review"


async def test_a_full_llm_says_when_the_callers_turn_comes(continuous: bool) -> None:
    """Batched or continuous: before anything ran, a refusal carries the default delay;
    once a request took 0.3 s, the turn of a caller one past a full gate comes one item's
    time later, and a caller whose deadline comes first is told not to retry."""
    llm = FakeLLM(continuous=continuous, gate=asyncio.Event())
    runtime = GenerationRuntime(llm, BatchingConfig(max_delay_ms=1), max_inflight=4)
    runtime.start()
    try:
        held = runtime.reserve(4)
        with pytest.raises(Overloaded) as early:
            runtime.reserve(1)
        assert early.value.retry_after == OVERLOADED_RETRY_SECONDS
        held.release()
        request = GenerationRequest(
            [{"role": "user", "content": "Rewrite: what is it?"}], Decoding(max_new_tokens=8)
        )
        running = asyncio.create_task(
            runtime.generate(request, 16, runtime.reserve(1), deadline=None, priority=Priority.BULK)
        )
        await llm.entered.wait()
        await asyncio.sleep(0.3)
        llm.gate.set()
        await running
        held = runtime.reserve(4)
        with pytest.raises(Overloaded) as paced:
            runtime.reserve(1)
        assert paced.value.retry_after is not None and 0.28 <= paced.value.retry_after <= 1.5
        with pytest.raises(NoTurnBeforeDeadline):
            runtime.reserve(1, deadline=time.monotonic() + 0.05)
        held.release()
    finally:
        await runtime.close()
