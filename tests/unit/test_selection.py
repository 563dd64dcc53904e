"""Online top-fraction selection against a brute-force ranking written here."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from align2.server.core.selection import TaskSelectors, TopFraction, Window

scores = st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=80)
fractions = st.floats(0.01, 1.0)
windows = st.integers(1, 30)


@given(scores, fractions, windows)
def test_each_decision_ranks_the_score_among_the_last_window_scores(
    values: list[float], fraction: float, window: int
) -> None:
    selector = TopFraction(fraction, window)
    for i, score in enumerate(values):
        recent = values[max(0, i + 1 - window) : i + 1]  # itself included
        k = max(1, math.ceil(fraction * len(recent) - 1e-9))
        expected_threshold = sorted(recent, reverse=True)[k - 1]
        selection = selector.add(score)
        assert selection.threshold == expected_threshold
        assert selection.kept == (score >= expected_threshold)
    assert len(selector) == min(len(values), window)


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=200, max_size=200, unique=True))
def test_a_full_window_of_distinct_scores_keeps_the_fraction(values: list[float]) -> None:
    """Scored in a random order, then again: the second pass sees the full window, and
    keeps exactly the top 30% of it."""
    selector = TopFraction(0.3, window=len(values))
    for score in values:
        selector.add(score)
    top = set(sorted(values, reverse=True)[:60])
    # Re-adding evicts the oldest and adds the same value: the window's content is unchanged.
    kept = {score for score in values if selector.add(score).kept}
    assert kept == top


def test_the_first_score_of_a_task_is_kept_and_tasks_do_not_mix() -> None:
    selectors = TaskSelectors(0.3, window=100)
    assert selectors.add("detail", 5.0).kept
    assert not selectors.add("detail", 1.0).kept
    assert selectors.add("conversation", 1.0).kept  # its own task: the first one
    assert selectors.add("detail", 7.0).threshold == 7.0


@pytest.mark.parametrize(("fraction", "window"), [(0.0, 10), (1.5, 10), (0.3, 0)])
def test_bad_settings_are_refused_naming_them(fraction: float, window: int) -> None:
    with pytest.raises(ValueError, match=r"fraction|window"):
        TaskSelectors(fraction, window)


def test_nan_cannot_be_ranked() -> None:
    with pytest.raises(ValueError, match="NaN"):
        TopFraction(0.3, 10).add(float("nan"))


def test_a_full_window_holds_about_16_bytes_a_score() -> None:
    """Many windows live at once (task types x stages x selections). Fails on: scores kept
    as float objects in a deque and a list (about 48 bytes each)."""
    tracemalloc.start()
    try:
        window = Window(10_000)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(25_000):
            window.add((i * 7919 % 10_007) / 13.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(window) == 10_000
    assert used < 20 * 10_000


@given(scores, scores, windows, fractions)
def test_a_window_extended_at_once_equals_one_fed_score_by_score(
    first: list[float], seeds: list[float], window: int, fraction: float
) -> None:
    """extend (seeds: one sort) leaves the window as adding each score in order would, also
    after it has wrapped, and the window goes on evicting in arrival order."""
    extended, added = Window(window), Window(window)
    for score in first:
        extended.add(score)
        added.add(score)
    extended.extend(seeds)
    for score in seeds:
        added.add(score)
    for score in [*first, 0.5]:
        assert len(extended) == len(added)
        assert extended.threshold(fraction) == added.threshold(fraction)
        extended.add(score)
        added.add(score)
