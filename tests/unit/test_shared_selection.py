"""Selection beyond one stream's own window, on the Curate core with a scripted scorer:
selection keys (shared windows, their limit and idle expiry), given thresholds, and the
warm-up (hold until min_window, within the stream's in-flight bound; seeds)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from support import metric, spin
from test_curation import ScriptedScorer, collect, curator, feed, sample, sized

from align2.client.types import Sample
from align2.server.core.budget import ByteBudget
from align2.server.core.curation import Curated, CurateOptions, Curator, Decision
from align2.server.core.scoring import Head
from align2.server.core.selector import Holds
from align2.server.errors import Code, InvalidArgument, TooManySelectionKeys


def scores(*values: float, start: int = 0) -> ScriptedScorer:
    """Sample ``s{start + i}`` has question score ``values[i]``; answers score 0."""
    return ScriptedScorer({f"s{start + i}": v for i, v in enumerate(values)}, {})


def question_stage(**options: Any) -> CurateOptions:
    """Options whose answer stage never waits: the scripted answers (0.0) meet a given
    answer threshold of 0, so that a test watches the question stage's warm-up alone."""
    return CurateOptions(answer_thresholds={"detail": 0.0}, **options)


def by_id(results: Iterable[Curated]) -> dict[str, Curated]:
    return {r.id: r for r in results}


class Producer:
    """Samples handed to a stream one batch at a time: :meth:`send` queues samples, and the
    stream's input ends only at :meth:`close`."""

    def __init__(self, options: CurateOptions | None = None) -> None:
        self._queue: asyncio.Queue[Sample | None] = asyncio.Queue()
        self._options = options

    def send(self, *samples: Sample) -> None:
        for item in samples:
            self._queue.put_nowait(item)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def items(self) -> AsyncIterator[Any]:
        if self._options is not None:
            yield self._options
        while (item := await self._queue.get()) is not None:
            yield item


class Stream:
    """A running stream whose decisions are collected as they come."""

    def __init__(self, curate: Curator, producer: Producer) -> None:
        self.decided: list[Curated] = []
        self._producer = producer
        self._task = asyncio.ensure_future(self._run(curate))

    async def _run(self, curate: Curator) -> None:
        async for result in curate.stream(self._producer.items(), None):
            self.decided.append(result)

    async def finish(self) -> dict[str, Curated]:
        self._producer.close()
        await self._task
        return by_id(self.decided)


def selection_keys_gauge() -> float:
    return metric("align2_curate_selection_keys")


# ---------------------------------------------------------------------------------------
# Selection keys


async def test_streams_of_one_key_rank_against_each_others_scores() -> None:
    scorer = scores(*range(1, 11), 5.0, 5.0)  # s0..s9 score 1..10; s10, s11 score 5
    curate = curator(scorer)
    keyed = CurateOptions(selection_key="pipeline", min_window=1)
    first = Producer(keyed)
    a = Stream(curate, first)
    first.send(*(sample(i) for i in range(10)))
    await spin()
    assert len(a.decided) == 10  # A is still open: the key is in use
    # B's decision ranks its 5.0 among A's ten scores and itself: k = ceil(0.3 x 11) = 4,
    # the 4th highest of {1..10, 5} is 7, so 5.0 is dropped; alone it would be kept.
    [b] = await collect(curate.stream(feed([keyed, sample(10)]), None))
    assert (b.question_window_size, b.question_threshold) == (11, 7.0)
    assert b.decision is Decision.DROPPED_QUESTION
    # A stream of another key, and one without a key, start from their own empty windows.
    for options in (CurateOptions(selection_key="other", min_window=1), CurateOptions()):
        [c] = await collect(curate.stream(feed([options, sample(11)]), None))
        assert (c.question_window_size, c.question_threshold) == (1, 5.0)
        assert c.decision is not Decision.DROPPED_QUESTION
    await a.finish()


