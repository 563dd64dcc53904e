"""Online top-fraction selection: the method's "keep the top 30% per task type", for a
stream whose end is not known.

The offline method ranks a whole dataset. Online, a sample is kept when its score is among
the top ``fraction`` of the last ``window`` scores of its task type, itself included: the
threshold is the k-th highest of those n scores, k = ceil(fraction x n), and a score at or
above it is kept (so scores tied at the threshold are all kept). Once the window is full
the keep rate follows ``fraction`` for any stationary score distribution, and the window
lets thresholds follow a generator whose quality drifts. With few scores in the window a
decision rests on little (the first score of an empty window is always kept): how a
stream warms up, and how windows are shared between streams, is selector.py's.
"""

from __future__ import annotations

import array
import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    """One decision. ``threshold``: the score a sample needed at that moment.
    ``window_size``: how many scores the threshold was ranked among (0: a given threshold,
    no ranking). ``warm_up``: decided with fewer scores than the stream's ``min_window``
    (see selector.py)."""

    kept: bool
    threshold: float
    window_size: int = 0
    warm_up: bool = False


SCORE_BYTES = 16
"""What a window holds per score (see :class:`Window`)."""


class Window:
    """The last ``size`` scores of one task type and stage, kept sorted.

    Stored as two arrays of doubles (arrivals as a ring, and sorted): 16 bytes a score.
    A deque and a list of float objects took about 48, and a server holds many windows
    (limits.max_task_types per selection, two stages, each selection key's and each
    stream's own)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window: {size} is not positive")
        self.size = size
        self._arrivals = array.array("d")  # a ring once full: _oldest is the next to leave
        self._oldest = 0
        self._sorted = array.array("d")

    def __len__(self) -> int:
        return len(self._sorted)

    def add(self, score: float) -> None:
        """Record ``score``; the oldest score leaves a full window."""
        if math.isnan(score):
            raise ValueError("score: NaN cannot be ranked")
        if len(self._arrivals) == self.size:
            oldest = self._arrivals[self._oldest]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
            self._arrivals[self._oldest] = score
            self._oldest = (self._oldest + 1) % self.size
        else:
            self._arrivals.append(score)
        bisect.insort(self._sorted, score)

    def extend(self, scores: Iterable[float]) -> None:
        """Record ``scores`` in order, as if they had arrived one by one (a seed of
        thousands: one sort, not an insertion each). NaN: ValueError, nothing recorded."""
        added = array.array("d", scores)
        if any(math.isnan(score) for score in added):
            raise ValueError("score: NaN cannot be ranked")
        oldest = self._oldest
        recent = (self._arrivals[oldest:] + self._arrivals[:oldest] + added)[-self.size :]
        self._arrivals, self._oldest = recent, 0
        self._sorted = array.array("d", sorted(recent))

    def threshold(self, fraction: float) -> float:
        """The k-th highest score, k = ceil(fraction x n) (at least 1); the window must not
        be empty."""
        k = math.ceil(fraction * len(self._sorted) - 1e-9)
        return self._sorted[-max(k, 1)]

    def select(self, score: float, fraction: float, warm_up: bool = False) -> Selection:
        """Decide ``score`` (already recorded) against the window as it is now."""
        threshold = self.threshold(fraction)
        return Selection(score >= threshold, threshold, len(self), warm_up)


class TopFraction:
    """Keeps the top ``fraction`` of the last ``window`` scores (see the module docstring)."""

    def __init__(self, fraction: float, window: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: {fraction} is not in (0, 1]")
        self.fraction = fraction
        self.window = window
        self._scores = Window(window)

    def __len__(self) -> int:
        return len(self._scores)

    def add(self, score: float) -> Selection:
        """Record ``score`` and decide it against the window that now includes it."""
        self._scores.add(score)
        return self._scores.select(score, self.fraction)


class TaskSelectors:
    """One :class:`TopFraction` per task type, created on first use."""

    def __init__(self, fraction: float, window: int) -> None:
        TopFraction(fraction, window)  # validate now, not at the first sample
        self._fraction = fraction
        self._window = window
        self._by_task: dict[str, TopFraction] = {}

    def add(self, task: str, score: float) -> Selection:
        selector = self._by_task.get(task)
        if selector is None:
            selector = self._by_task[task] = TopFraction(self._fraction, self._window)
        return selector.add(score)
