"""Online top-fraction selection: the method's "keep the top 30% per task type", for a
stream whose end is not known.

The offline method ranks a whole dataset. Online, a sample is kept when its score is among
the top ``fraction`` of the last ``window`` scores of its task type, itself included: the
threshold is the k-th highest of those n scores, k = ceil(fraction x n), and a score at or
above it is kept (so scores tied at the threshold are all kept). Early in a stream the
window is small and decisions rest on few scores (the first sample of a task is always
kept); once the window is full the keep rate follows
``fraction`` for any stationary score distribution, and the window lets thresholds follow a
generator whose quality drifts.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    kept: bool
    threshold: float  # the score a sample needed at that moment


class TopFraction:
    """Keeps the top ``fraction`` of the last ``window`` scores (see the module docstring)."""

    def __init__(self, fraction: float, window: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: {fraction} is not in (0, 1]")
        if window < 1:
            raise ValueError(f"window: {window} is not positive")
        self.fraction = fraction
        self.window = window
        self._arrivals: collections.deque[float] = collections.deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._sorted)

    def add(self, score: float) -> Selection:
        """Record ``score`` and decide it against the window that now includes it."""
        if math.isnan(score):
            raise ValueError("score: NaN cannot be ranked")
        if len(self._arrivals) == self.window:
            oldest = self._arrivals.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._arrivals.append(score)
        bisect.insort(self._sorted, score)
        k = math.ceil(self.fraction * len(self._sorted) - 1e-9)
        threshold = self._sorted[-max(k, 1)]
        return Selection(kept=score >= threshold, threshold=threshold)


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