async def test_a_held_decision_is_made_when_another_stream_fills_the_window() -> None:
    scorer = scores(2.0, 9.0, 1.0, 3.0)
    curate = curator(scorer, inflight=8)
    options = question_stage(selection_key="k", min_window=4)
    first, second = Producer(options), Producer(options)
    a, b = Stream(curate, first), Stream(curate, second)
    first.send(sample(0), sample(1))
    await spin()
    assert a.decided == []  # held: the window has 2 of 4 scores
    second.send(sample(2), sample(3))
    await spin()
    # B's two scores complete the window: A's decisions are made against all four
    # (k = ceil(0.3 x 4) = 2: threshold 3.0), none of them early.
    decided = by_id(a.decided + b.decided)
    assert set(decided) == {"s0", "s1", "s2", "s3"}
    assert {r.question_threshold for r in decided.values()} == {3.0}
    assert {r.question_window_size for r in decided.values()} == {4}
    assert not any(r.warm_up for r in decided.values())
    assert decided["s0"].decision is Decision.DROPPED_QUESTION
    assert decided["s1"].question_threshold == 3.0 and decided["s1"].scores.question_score == 9.0
    await a.finish()
    await b.finish()


async def test_a_new_key_beyond_the_limit_is_refused_naming_it() -> None:
    curate = curator(scores(1.0, 2.0, 3.0), max_selection_keys=1)
    first = Producer(CurateOptions(selection_key="a"))
    a = Stream(curate, first)
    first.send(sample(0))
    await spin()
    with pytest.raises(TooManySelectionKeys) as refused:
        await collect(curate.stream(feed([CurateOptions(selection_key="b"), sample(1)]), None))
    assert refused.value.code is Code.RESOURCE_EXHAUSTED
    assert refused.value.field == "options.selection_key"
    assert "limits.max_selection_keys 1" in refused.value.message
    assert refused.value.retry_after == 600  # "a" is in use: the soonest it can expire
    # The live key itself is still welcome.
    same = await collect(curate.stream(feed([CurateOptions(selection_key="a"), sample(2)]), None))
    assert same[0].question_window_size == 2  # A's score and its own
    await a.finish()
    with pytest.raises(TooManySelectionKeys) as idle:  # "a" is idle, within its TTL
        await collect(curate.stream(feed([CurateOptions(selection_key="b"), sample(1)]), None))
    assert idle.value.retry_after is not None and 0 < idle.value.retry_after <= 600


async def test_a_server_without_keys_refuses_one_as_invalid_not_as_busy() -> None:
    curate = curator(scores(1.0), max_selection_keys=0)
    with pytest.raises(InvalidArgument, match=r"limits.max_selection_keys 0"):
        await collect(curate.stream(feed([CurateOptions(selection_key="k"), sample(0)]), None))
    [decided] = await collect(curate.stream(feed([sample(0)]), None))  # without one: served
    assert decided.error is None


async def test_an_idle_key_expires_after_its_ttl_and_then_starts_afresh() -> None:
    before = selection_keys_gauge()
    lasting = curator(scores(1.0, 2.0), selection_key_idle_seconds=600)
    expiring = curator(scores(1.0, 2.0), selection_key_idle_seconds=0)
    options = CurateOptions(selection_key="k", min_window=1)
    for curate in (lasting, expiring):
        await collect(curate.stream(feed([options, sample(0)]), None))
    assert selection_keys_gauge() == before + 2  # both live until their expiry runs
    await spin(3)
    assert "k" in lasting.selection_keys and "k" not in expiring.selection_keys
    assert selection_keys_gauge() == before + 1
    [kept] = await collect(lasting.stream(feed([options, sample(1)]), None))
    assert kept.question_window_size == 2  # the key's windows outlived its first stream
    [fresh] = await collect(expiring.stream(feed([options, sample(1)]), None))
    assert fresh.question_window_size == 1


# ---------------------------------------------------------------------------------------
# Given thresholds


