"""The human preference files as groups of rendered reward inputs; pairs; the split.

A **group** is what the method ranks within: one image's candidate question sets
(question files) or one ``gpt`` turn's candidate answers (answer files). Each candidate is
rendered with the server's own templates (align2.server.core.templates), so a feature row
is exactly what the server would score. Identical renderings share one row.

Pairs (the method's): within a group, every two candidates whose human scores differ,
oriented (better, worse); ties give no pair.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from align2.client.types import Turn
from align2.server.core import templates


@dataclass(frozen=True)
class Group:
    """One ranking unit: candidates (rows of their set's ``texts``) and human scores."""

    image: str
    """The image id: the unit of the train/validation split."""
    rows: tuple[int, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class PreferenceSet:
    """One preference file for one head: unique rendered inputs and the groups over them."""

    head: str
    """question | answer."""
    name: str
    """The file's name, e.g. ``question-train.json``."""
    sha256: str
    """Of the file's bytes: a cached feature matrix belongs to exactly this file."""
    texts: tuple[str, ...]
    groups: tuple[Group, ...]

    def subset(self, groups: Sequence[Group]) -> PreferenceSet:
        """The same rows (features stay shared) with only ``groups``."""
        return PreferenceSet(self.head, self.name, self.sha256, self.texts, tuple(groups))


def load(path: pathlib.Path, head: str) -> PreferenceSet:
    """Read a question file (``head="question"``) or an answer file (``"answer"``).

    Schemas: see the data folder's README. Raises ValueError for an unknown head or a
    candidate list whose length differs from its score list.
    """
    readers: dict[str, Callable[[Any], Iterator[tuple[str, list[str], list[float]]]]] = {
        "question": _question_units,
        "answer": _answer_units,
    }
    if head not in readers:
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(readers)}")
    raw = path.read_bytes()
    index: dict[str, int] = {}
    groups = []
    for image, texts, scores in readers[head](json.loads(raw)):
        if len(texts) != len(scores):
            raise ValueError(
                f"{path}: image {image}: {len(texts)} candidates, {len(scores)} scores"
            )
        rows = tuple(index.setdefault(text, len(index)) for text in texts)
        groups.append(Group(image, rows, tuple(float(s) for s in scores)))
    return PreferenceSet(
        head, path.name, hashlib.sha256(raw).hexdigest(), tuple(index), tuple(groups)
    )


def _question_units(data: Any) -> Iterator[tuple[str, list[str], list[float]]]:
    """One unit per group; a candidate is a list of questions (the conversation's turns)."""
    for group in data:
        texts = [
            templates.question_text([Turn(q) for q in candidate])
            for candidate in group["questions"]
        ]
        yield group["id"], texts, group["score"]


def _answer_units(data: Any) -> Iterator[tuple[str, list[str], list[float]]]:
    """One unit per ``gpt`` turn, rendered with its own question only (the method's)."""
    for record in data:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            texts = [templates.answer_text(Turn(human["value"], a)) for a in gpt["value"]]
            yield record["id"], texts, gpt["score"]


def pairs(groups: Sequence[Group]) -> torch.Tensor:
    """``[P, 2]`` rows (better, worse) of every strictly ordered pair within each group."""
    found = [
        (a, b) if sa > sb else (b, a)
        for group in groups
        for i, (a, sa) in enumerate(zip(group.rows, group.scores, strict=True))
        for b, sb in zip(group.rows[i + 1 :], group.scores[i + 1 :], strict=True)
        if sa != sb
    ]
    return torch.tensor(found, dtype=torch.long).reshape(-1, 2)


def split_by_image(
    groups: Sequence[Group], fraction: float, seed: int
) -> tuple[list[Group], list[Group]]:
    """(train, validation): a ``fraction`` of the images and all their groups held out.

    Deterministic and independent of file order: images are ranked by a seeded hash of
    their id, so a group never straddles the split and a rerun holds out the same images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} is not in (0, 1)")
    images = sorted({g.image for g in groups}, key=lambda i: _rank(seed, i))
    held = set(images[: max(1, round(fraction * len(images)))])
    return [g for g in groups if g.image not in held], [g for g in groups if g.image in held]


def folds_by_image(groups: Sequence[Group], folds: int, seed: int) -> list[list[Group]]:
    """``folds`` disjoint parts of ``groups``, by image, for k-fold cross-validation.

    Images are ranked by the same seeded hash as :func:`split_by_image` and dealt out in
    turn, so every image (and all its groups) is in exactly one fold, the folds differ by
    at most one image, and a rerun deals the same folds whatever the file order.
    """
    images = sorted({g.image for g in groups}, key=lambda i: _rank(seed, i))
    if not 2 <= folds <= len(images):
        raise ValueError(f"folds {folds} is not in [2, {len(images)}] (the images)")
    fold_of = {image: n % folds for n, image in enumerate(images)}
    return [[g for g in groups if fold_of[g.image] == k] for k in range(folds)]


def _rank(seed: int, image: str) -> str:
    return hashlib.sha256(f"{seed}:{image}".encode()).hexdigest()
