"""Online selection's bounds on the Curate core (core/selection, selector, selection_keys,
curation), with the scripted scorer of tests/unit/test_curation.py: the rounding of k,
float32 thresholds, key expiry, inclusive limits, options only first, refusal back-off."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from test_curation import ScriptedScorer, collect, curator, feed, sample
from test_shared_selection import scores

from align2.server.core.curation import CurateOptions, Decision
from align2.server.core.selection import TopFraction
from align2.server.errors import InvalidArgument, Overloaded, TooManySelectionKeys


def float32(value: float) -> float:
    rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return rounded


# ---------------------------------------------------------------------------------------
# selection.py: k = ceil(fraction x n), in exact arithmetic


def test_a_fraction_times_n_that_is_whole_is_not_rounded_up_by_float_error() -> None:
    """0.07 * 100 is 7.000000000000001 in floats: the top 7% of 100 scores is 7 of them,
    not 8 (module docstring: k = ceil(fraction x n)). Fails on: dropping the - 1e-9."""
    assert 0.07 * 100 > 7
    selector = TopFraction(0.07, window=100)
    for score in range(1, 101):  # scores 1..100, the window is then full
        last = selector.add(float(score))
    assert last.threshold == 94.0  # the 7th highest of 1..100
    assert not selector.add(93.5).kept  # window 2..100 and 93.5: the 7th highest is 94


def test_a_tiny_fraction_still_keeps_the_best_score_only() -> None:
    """k is at least 1: a fraction far below 1/n keeps the highest score, not everything.
    Fails on: ``self._sorted[-k]`` without ``max(k, 1)`` (k = 0 reads the lowest score)."""
    selector = TopFraction(1e-12, window=10)
    for score in (5.0, 9.0, 1.0):
        selector.add(score)
    decision = selector.add(2.0)
    assert decision.threshold == 9.0 and not decision.kept


# ---------------------------------------------------------------------------------------
# selector.py


async def test_a_score_is_compared_with_a_given_threshold_as_float32() -> None:
    """A threshold arrives as float32 (proto float); a model score of 0.1 reported back as
    float32 equals it, so the server must keep it (module docstring of selector.py).
    Fails on: dropping ``as_float32`` in StageSelector.select."""
    threshold = float32(0.1)  # 0.10000000149011612 > 0.1
    scorer = ScriptedScorer({"s0": 0.1}, {"s0": [0.1]})
    options = CurateOptions(
        question_thresholds={"detail": threshold}, answer_thresholds={"detail": threshold}
    )
    [result] = await collect(curator(scorer).stream(feed([options, sample(0)]), None))
    assert result.decision is Decision.KEPT
    assert float32(result.scores.question_score) >= result.question_threshold


# ---------------------------------------------------------------------------------------
# selection_keys.py


async def test_retry_after_names_the_soonest_idle_key_expiry() -> None:
    """Two idle keys: the refusal of a third says when the *first* can expire.
    Fails on: ``max(expiries)`` for ``min(expiries)`` in _next_expiry."""
    curate = curator(scores(1.0, 2.0, 3.0), max_selection_keys=2, selection_key_idle_seconds=600)
    await collect(curate.stream(feed([CurateOptions(selection_key="a"), sample(0)]), None))
    await asyncio.sleep(1.0)
    await collect(curate.stream(feed([CurateOptions(selection_key="b"), sample(1)]), None))
    with pytest.raises(TooManySelectionKeys) as refused:
        await collect(curate.stream(feed([CurateOptions(selection_key="c"), sample(2)]), None))
    assert refused.value.retry_after is not None
    assert refused.value.retry_after < 599.5  # "a" expires about 1 s before "b"


async def test_a_key_used_again_lives_its_ttl_after_the_last_stream_not_the_first() -> None:
    """A key released, taken again and released again expires a TTL after the second
    release. Fails on: acquire() not cancelling the pending expiry of the idle key."""
    curate = curator(scores(1.0, 2.0), selection_key_idle_seconds=1.0)
    options = CurateOptions(selection_key="k")
    start = time.monotonic()
    await collect(curate.stream(feed([options, sample(0)]), None))  # expiry ~ start + 1.0
    await asyncio.sleep(max(0.0, start + 0.5 - time.monotonic()))
    await collect(curate.stream(feed([options, sample(1)]), None))  # expiry ~ start + 1.5
    await asyncio.sleep(max(0.0, start + 1.25 - time.monotonic()))
    assert "k" in curate.selection_keys  # the first expiry no longer counts
    await asyncio.sleep(max(0.0, start + 1.5 - time.monotonic()) + 0.5)
    assert "k" not in curate.selection_keys


# ---------------------------------------------------------------------------------------
# curation.py: limits are inclusive, options only first


async def test_a_selection_key_of_exactly_the_maximum_length_is_accepted() -> None:
    """MAX_NAME_LENGTH (256) is the longest key allowed. Fails on: ``>=`` for ``>``."""
    curate = curator(scores(1.0, 2.0))
    [ok] = await collect(
        curate.stream(feed([CurateOptions(selection_key="k" * 256), sample(0)]), None)
    )
    assert ok.error is None
    refusal = r"257 characters exceeds limits\.max_name_length 256"
    with pytest.raises(InvalidArgument, match=refusal):
        await collect(
            curate.stream(feed([CurateOptions(selection_key="k" * 257), sample(1)]), None)
        )


async def test_exactly_max_seed_scores_are_accepted() -> None:
    """limits.max_seed_scores is the most seeds a stream may bring. Fails on: ``>=``."""
    curate = curator(scores(1.0, 2.0), max_seed_scores=4)
    options = CurateOptions(
        question_seed_scores={"detail": [1.0, 2.0]}, answer_seed_scores={"detail": [0.0, 1.0]}
    )
    [ok] = await collect(curate.stream(feed([options, sample(0)]), None))
    assert ok.error is None and ok.question_window_size == 3
    too_many = CurateOptions(question_seed_scores={"detail": [1.0, 2.0, 3.0, 4.0, 5.0]})
    with pytest.raises(InvalidArgument, match="5 seed scores"):
        await collect(curate.stream(feed([too_many, sample(1)]), None))


async def test_too_many_seeds_name_the_field_that_carries_them() -> None:
    """The limit counts both stages; the refusal names the field holding the most seeds
    (it named question_seed_scores even when only answer seeds were sent)."""
    curate = curator(scores(1.0, 2.0), max_seed_scores=2)
    answers = CurateOptions(answer_seed_scores={"detail": [1.0, 2.0, 3.0]})
    with pytest.raises(InvalidArgument, match=r"^options\.answer_seed_scores: 3 seed scores"):
        await collect(curate.stream(feed([answers, sample(0)]), None))
    both = CurateOptions(
        question_seed_scores={"detail": [1.0, 2.0]}, answer_seed_scores={"detail": [1.0]}
    )
    with pytest.raises(InvalidArgument, match=r"^options\.question_seed_scores: 3 seed scores"):
        await collect(curate.stream(feed([both, sample(1)]), None))


async def test_options_as_the_second_message_fail_the_stream() -> None:
    """Only the first message may carry options, also right after one sample.
    Fails on: ``position > 1`` for ``position > 0``."""
    scorer = ScriptedScorer({"s0": 1.0}, {})
    seen: list[str] = []
    stream = curator(scorer).stream(feed([sample(0), CurateOptions()]), None)
    with pytest.raises(InvalidArgument, match="options: message 1 carries options"):
        async for result in stream:
            seen.append(result.id)
    assert seen == ["s0"]


class RefusingScorer(ScriptedScorer):
    """Refuses the first ``refusals`` calls asking the caller to wait ``retry_after``."""

    def __init__(self, retry_after: float, refusals: int) -> None:
        super().__init__({"s0": 1.0}, {})
        self.retry_after = retry_after
        self.left = refusals

    async def score_sample(self, work, head, priority, deadline) -> None:  # type: ignore[no-untyped-def]
        if self.left:
            self.left -= 1
            raise Overloaded("samples: queue full", retry_after=self.retry_after)
        await super().score_sample(work, head, priority, deadline)


async def test_a_refusal_is_retried_no_sooner_than_its_retry_after() -> None:
    """The queue's retry_after is a floor for the backoff (curation._when_admitted).
    Fails on: the backoff ignoring ``exc.retry_after``."""
    scorer = RefusingScorer(retry_after=0.2, refusals=3)
    start = time.monotonic()
    [result] = await collect(curator(scorer).stream(feed([sample(0)]), None))
    assert result.decision is Decision.KEPT
    assert time.monotonic() - start >= 0.6