async def test_given_thresholds_decide_exactly_and_touch_no_window() -> None:
    questions = {"s0": 2.5, "s1": 2.4999, "s2": 9.0, "s3": 0.0}
    answers = {"s0": [1.0, 2.0], "s2": [0.5]}
    scorer = ScriptedScorer(questions, answers)
    curate = curator(scorer)
    options = CurateOptions(
        selection_key="k",
        question_thresholds={"detail": 2.5},
        answer_thresholds={"detail": 1.5},
        min_window=100,  # no warm-up wait with given thresholds
    )
    items = [options, sample(0), sample(1), sample(2), sample(3, task="other")]
    results = by_id(await collect(curate.stream(feed(items), None)))
    assert results["s0"].decision is Decision.KEPT  # 2.5 >= 2.5; mean answer 1.5 >= 1.5
    assert results["s1"].decision is Decision.DROPPED_QUESTION
    assert results["s2"].decision is Decision.DROPPED_ANSWER  # 9 passes; 0.5 < 1.5
    for r in (results["s0"], results["s1"], results["s2"]):
        assert (r.question_threshold, r.question_window_size, r.warm_up) == (2.5, 0, False)
    assert (results["s0"].answer_threshold, results["s0"].answer_window_size) == (1.5, 0)
    # A task without a given threshold uses its window (here: alone, so held until the
    # stream's end, then kept as the only score).
    assert (results["s3"].question_window_size, results["s3"].warm_up) == (1, True)
    # The given thresholds added nothing to the key's windows.
    [later] = await collect(
        curate.stream(feed([CurateOptions(selection_key="k", min_window=1), sample(0)]), None)
    )
    assert later.question_window_size == 1


# ---------------------------------------------------------------------------------------
# Warm-up


async def test_decisions_wait_for_min_window_then_use_the_full_window() -> None:
    curate = curator(scores(1.0, 5.0, 3.0, 4.0), inflight=8)
    producer = Producer(question_stage(min_window=3))
    stream = Stream(curate, producer)
    producer.send(sample(0), sample(1))
    await spin()
    assert stream.decided == []  # two of three scores: both held
    producer.send(sample(2))
    await spin()
    # All three decided against {1, 5, 3} (k = 1: threshold 5); none early.
    assert sorted((r.id, r.question_threshold, r.warm_up) for r in stream.decided) == [
        ("s0", 5.0, False),
        ("s1", 5.0, False),
        ("s2", 5.0, False),
    ]
    assert [r.id for r in stream.decided if r.decision is Decision.KEPT] == ["s1"]
    producer.send(sample(3))  # past the warm-up: decided at once, k = ceil(1.2) = 2
    results = await stream.finish()
    assert (results["s3"].question_threshold, results["s3"].decision) == (4.0, Decision.KEPT)


async def test_a_stream_whose_slots_all_wait_decides_with_what_is_there() -> None:
    curate = curator(scores(1.0, 5.0, 3.0), inflight=2)
    producer = Producer(question_stage(min_window=10))
    stream = Stream(curate, producer)
    producer.send(sample(0), sample(1), sample(2))
    await spin()
    # Both slots held: decided early against {1, 5}; the third waits again.
    first = by_id(stream.decided)
    assert set(first) == {"s0", "s1"}
    assert all(r.warm_up and r.question_window_size == 2 for r in first.values())
    assert first["s1"].decision is Decision.KEPT
    results = await stream.finish()  # input ended: the rest is all held, decided now
    assert (results["s2"].question_window_size, results["s2"].warm_up) == (3, True)


async def test_a_producer_waiting_for_each_decision_gets_it_after_an_idle_pause() -> None:
    # Lock-step: send one, wait for its decision, send the next. Neither the in-flight bound
    # nor the end of input would ever release the held sample; the producer's pause does.
    curate = curator(scores(1.0, 5.0), inflight=8, min_window=100, warm_up_idle_ms=50)
    answered = asyncio.Event()

    async def lock_step() -> AsyncIterator[Any]:
        yield question_stage()
        for i in range(2):
            answered.clear()
            yield sample(i)
            await answered.wait()

    results: list[Curated] = []
    async with asyncio.timeout(5):
        async for result in curate.stream(lock_step(), None):
            results.append(result)
            answered.set()
    assert all(r.warm_up for r in results)
    assert results[1].question_window_size == 2  # ranked among both, not alone


