"""The server-wide bound on the scores Curate's selection windows hold
(curate.max_stored_scores, core/selector.StoredScores): counted as windows grow, given back
when a stream's own windows or an expired key's are dropped, and refused before the work
that would add to them once full. Curate core with the scripted scorer of test_curation."""

from __future__ import annotations

import array
import tracemalloc

import pytest
from support import metric, spin
from test_curation import collect, curator, feed, sample
from test_shared_selection import question_stage, scores

from align2.server.config import CurateConfig, LimitsConfig
from align2.server.core.curation import CurateOptions, Curator, Decision
from align2.server.core.lifecycle import Lifecycle, Phase
from align2.server.core.selector import StoredScores
from align2.server.errors import Code, StoredScoresFull


def gauge() -> float:
    return metric("align2_curate_stored_scores")


async def test_a_streams_own_windows_count_while_it_lives_and_give_back_when_it_ends() -> None:
    """Fails on: a stream's own windows never given back (the count only grows, and a
    long-running server ends up refusing every new window)."""
    curate = curator(scores(1.0, 2.0, 3.0))
    before = gauge()
    options = question_stage(question_seed_scores={"detail": [0.5] * 10})
    stream = curate.stream(feed([options, sample(0), sample(1)]), None)
    first = await anext(stream)
    assert first.error is None
    # 10 seeds + the question scores so far; the answer stage has a given threshold
    assert curate.stored_scores.held == gauge() - before >= 11
    rest = [first, *await collect(stream)]
    assert [r.question_window_size for r in rest] == [11, 12]
    assert curate.stored_scores.held == 0 and gauge() == before


async def test_a_keys_windows_count_until_the_key_expires() -> None:
    curate = curator(scores(1.0, 2.0), selection_key_idle_seconds=0)
    options = CurateOptions(selection_key="k")
    [decided] = await collect(curate.stream(feed([options, sample(0)]), None))
    assert decided.decision is Decision.KEPT  # one question score, one answer score
    assert "k" in curate.selection_keys and curate.stored_scores.held == 2
    await spin(3)  # the key's idle TTL (0 s) runs out
    assert "k" not in curate.selection_keys
    assert curate.stored_scores.held == 0


async def test_seeds_beyond_the_servers_room_refuse_the_stream_naming_field_and_limit() -> None:
    """Fails on: seeds checked only against max_seed_scores (one stream's), never against
    what the server holds; or the refused stream keeping its key."""
    curate = curator(scores(1.0), max_stored_scores=25)
    first = question_stage(selection_key="k", question_seed_scores={"a": [1.0] * 20})
    await collect(curate.stream(feed([first]), None))
    assert curate.stored_scores.held == 20
    more = question_stage(
        question_seed_scores={"b": [1.0] * 3}, answer_seed_scores={"b": [0.0] * 4}
    )
    with pytest.raises(StoredScoresFull) as refused:
        await collect(curate.stream(feed([more, sample(0, task="b")]), None))
    error = refused.value
    assert error.code is Code.RESOURCE_EXHAUSTED and error.retry_after
    assert error.field == "options.answer_seed_scores"  # the larger share of the 7
    assert "7 more score(s)" in error.message and "limits.max_stored_scores 25" in error.message
    assert curate.stored_scores.held == 20  # nothing of the refused stream stayed
    # 3 seeds fit; then a sample of "b" adds a question and an answer score: 25, full.
    fits = question_stage(question_seed_scores={"b": [1.0] * 3})
    decided = await collect(curate.stream(feed([fits, sample(0, task="b")]), None))
    assert [d.error for d in decided] == [None]
    assert curate.stored_scores.held == 20  # the stream's own windows are given back
    # Seeds for a key's window that already holds a calibration add nothing: not refused.
    again = question_stage(selection_key="k", question_seed_scores={"a": [1.0] * 20})
    await collect(curate.stream(feed([again]), None))
    curate.selection_keys.acquire("k")  # acquires and releases balance (no KeyError)
    curate.selection_keys.release("k")


async def test_seeds_count_only_what_the_window_keeps() -> None:
    """A window keeps its last ``window`` scores: 150 seeds for a window of 100 add 100."""
    curate = curator(scores(1.0), max_stored_scores=100)  # window 100 (test_curation)
    options = question_stage(question_seed_scores={"detail": [1.0] * 150})
    [decided] = await collect(curate.stream(feed([options, sample(0)]), None))
    assert decided.question_window_size == 100
    assert decided.error is None  # its window was full: the score replaced one


