"""Length-aware batches: a padded batch of very different lengths runs as a few forwards of
neighbouring lengths.

A right-padded forward computes every row to the longest row's length, so a batch that
mixes a one-question conversation with a ten-question one pays for the padding of every
short row. Splitting costs one more forward each time (launch and weight-reading time that
does not shrink with the rows). This module only plans: it sorts the lengths and cuts them
into contiguous groups that minimise the padded tokens plus ``overhead`` tokens per group
(a dynamic programme over the sorted lengths, exact for this cost). Scores stay the same
within float rounding: each input's score depends on its own ids only (the backend's
contract); only the padded width of its forward changes.
"""

from __future__ import annotations

from collections.abc import Sequence

BY_DEVICE = {"cpu": 64, "cuda": 512}
"""``length_split_tokens = -1``: 64 measured on a CPU (bench/length_split.py); 512 on a GPU
is an estimate (one more forward of a 7B model re-reads 14 GB of weights and launches
every layer's kernels again), not measured."""


def overhead(setting: int, device_type: str) -> int:
    """The tokens one more forward must save: ``setting``, or by device when it is -1."""
    return setting if setting >= 0 else BY_DEVICE.get(device_type, BY_DEVICE["cuda"])


def split(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Indices into ``lengths`` in groups, shortest first, each group sorted by length;
    one group (all indices, in order) when ``overhead`` <= 0 or nothing is saved."""
    count = len(lengths)
    if overhead <= 0 or count < 2:
        return [list(range(count))]
    order = sorted(range(count), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    # best[j]: the least cost of the first j sorted rows; cut[j]: where its last group starts.
    best = [0] + [0] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = sizes[end - 1]
        best[end], cut[end] = min(
            (best[start] + (end - start) * longest + overhead, start) for start in range(end)
        )
    groups = []
    end = count
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    if len(groups) == 1:
        return [list(range(count))]
    return groups[::-1]


def padded_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """What the forwards of ``groups`` compute: each group's rows times its longest."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