async def test_without_the_idle_release_a_lock_step_producer_waits() -> None:
    curate = curator(scores(1.0), inflight=8, min_window=100, warm_up_idle_ms=0)
    producer = Producer(question_stage())
    stream = Stream(curate, producer)
    producer.send(sample(0))
    await asyncio.sleep(0.3)
    assert stream.decided == []  # held until the end of input
    results = await stream.finish()
    assert results["s0"].warm_up


async def test_the_stream_end_decides_the_held_together_not_first_come_first_kept() -> None:
    # Before the warm-up, decisions were made on arrival: s0 (1.0) was kept as its task's
    # first score. Held to the end, all three are ranked together.
    scorer = scores(1.0, 3.0, 2.0)
    scorer.gate = asyncio.Event()
    curate = curator(scorer, inflight=8, min_window=100)
    task = asyncio.ensure_future(collect(curate.stream(feed(sample(i) for i in range(3)), None)))
    await spin()
    scorer.gate.set()  # the input has ended by now; the scores arrive after
    results = by_id(await task)
    assert [i for i, r in sorted(results.items()) if r.decision is Decision.KEPT] == ["s1"]
    assert all(r.warm_up and r.question_window_size == 3 for r in results.values())


async def test_seed_scores_fill_the_window_before_the_first_sample() -> None:
    seeds = {"detail": [float(v) for v in range(10)]}  # 0..9
    curate = curator(scores(7.5, 6.5))
    options = question_stage(selection_key="k", min_window=10, question_seed_scores=seeds)
    [first] = await collect(curate.stream(feed([options, sample(0)]), None))
    # Decided at once (11 >= min_window) against {0..9, 7.5}: k = 4, threshold 7.
    assert (first.question_window_size, first.question_threshold) == (11, 7.0)
    assert first.decision is Decision.KEPT and not first.warm_up
    # A window takes seeds once: a later stream's seeds for it are ignored.
    other = question_stage(
        selection_key="k", min_window=10, question_seed_scores={"detail": [100.0] * 5}
    )
    [second] = await collect(curate.stream(feed([other, sample(1)]), None))
    assert second.question_window_size == 12 and second.question_threshold == 7.0


async def test_selection_options_out_of_range_name_the_option_and_the_limit() -> None:
    curate = curator(scores(1.0), max_seed_scores=4, max_task_types=2)
    bad: list[tuple[CurateOptions, str]] = [
        (
            CurateOptions(question_thresholds=dict.fromkeys("abc", 0.0)),
            r"options.question_thresholds: 3 task types exceeds limits.max_task_types 2",
        ),
        (
            CurateOptions(answer_seed_scores={"t" * 257: [1.0]}),
            r"options.answer_seed_scores: a task of 257 characters exceeds "
            r"limits.max_name_length 256",
        ),
        (CurateOptions(min_window=0), r"options.min_window: 0 is not in 1..limits"),
        (CurateOptions(min_window=101), r"limits.selection_window 100"),
        (CurateOptions(question_thresholds={"d": float("nan")}), r"options.question_thresholds"),
        (CurateOptions(answer_seed_scores={"d": [1.0] * 5}), r"limits.max_seed_scores 4"),
        (CurateOptions(selection_key="k" * 257), r"options.selection_key: 257 characters"),
    ]
    for options, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            await collect(curate.stream(feed([options, sample(0)]), None))
    assert len(curate.selection_keys) == 0  # a refused stream holds no key


async def test_the_task_type_limit_holds_in_arrival_order_before_any_scoring() -> None:
    """Three new task types sent at once, limit 2, their scores held back: the third to
    arrive is refused at once, unscored, and the first two go on. Fails on: windows taken
    when a score comes back (all three scored; whichever score came last refused)."""
    scorer = scores(1.0, 2.0, 3.0)
    scorer.gate = asyncio.Event()  # no score comes back until set
    curate = curator(scorer, max_task_types=2)
    producer = Producer(CurateOptions(min_window=1))
    stream = Stream(curate, producer)
    producer.send(sample(0, task="a"), sample(1, task="b"), sample(2, task="c"))
    await spin()
    assert [sample_id for sample_id, _ in scorer.calls] == ["s0", "s1"]
    [refused] = stream.decided
    assert refused.id == "s2" and refused.decision is Decision.ERROR
    assert isinstance(refused.error, InvalidArgument) and refused.error.field == "sample.task"
    scorer.gate.set()
    decided = await stream.finish()
    assert Decision.ERROR not in {decided["s0"].decision, decided["s1"].decision}


