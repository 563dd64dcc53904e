"""Planning shared prefixes in a reward batch (backends/prefixes.py), on plain id lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given
from hypothesis import strategies as st

from align2.server.backends import prefixes


@dataclass
class Item:
    input_ids: torch.Tensor
    image_key: bytes
    image_end: int


def item(ids: list[int], key: bytes = b"img", image_end: int = 3) -> Item:
    return Item(torch.tensor(ids), key, image_end)


def test_turns_of_one_image_share_the_prefix_past_the_image() -> None:
    # BOS, two image ids, then "Question:" (7) and each turn's own text.
    batch = [item([1, 9, 9, 7, 20, 21]), item([1, 9, 9, 7, 30]), item([1, 9, 9, 7, 20, 22, 23])]
    assert prefixes.plan(batch) == [prefixes.Group((0, 1, 2), 4)]


def test_other_images_and_lone_inputs_run_whole_together() -> None:
    batch = [
        item([1, 9, 9, 7, 20], b"a"),
        item([1, 8, 8, 7, 20], b"b"),  # its image alone: nothing to share
        item([1, 9, 9, 7, 30], b"a"),
        item([1, 5, 6], b"", 0),  # no image
    ]
    assert prefixes.plan(batch) == [
        prefixes.Group((0, 2), 4),
        prefixes.Group((1, 3), 0),
    ]


def test_a_prefix_must_cover_the_whole_image() -> None:
    # Same key, but the ids differ inside the image span (cannot happen for equal images;
    # the plan must still never cut an image in two).
    batch = [item([1, 9, 9, 7]), item([1, 9, 8, 7])]
    assert prefixes.plan(batch) == [prefixes.Group((0, 1), 0)]


def test_an_input_that_is_the_prefix_of_another_keeps_its_last_id() -> None:
    batch = [item([1, 9, 9, 7, 20]), item([1, 9, 9, 7, 20, 21])]
    [group] = prefixes.plan(batch)
    assert group.prefix == 4  # input 0's remainder is [20]: its own last position


@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b""]), st.lists(st.integers(0, 3), max_size=6)),
        min_size=1,
        max_size=12,
    )
)
def test_every_input_is_planned_once_and_every_remainder_is_nonempty(
    rows: list[tuple[bytes, list[int]]],
) -> None:
    batch = [item([1, 9, 9, *tail], key, 3 if key else 0) for key, tail in rows]
    groups = prefixes.plan(batch)
    members = [i for g in groups for i in g.members]
    assert sorted(members) == list(range(len(batch)))
    for group in groups:
        if group.prefix:
            ids = [batch[i].input_ids for i in group.members]
            assert len(group.members) >= 2
            assert all(len(x) > group.prefix >= 3 for x in ids)
            assert all(torch.equal(x[: group.prefix], ids[0][: group.prefix]) for x in ids)
            assert len({batch[i].image_key for i in group.members}) == 1
