"""Preference files -> groups, pairs, the split by image, and the method's metric."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from align2.client.types import Turn
from align2.server.core import templates
from align2.server.training import data
from align2.server.training.evaluate import length_scores, pairwise_accuracy


def group(image: str, scores: list[float], first_row: int = 0) -> data.Group:
    rows = tuple(range(first_row, first_row + len(scores)))
    return data.Group(image, rows, tuple(scores))


def test_pairs_are_oriented_better_first_and_ties_give_none() -> None:
    pairs = data.pairs([group("a", [0.5, 0.9, 0.5, 0.1])])
    assert sorted(map(tuple, pairs.tolist())) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_pairs_stay_within_groups() -> None:
    pairs = data.pairs([group("a", [0.2, 0.8]), group("b", [0.9, 0.1], first_row=2)])
    assert sorted(map(tuple, pairs.tolist())) == [(1, 0), (2, 3)]
    assert data.pairs([group("a", [0.7, 0.7, 0.7])]).shape == (0, 2)


def test_pairwise_accuracy_counts_agreeing_pairs_and_ties_as_wrong() -> None:
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 2]])
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0])  # right, right, wrong, tie
    assert pairwise_accuracy(scores, pairs) == 0.5
    assert math.isnan(pairwise_accuracy(scores, torch.empty(0, 2, dtype=torch.long)))


def test_question_file_renders_the_server_template_and_shares_identical_inputs(
    tmp_path: pathlib.Path,
) -> None:
    groups = [
        {
            "id": "1",
            "image": "1.jpg",
            "questions": [["<image>\nA?", " B? "], ["C?"]],
            "score": [0.1, 0.2],
        },
        {"id": "2", "image": "2.jpg", "questions": [["C?"], ["D?\n<image>"]], "score": [0.3, 0.3]},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(groups))
    loaded = data.load(path, "question")
    assert loaded.texts == ("<image>\nA?\nB?", "<image>\nC?", "<image>\nD?")
    assert loaded.texts[0] == templates.question_text([Turn("<image>\nA?"), Turn(" B? ")])
    assert [g.rows for g in loaded.groups] == [(0, 1), (1, 2)]
    assert [g.image for g in loaded.groups] == ["1", "2"]
    assert len(loaded.sha256) == 64


def test_answer_file_gives_one_group_per_turn(preference_dir: pathlib.Path) -> None:
    loaded = data.load(preference_dir / "answer-dev.json", "answer")
    assert len(loaded.groups) == 15  # 10 records, every other one with two turns
    assert [g.image for g in loaded.groups[:3]] == ["000000000000", "000000000001", "000000000001"]
    first = loaded.groups[0]
    assert loaded.texts[first.rows[0]] == templates.answer_text(
        Turn("<image>\nWhat is on the table?", "A cup. (0)")
    )
    assert first.scores == (0.3, 0.9, 0.5)


def test_unknown_head_and_mismatched_scores_are_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"id": "1", "questions": [["A?"]], "score": [0.1, 0.2]}]))
    with pytest.raises(ValueError, match="1 candidates, 2 scores"):
        data.load(path, "question")
    with pytest.raises(ValueError, match="unknown head"):
        data.load(path, "caption")


def test_split_holds_out_whole_images_deterministically() -> None:
    groups = [group(f"img{i // 2}", [0.1, 0.9], first_row=2 * i) for i in range(40)]
    train, val = data.split_by_image(groups, 0.25, seed=0)
    assert len(val) == 10  # 5 of 20 images, both groups of each
    assert {g.image for g in train}.isdisjoint(g.image for g in val)
    again = data.split_by_image(list(reversed(groups)), 0.25, seed=0)[1]
    assert {g.image for g in again} == {g.image for g in val}  # file order does not matter
    other = data.split_by_image(groups, 0.25, seed=1)[1]
    assert {g.image for g in other} != {g.image for g in val}
    with pytest.raises(ValueError, match="fraction"):
        data.split_by_image(groups, 1.0, seed=0)


def test_folds_deal_out_whole_images_deterministically() -> None:
    groups = [group(f"img{i // 2}", [0.1, 0.9], first_row=2 * i) for i in range(22)]  # 11
    folds = data.folds_by_image(groups, 3, seed=0)
    assert sorted(len({g.image for g in f}) for f in folds) == [3, 4, 4]
    assert sorted(g.rows for f in folds for g in f) == sorted(g.rows for g in groups)
    for k, fold in enumerate(folds):  # an image's groups are all in one fold
        others = {g.image for j, f in enumerate(folds) if j != k for g in f}
        assert others.isdisjoint(g.image for g in fold)
    again = data.folds_by_image(list(reversed(groups)), 3, seed=0)
    assert [{g.image for g in f} for f in again] == [{g.image for g in f} for f in folds]
    other = data.folds_by_image(groups, 3, seed=1)
    assert [{g.image for g in f} for f in other] != [{g.image for g in f} for f in folds]
    for bad in (1, 12):
        with pytest.raises(ValueError, match=rf"folds {bad} is not in \[2, 11\]"):
            data.folds_by_image(groups, bad, seed=0)


def test_longer_is_better_orders_by_rendered_length() -> None:
    scores = length_scores(["<image>\nshort", "<image>\na longer one"])
    assert pairwise_accuracy(scores, torch.tensor([[1, 0]])) == 1.0