async def test_a_sample_that_fails_leaves_no_task_type_window_behind() -> None:
    """A window taken on arrival and left empty (the sample failed before a score) is given
    back: a typo'd task with a bad image does not use up limits.max_task_types. Fails on:
    the empty window kept, refusing the next task type."""
    scorer = ScriptedScorer({"s0": None, "s1": 1.0}, {})  # s0: not an image
    curate = curator(scorer, max_task_types=1)
    producer = Producer(CurateOptions(min_window=1))
    stream = Stream(curate, producer)
    producer.send(sample(0, task="typo"))
    await spin()
    producer.send(sample(1, task="detail"))
    decided = await stream.finish()
    assert decided["s0"].decision is Decision.ERROR
    assert decided["s1"].error is None and decided["s1"].decision is not Decision.ERROR


async def test_a_sample_waiting_for_bytes_frees_the_samples_other_streams_hold() -> None:
    """Stream A's two samples wait for a warm-up that its paused producer will not bring
    (warm_up_idle_ms 0) and fill the byte budget; stream B's sample then waits for bytes.
    Nothing can be read any more, by either stream: A's held decisions are made, and B's
    sample goes on. Fails on: only the waiting stream's own held decisions released (B,
    and every Score call, blocked until A's deadline)."""
    scorer = scores(1.0, 2.0, 3.0)
    budget = ByteBudget(2000)
    curate = curator(scorer, min_window=100, budget=budget, warm_up_idle_ms=0)
    first, second = Producer(), Producer()
    a, b = Stream(curate, first), Stream(curate, second)
    first.send(sized(0, 1000), sized(1, 1000))
    await spin()
    assert a.decided == [] and budget.in_flight == 2000  # held: the window wants 100
    second.send(sized(2, 1000))
    for _ in range(100):
        await spin()
        if ("s2", Head.QUESTION) in scorer.calls:
            break
    assert ("s2", Head.QUESTION) in scorer.calls and budget.waiting == 0  # B read on
    assert a.decided and all(r.warm_up for r in a.decided)  # what freed its bytes
    decided = {**await b.finish(), **await a.finish()}
    assert sorted(decided) == ["s0", "s1", "s2"]
    assert budget.in_flight == 0


