"""Shared prefixes in a reward batch: inputs that carry the same image and begin with the same
ids (the turns of one conversation, the candidate answers of one turn: ``<BOS> <image
tokens> \\nQuestion: ...``) run that prefix once and only their own remainders after it.

The models are causal: the prefix's keys and values do not depend on what follows it, so
running it once (batch 1, with the image), repeating its cache over the group and running
each input's remainder against it gives each input's hidden states, and so its score, within
float rounding of the whole input run alone (tests/backend/test_prefix_sharing.py).

This module only plans: which inputs form a group and how long their shared prefix is. A
prefix always covers the whole image span (BOS and the image expansion), so a remainder
holds text only; every remainder keeps at least one id, whose hidden state is the one
pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Shareable(Protocol):
    input_ids: torch.Tensor  # [L]
    image_key: bytes  # a digest of the image tensors; b"" for none
    image_end: int  # ids before this index are BOS and the image expansion


@dataclass(frozen=True)
class Group:
    """Inputs (indices into the batch) run as one shared prefix of ``prefix`` ids and their
    remainders; ``prefix`` 0: run as usual, whole (with the batch's other plain inputs)."""

    members: tuple[int, ...]
    prefix: int


def plan(inputs: Sequence[Shareable], min_group: int = 2) -> list[Group]:
    """Groups covering every index once, in a deterministic order: one group per image
    whose inputs share a prefix past the image (``min_group`` or more inputs), then one
    group (prefix 0) of everything else, if any."""
    by_image: dict[bytes, list[int]] = {}
    plain: list[int] = []
    for index, item in enumerate(inputs):
        if item.image_key and item.image_end > 0:
            by_image.setdefault(item.image_key, []).append(index)
        else:
            plain.append(index)
    groups = []
    for members in by_image.values():
        prefix = shared_prefix([inputs[i].input_ids for i in members])
        if len(members) >= min_group and prefix >= max(inputs[i].image_end for i in members):
            groups.append(Group(tuple(members), prefix))
        else:
            plain.extend(members)
    if plain:
        groups.append(Group(tuple(sorted(plain)), 0))
    return groups


def shared_prefix(sequences: Sequence[torch.Tensor]) -> int:
    """The longest common prefix of 1-D id tensors, less one id where it would swallow a
    whole sequence: every remainder keeps its last id."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0][:shortest]
    same = torch.ones(shortest, dtype=torch.bool)
    for other in sequences[1:]:
        same &= other[:shortest] == first
    differ = (~same).nonzero()
    common = int(differ[0]) if len(differ) else shortest
    return min(common, shortest - 1)
