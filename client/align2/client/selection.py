"""The method's selection on a finite data set, as its reference code does it.

Pure functions over scores (no I/O, no grpc), so that the exact procedure can be checked on
its own. The reference is DCDmllm/Align2LLaVA ``reward_model/post_process/``:

- ``rank_questions.py``: ``scores.sort(key=lambda x: x['score'], reverse=True)`` over the
  question scores of one task type's file, then keeps ``scores[:int(args.keep_ratio *
  len(scores))]``, in that (descending) order.
- ``rank_answers.py``: walks the answer scores in the order of that output; a
  conversation's score starts at ``0.``, adds each turn's score in turn order and is
  divided by the number of turns; then ``keep_anns.sort(key=lambda x: x['score'],
  reverse=True)`` and ``keep_anns[:int(len(keep_anns) * args.keep_ratio)]``. With
  ``--repeat-times`` n, each turn has n scored candidate answers (a ``gpt`` value that is
  a list); per turn ``turn_scores.sort(key=lambda x: x['score'], reverse=True)``, and
  ``turn_scores[0]`` is the best: its answer becomes the turn's ``gpt`` value and its
  score is what the conversation's score adds.
- ``merge_final.py``: concatenates the task types in the order ``['complex_reasoning',
  'conversation', 'detail']``.

Ties: Python's sort is stable, also with ``reverse=True``, so the reference breaks ties by
the order of its score file, which for a single-process run is the input order (stage 1)
and the stage-1 output order (stage 2), and within a turn the candidates' order (the best
of equal highest scores is the first candidate). The functions here make that explicit:
equal scores keep their input order. Task types merge in sorted name order, which for
LLaVA-Instruct-158K's three types is the reference's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

DEFAULT_KEEP = 0.3


def keep_count(fraction: float, candidates: int) -> int:
    """How many of ``candidates`` the reference keeps: ``int(fraction * candidates)``
    (rounded down, so 0 when ``fraction * candidates < 1``)."""
    check_fraction(fraction)
    return int(fraction * candidates)


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"keep fraction {fraction} is not in [0, 1]")


def top_fraction(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the kept ``scores``, best first: the first ``int(fraction * len(scores))``
    after a stable descending sort (equal scores keep their input order).

    Raises ValueError for a NaN score (no order is defined for it) and a fraction outside
    [0, 1].
    """
    count = keep_count(fraction, len(scores))
    for index, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"score {index} is NaN")
    # sorted() is stable and keeps equal keys in input order with reverse=True too, exactly
    # as the reference's list.sort(reverse=True).
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    return order[:count]


TurnScore = float | Sequence[float]
"""The answer head's score of one turn: its one answer's, or its candidates' (in order)."""


def best_candidate(scores: Sequence[float]) -> int:
    """The index of the best of one turn's candidate scores, as ``rank_answers.py`` picks
    it (``turn_scores.sort(key=score, reverse=True)``, then ``turn_scores[0]``): the
    highest score, and among equal highest scores the first (the sort is stable). A NaN
    score is never the best while another score is not NaN."""
    if not scores:
        raise ValueError("a turn has at least one candidate answer")
    best = 0
    for index, score in enumerate(scores):
        if score > scores[best] or (math.isnan(scores[best]) and not math.isnan(score)):
            best = index
    return best


def best_candidates(turn_scores: Sequence[TurnScore]) -> list[int]:
    """Each turn's best candidate (0 for a turn with one score)."""
    return [0 if isinstance(s, int | float) else best_candidate(s) for s in turn_scores]


def best_scores(turn_scores: Sequence[TurnScore]) -> list[float]:
    """Each turn's score: its one score, or its best candidate's."""
    return [float(s) if isinstance(s, int | float) else s[best_candidate(s)] for s in turn_scores]


def conversation_score(turn_scores: Sequence[TurnScore]) -> float:
    """A conversation's answer score as the reference computes it: the sum of its turn
    scores (a turn with candidates: its best candidate's) in turn order, starting from 0.0,
    divided by the number of turns."""
    if not turn_scores:
        raise ValueError("a conversation has at least one turn")
    total = 0.0
    for score in best_scores(turn_scores):
        total += score
    return total / len(turn_scores)


def merge_order(tasks: Iterable[str]) -> list[str]:
    """The order in which the kept samples of each task type are concatenated: by name
    (``complex_reasoning``, ``conversation``, ``detail`` as in ``merge_final.py``)."""
    return sorted(set(tasks))


@dataclass(frozen=True)
class TaskSelection:
    """One task type's selection. Keys in rank order (best first); the candidates of the
    answer stage are ``question_kept``, in that order."""

    question_kept: list[int]  # indices into the task's records, best question score first
    answer_kept: list[int]  # indices into the task's records, best answer score first


def select_task(
    question_scores: Sequence[float],
    answer_scores: Mapping[int, Sequence[TurnScore]],
    question_keep: float = DEFAULT_KEEP,
    answer_keep: float = DEFAULT_KEEP,
) -> TaskSelection:
    """Both stages on one task type whose scores are all known: ``question_scores`` of every
    record in input order, ``answer_scores`` (the turn scores, a turn with candidates: the
    candidates' scores) of at least the records the question stage keeps."""
    question_kept = question_stage(question_scores, question_keep)
    return TaskSelection(question_kept, answer_stage(question_kept, answer_scores, answer_keep))


def question_stage(question_scores: Sequence[float], keep: float) -> list[int]:
    """Stage 1 (``rank_questions.py``): indices of the kept records, best first."""
    return top_fraction(question_scores, keep)


def answer_stage(
    candidates: Sequence[int], answer_scores: Mapping[int, Sequence[TurnScore]], keep: float
) -> list[int]:
    """Stage 2 (``rank_answers.py``): ``candidates`` (stage 1's kept, in its order) ranked
    by conversation score (of each turn's best candidate); the kept indices, best first."""
    scores = [conversation_score(answer_scores[index]) for index in candidates]
    return [candidates[i] for i in top_fraction(scores, keep)]


def merge(kept: Mapping[str, Sequence[K]]) -> list[K]:
    """Stage 3 (``merge_final.py``): the kept of every task type, task types in
    :func:`merge_order`, each in its own rank order."""
    return [key for task in merge_order(kept) for key in kept[task]]


# ---------------------------------------------------------------------------------------
# Describing a score distribution


@dataclass(frozen=True)
class Distribution:
    """Five-number summary of scores (quartiles by linear interpolation between order
    statistics, as numpy's default) and the selection's threshold: the lowest kept score
    (None when nothing was kept)."""

    count: int
    minimum: float | None
    q1: float | None
    median: float | None
    q3: float | None
    maximum: float | None
    threshold: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "min": self.minimum,
            "q1": self.q1,
            "median": self.median,
            "q3": self.q3,
            "max": self.maximum,
            "threshold": self.threshold,
        }


def describe(scores: Sequence[float], kept: Sequence[float]) -> Distribution:
    ordered = sorted(scores)
    threshold = min(kept) if kept else None
    if not ordered:
        return Distribution(0, None, None, None, None, None, threshold)
    return Distribution(
        count=len(ordered),
        minimum=ordered[0],
        q1=quantile(ordered, 0.25),
        median=quantile(ordered, 0.5),
        q3=quantile(ordered, 0.75),
        maximum=ordered[-1],
        threshold=threshold,
    )


def quantile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-quantile of sorted, non-empty ``ordered``: linear interpolation at
    position ``p * (n - 1)``."""
    position = p * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
