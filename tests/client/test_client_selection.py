"""The exact selection against a direct transcription of the reference's post-processing
(tests/reference_selection.py), on random scores full of ties."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from reference_selection import TASKS, reference_curate, reference_curate_examples

from align2.client import choose_candidates, offline
from align2.client.llava import record_from_sample, sample_from_record
from align2.client.selection import (
    best_candidate,
    best_candidates,
    conversation_score,
    describe,
    keep_count,
    merge,
    quantile,
    select_task,
    top_fraction,
)

# ---------------------------------------------------------------------------------------
# Random data sets: per task type, records with 1-3 turns and scores from a few values.


def make_task(rng: random.Random, task: str, n: int) -> dict[str, Any]:
    records, question, answers = [], [], []
    for i in range(n):
        turns = rng.randint(1, 3)
        conversations = []
        for t in range(turns):
            conversations += [
                {"from": "human", "value": f"{task} {i} question {t}"},
                {"from": "gpt", "value": f"answer {t}"},
            ]
        records.append(
            {"id": f"{task}-{i}", "image": f"{task}-{i}.jpg", "conversations": conversations}
        )
        # Few distinct values: ties everywhere, in both stages.
        question.append(rng.choice([-1.0, 0.0, 0.25, 0.5, 2.0]))
        answers.append([rng.choice([-0.5, 0.0, 0.5, 1.0]) for _ in range(turns)])
    return {"records": records, "question": question, "answers": answers}


def run_ours(data: dict[str, dict[str, Any]], a: float, b: float) -> list[str]:
    kept = {}
    for task, d in data.items():
        answers = dict(enumerate(d["answers"]))
        selection = select_task(d["question"], answers, a, b)
        kept[task] = [d["records"][i]["id"] for i in selection.answer_kept]
    return merge(kept)


@pytest.mark.parametrize("seed", range(60))
def test_the_selection_is_the_reference_on_random_scores_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    # Sizes where int(0.3 N) is 0 (N <= 3), 1 (N 4..6), and larger; per task type.
    sizes = [rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 10, 14, 20, 37, 64]) for _ in TASKS]
    data = {task: make_task(rng, task, n) for task, n in zip(TASKS, sizes, strict=True)}
    a, b = rng.choice([(0.3, 0.3), (0.5, 0.5), (0.3, 1.0), (1.0, 0.3), (0.7, 0.2)])
    assert run_ours(data, a, b) == reference_curate(data, a, b)


def make_task_with_candidates(rng: random.Random, task: str, n: int, repeat: int) -> dict[str, Any]:
    """As make_task, with ``repeat`` candidate answers per turn (rank_answers.py's
    --repeat-times): a list-valued gpt (with one candidate, sometimes a plain string)."""
    records, question, answers = [], [], []
    for i in range(n):
        conversations: list[dict[str, Any]] = []
        turn_scores: list[Any] = []
        for t in range(rng.randint(1, 3)):
            candidates = [f"answer {t}.{j}" for j in range(repeat)]
            listed = repeat > 1 or rng.random() < 0.5
            conversations += [
                {"from": "human", "value": f"{task} {i} question {t}"},
                {"from": "gpt", "value": candidates if listed else candidates[0]},
            ]
            scores = [rng.choice([-0.5, 0.0, 0.5, 1.0]) for _ in range(repeat)]  # ties
            turn_scores.append(scores if listed else scores[0])
        # The reference names its output by the image: the id is the image's stem here.
        records.append(
            {"id": f"{task}-{i}", "image": f"{task}-{i}.jpg", "conversations": conversations}
        )
        question.append(rng.choice([-1.0, 0.0, 0.25, 0.5, 2.0]))
        answers.append(turn_scores)
    return {"records": records, "question": question, "answers": answers}


def run_ours_with_candidates(data: dict[str, dict[str, Any]], a: float, b: float) -> list[Any]:
    """Our selection, and each kept record as the offline command writes it: read, each
    turn's best candidate chosen, written back."""
    kept = {}
    for task, d in data.items():
        selection = select_task(d["question"], dict(enumerate(d["answers"])), a, b)
        kept[task] = [
            record_from_sample(
                choose_candidates(
                    sample_from_record(d["records"][i], i), best_candidates(d["answers"][i])
                )
            )
            for i in selection.answer_kept
        ]
    return [(r["id"], r["conversations"]) for r in merge(kept)]


