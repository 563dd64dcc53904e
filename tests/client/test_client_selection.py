"""The exact selection against a direct transcription of the reference's post-processing
(tests/reference_selection.py), on random scores full of ties."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from reference_selection import TASKS, reference_curate

from align2.client.selection import (
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
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004
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
