"""Length-aware batches: the plan of backends/length_groups.py."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from align2.server.backends.length_groups import overhead, padded_tokens, split

lengths_lists = st.lists(st.integers(1, 3000), min_size=1, max_size=9)


def brute_force(lengths: list[int], overhead: int) -> int:
    """The least padded tokens plus overhead per forward over every way to cut the sorted
    lengths into contiguous groups (2**(n-1) of them)."""
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        groups, current = [], [ordered[0]]
        for length, cut in zip(ordered[1:], cuts, strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(length)
        groups.append(current)
        cost = sum(len(g) * max(g) + overhead for g in groups)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@given(lengths_lists, st.integers(1, 5000))
def test_the_plan_covers_every_input_once_at_the_least_cost(
    lengths: list[int], overhead: int
) -> None:
    groups = split(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(groups)
    cost = padded_tokens(lengths, groups) + overhead * len(groups)
    assert cost <= len(lengths) * max(lengths) + overhead  # never worse than one forward
    assert cost == brute_force(lengths, overhead)
    flat = [lengths[i] for g in groups for i in g]
    assert len(groups) == 1 or flat == sorted(flat)  # shortest group first, each sorted


@given(lengths_lists)
def test_off_or_nothing_saved_keeps_the_batch_whole_and_in_order(lengths: list[int]) -> None:
    whole = [list(range(len(lengths)))]
    assert split(lengths, 0) == whole
    assert split(lengths, 10**9) == whole  # no split saves that much
    assert split([600] * len(lengths), 1) == whole  # equal lengths: nothing to save


def test_a_mixed_batch_splits_where_the_padding_is() -> None:
    # Eight short inputs (a one-question conversation) and two long ones (ten questions).
    lengths = [600] * 4 + [1400, 610] + [600] * 2 + [1390, 605]
    groups = split(lengths, 512)
    assert groups == [[0, 1, 2, 3, 6, 7, 9, 5], [8, 4]]
    assert padded_tokens(lengths, groups) == 8 * 610 + 2 * 1400  # 7680 instead of 14000


def test_the_default_threshold_follows_the_device() -> None:
    assert overhead(-1, "cpu") == 64
    assert overhead(-1, "cuda") == 512
    assert overhead(0, "cuda") == 0  # off stays off
    assert overhead(200, "cpu") == 200