async def test_task_types_beyond_the_limit_fail_their_sample_or_seeds_naming_the_limit() -> None:
    """The task is any string: each new one costs a window per stage, so one selection
    keeps at most curate.max_task_types of them; a sample of one more gets INVALID_ARGUMENT
    alone, and a stream seeding more is refused without holding its key."""
    scorer = scores(1.0, 2.0, 3.0, 4.0)
    curate = curator(scorer, max_task_types=2)
    invalid = metric("align2_items_rejected_total", reason="invalid")
    thresholds = {"a": 0.0, "b": 0.0}  # scripted answers score 0: all pass
    options = CurateOptions(selection_key="k", answer_thresholds=thresholds)
    producer = Producer(options)
    stream = Stream(curate, producer)
    producer.send(sample(0, task="a"), sample(1, task="b"))
    await spin()  # their windows exist: a third task is refused before it is scored
    producer.send(sample(2, task="c"))
    producer.send(sample(3, task="a"), sample(5, task="a" * 257))
    decided = await stream.finish()
    long_task = decided["s5"].error  # a task of more than 256 characters: its sample alone
    assert isinstance(long_task, InvalidArgument) and long_task.field == "sample.task"
    assert "257 characters exceeds limits.max_name_length 256" in long_task.message
    assert decided["s2"].decision is Decision.ERROR
    assert "s2" not in {sample_id for sample_id, _ in scorer.calls}  # refused before scoring
    error = decided["s2"].error
    assert isinstance(error, InvalidArgument) and error.field == "sample.task"
    assert "limits.max_task_types 2" in error.message
    assert [decided[f"s{i}"].decision for i in (0, 1, 3)] == [Decision.KEPT] * 3
    assert decided["s3"].question_window_size == 2  # task "a" went on as before
    # both refusals counted as invalid samples, as Score counts them (Fails on: uncounted)
    assert metric("align2_items_rejected_total", reason="invalid") == invalid + 2
    # Seeds for a third task on key "k", whose windows hold "a" and "b": refused, key freed.
    seeded = question_stage(selection_key="k", question_seed_scores={"c": [1.0]})
    with pytest.raises(InvalidArgument, match=r"options\.question_seed_scores: 1 new task"):
        await collect(curate.stream(feed([seeded, sample(4, task="a")]), None))
    with pytest.raises(InvalidArgument, match=r"limits\.max_task_types 2"):
        many = {t: [1.0] for t in "xyz"}
        await collect(curate.stream(feed([CurateOptions(answer_seed_scores=many)]), None))
    curate.selection_keys.acquire("k")  # the refused stream gave the key back:
    curate.selection_keys.release("k")  # one acquire, one release balance (no KeyError)


async def test_an_idle_stream_holds_no_seeds_once_its_windows_hold_them() -> None:
    """Fails on: the session's options keeping the seed lists for the stream's life, or the
    stream's reader keeping the options (and so the request's maps) while it waits for the
    next message (500 idle streams of 400 KB of seeds held 3.7 GB)."""

    class Seeds(dict):  # type: ignore[type-arg]  # a mapping that can be watched
        pass

    curate = curator(scores(1.0))
    seeds = Seeds(detail=[float(v) for v in range(10)])
    watched = weakref.ref(seeds)
    sent = [question_stage(question_seed_scores=seeds)]
    del seeds
    idle = asyncio.Event()

    async def producer() -> AsyncIterator[Any]:
        yield sent.pop()  # the test keeps no reference to the options it sent
        await idle.wait()  # the producer pauses: the stream waits for its next message

    stream = curate.stream(producer(), None)
    waiting = asyncio.ensure_future(collect(stream))
    await spin()
    gc.collect()
    assert watched() is None
    idle.set()
    assert await waiting == []


async def test_a_session_keeps_no_copy_of_its_seeds_once_its_windows_hold_them() -> None:
    curate = curator(scores(1.0))
    seeds = {"detail": [float(v) for v in range(10)]}
    options = question_stage(question_seed_scores=seeds, answer_seed_scores=seeds)
    session = curate.session(options, Holds(4, lambda: 0))
    try:
        assert session._options.question_seed_scores == {}
        assert session._options.answer_seed_scores == {}
    finally:
        session.close()


async def test_at_the_streams_deadline_held_decisions_are_made_while_its_caller_listens() -> None:
    """The work's deadline falls a margin before the caller's (transport): at it, what is
    held for the warm-up is decided against the window as it is. Fails on: no release at
    the deadline (a held sample waited for a window that never filled, and the caller's
    deadline then ended the call with its decision owed)."""
    curate = curator(scores(1.0), inflight=8, min_window=100, warm_up_idle_ms=0)
    before = metric("align2_curate_warm_up_releases_total", reason="deadline")
    producer = Producer(question_stage())
    decided: list[Curated] = []

    async def run() -> None:
        async for result in curate.stream(producer.items(), time.monotonic() + 0.3):
            decided.append(result)

    task = asyncio.ensure_future(run())
    producer.send(sample(0))
    await asyncio.sleep(0.15)
    assert decided == []  # held: the window has 1 score of 100
    await asyncio.sleep(0.4)
    assert [r.id for r in decided] == ["s0"] and decided[0].warm_up
    assert decided[0].error is None
    assert metric("align2_curate_warm_up_releases_total", reason="deadline") == before + 1
    producer.close()
    await task