@pytest.mark.parametrize("seed", range(60))
def test_candidates_are_chosen_and_ranked_as_the_reference_does(seed: int) -> None:
    """Best-of-n: the kept conversations, in order, with the best candidate as each turn's
    answer, are rank_answers.py's (--repeat-times n) on random scores full of ties."""
    rng = random.Random(1000 + seed)
    repeat = rng.choice([1, 2, 3, 4])
    sizes = [rng.choice([0, 1, 4, 7, 10, 20, 37]) for _ in TASKS]
    data = {
        task: make_task_with_candidates(rng, task, n, repeat)
        for task, n in zip(TASKS, sizes, strict=True)
    }
    a, b = rng.choice([(0.3, 0.3), (0.5, 0.5), (1.0, 0.3), (0.7, 0.2), (1.0, 1.0)])
    expected = [
        (e["id"], e["conversations"]) for e in reference_curate_examples(data, a, b, repeat)
    ]
    assert run_ours_with_candidates(data, a, b) == expected


def test_the_best_candidate_is_the_highest_and_the_first_of_equal_highest() -> None:
    assert best_candidate([0.5, 2.0, 1.0]) == 1
    assert best_candidate([1.0, 2.0, 2.0, -1.0]) == 1  # the reference's stable sort
    assert best_candidate([3.0]) == 0
    assert best_candidate([math.nan, 1.0]) == 1 and best_candidate([1.0, math.nan, 1.0]) == 0
    with pytest.raises(ValueError, match="at least one candidate"):
        best_candidate([])
    assert best_candidates([0.5, (1.0, 3.0, 3.0), (2.0,)]) == [0, 1, 0]
    # A turn's score in the conversation's is its best candidate's.
    assert conversation_score([0.5, (1.0, 3.0, 3.0), (2.0,)]) == (0.5 + 3.0 + 2.0) / 3


def test_the_default_fractions_keep_nothing_below_the_reference_minimum() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3):  # int(0.3 N) = 0
        data = {task: make_task(rng, task, n) for task in TASKS}
        assert run_ours(data, 0.3, 0.3) == reference_curate(data, 0.3, 0.3) == []
    data = {task: make_task(rng, task, 14) for task in TASKS}  # 4 survive stage 1, 1 stage 2
    kept = run_ours(data, 0.3, 0.3)
    assert kept == reference_curate(data, 0.3, 0.3) and len(kept) == 3


def test_ties_keep_input_order() -> None:
    assert top_fraction([1.0] * 10, 0.3) == [0, 1, 2]
    assert top_fraction([0.0, 1.0, 0.0, 1.0, 1.0], 0.6) == [1, 3, 4]
    # Stage 2 ties keep stage 1's rank order, not input order.
    selection = select_task([0.0, 2.0, 1.0, 3.0], {1: [1.0], 2: [5.0], 3: [1.0]}, 0.75, 2 / 3)
    assert selection.question_kept == [3, 1, 2]
    assert selection.answer_kept == [2, 3]


def test_the_cut_is_the_reference_float_arithmetic() -> None:
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 is 3.0 exactly
    assert keep_count(0.07, 100) == 7  # 7.000000000000001: int() gives 7 (a ceil would give 8)
    assert keep_count(0.29, 100) == 28  # 28.999999999999996, rounded down as int() does
    assert keep_count(0.3, 3) == 0 and keep_count(0.3, 4) == 1
    with pytest.raises(ValueError, match="not in"):
        keep_count(1.5, 10)


def test_conversation_score_sums_then_divides() -> None:
    turns = [0.1, 0.2, 0.3]
    total = 0.0
    for score in turns:
        total += score
    assert conversation_score(turns) == total / 3  # not statistics.fmean's rounding
    with pytest.raises(ValueError):
        conversation_score([])


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="score 1 is NaN"):
        top_fraction([0.0, math.nan], 0.5)


def test_merge_orders_task_types_by_name_as_the_reference() -> None:
    assert merge({"detail": ["d"], "complex_reasoning": ["c1", "c2"], "conversation": []}) == [
        "c1",
        "c2",
        "d",
    ]


def test_describe() -> None:
    summary = describe([4.0, 1.0, 3.0, 2.0, 5.0], kept=[5.0, 4.0])
    assert (summary.minimum, summary.q1, summary.median, summary.q3, summary.maximum) == (
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
    )
    assert summary.threshold == 4.0
    assert quantile([1.0, 2.0], 0.25) == 1.25
    empty = describe([], [])
    assert empty.count == 0 and empty.minimum is None and empty.threshold is None


def test_describe_one_score() -> None:
    """A task with one score (a tiny file) has a summary. Fails on: quantile's high index
    not clamped (IndexError)."""
    summary = describe([2.5], [2.5])
    assert (summary.minimum, summary.q1, summary.median, summary.q3, summary.maximum) == (
        2.5,
        2.5,
        2.5,
        2.5,
        2.5,
    )


def test_a_keep_fraction_of_zero_is_allowed() -> None:
    """check_fraction's range is [0, 1]. Fails on: refusing 0."""
    assert keep_count(0.0, 10) == 0
    assert offline.OfflineSettings(question_keep=0.0, answer_keep=0.0).question_keep == 0.0