async def test_when_full_a_sample_that_would_grow_a_window_fails_alone_before_scoring() -> None:
    """Fails on: no check as a sample arrives (the bound would hold only for seeds), or a
    refusal that fails the stream or a sample whose window is full or threshold given."""
    scorer = scores(1.0, 2.0, 3.0, 4.0)
    curate = curator(scorer, max_stored_scores=100)
    seeded = {"full": [1.0] * 100}
    options = CurateOptions(
        question_seed_scores=seeded,
        answer_seed_scores={},
        answer_thresholds={"full": 0.0, "given": 0.0, "new": 0.0},
        question_thresholds={"given": 0.0},
    )
    items = [options, sample(0, task="new"), sample(1, task="full"), sample(2, task="given")]
    decided = {r.id: r for r in await collect(curate.stream(feed(items), None))}
    error = decided["s0"].error
    assert decided["s0"].decision is Decision.ERROR and isinstance(error, StoredScoresFull)
    assert error.field == "sample.task" and "limits.max_stored_scores 100" in error.message
    assert ("s0", scorer.calls[0][1]) not in scorer.calls  # refused before any forward pass
    assert decided["s1"].error is None and decided["s1"].question_window_size == 100
    assert decided["s2"].error is None and decided["s2"].question_window_size == 0


def test_unbounded_counts_but_never_refuses() -> None:
    stored = StoredScores(0)
    stored.add(10**9)
    stored.check(10**9, "options.question_seed_scores")
    stored.give_back(10**9)
    assert stored.held == 0
    bounded = StoredScores(10)
    bounded.add(10)
    bounded.check(0, "sample.task")  # adding nothing always fits
    with pytest.raises(StoredScoresFull):
        bounded.check(1, "sample.task")


async def test_a_sample_is_checked_for_both_stages_scores_together() -> None:
    """20 held of 21: a sample whose question and answer windows both grow needs 2.
    Fails on: each stage checking its one score alone (both would pass, 22 held)."""
    curate = curator(scores(1.0), max_stored_scores=21)
    options = CurateOptions(question_seed_scores={"detail": [0.5] * 20})
    [decided] = await collect(curate.stream(feed([options, sample(0)]), None))
    assert isinstance(decided.error, StoredScoresFull)
    assert "2 more score(s)" in decided.error.message


async def test_dropped_windows_report_the_bytes_they_free() -> None:
    """Fails on: windows dropped silently. Seeds claim no request bytes, so the heap trimmer
    (which ran only when request bytes drained) never ran after seeded windows were
    dropped: 500 seeded streams cancelled left the server 960 MB above idle, all of it
    freed heap that malloc_trim gave back."""
    freed: list[int] = []
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.SERVING
    curate = Curator(
        scores(1.0),  # type: ignore[arg-type]
        None,
        CurateConfig(window=100, min_window=1, selection_key_idle_seconds=0),
        LimitsConfig(max_stream_inflight=4),
        lifecycle,
        scores_freed=freed.append,
    )
    own = question_stage(
        question_seed_scores={"a": [1.0] * 30}, answer_seed_scores={"a": [0.0] * 5}
    )
    await collect(curate.stream(feed([own]), None))
    assert freed == [30 * 16, 5 * 16]  # its own windows as it ended, 16 bytes a score
    freed.clear()
    keyed = question_stage(selection_key="k", question_seed_scores={"b": [1.0] * 20})
    await collect(curate.stream(feed([keyed]), None))
    assert freed == []  # the key's windows live on for its idle TTL
    await spin(3)
    assert "k" not in curate.selection_keys and freed == [20 * 16]


async def test_a_refused_stream_does_not_copy_its_seeds() -> None:
    """Fails on: seeds copied into lists of float objects (32 bytes a score) before the
    room check; a refused stream's copy then lived on in the reference cycles of its error
    until the cyclic GC ran (18 M float objects with 180 of 500 seeded streams refused)."""
    curate = curator(scores(1.0), max_stored_scores=10)
    # As the request holds them (proto floats): reading one makes a float object.
    seeds = {f"t{i}": array.array("f", [0.5]) * 10_000 for i in range(5)}
    refused = question_stage(question_seed_scores=seeds)
    tracemalloc.start()
    try:
        with pytest.raises(StoredScoresFull):
            await collect(curate.stream(feed([refused]), None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000  # a copy: 50,000 x (8 + 24) bytes = 1.6 MB
