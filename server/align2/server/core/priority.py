"""Two scheduling classes for queued work: interactive and bulk.

The rule: interactive items go ahead of queued bulk items, and while both classes wait,
every ``bulk_every``-th batch starts with bulk items, so bulk keeps at least that share of
the device and never starves. Within a class, first come first served.
"""

from __future__ import annotations

import collections
import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar


class Priority(enum.IntEnum):
    INTERACTIVE = 1
    BULK = 2


class _Timed(Protocol):
    submitted: float


E = TypeVar("E", bound=_Timed)


class PriorityQueue(Generic[E]):
    """FIFO per class; ``take`` forms one batch by the class rule above."""

    def __init__(self, bulk_every: int = 4) -> None:
        self._queues: dict[Priority, collections.deque[E]] = {
            p: collections.deque() for p in Priority
        }
        self._bulk_every = bulk_every
        self._contended_batches = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, entry: E, priority: Priority) -> None:
        self._queues[priority].append(entry)

    def drop(self, predicate: Callable[[E], bool]) -> None:
        """Remove every entry for which ``predicate`` holds (cancelled, expired)."""
        for priority, queue in self._queues.items():
            if any(predicate(e) for e in queue):
                self._queues[priority] = collections.deque(e for e in queue if not predicate(e))

    def remove(self, entry: E, priority: Priority) -> None:
        """Remove ``entry`` (pushed with ``priority``) if it is still queued."""
        with contextlib.suppress(ValueError):
            self._queues[priority].remove(entry)

    def drain(self) -> Iterator[E]:
        for queue in self._queues.values():
            while queue:
                yield queue.popleft()

    def oldest_submitted(self) -> float:
        return min(q[0].submitted for q in self._queues.values() if q)

    def _order(self) -> list[collections.deque[E]]:
        interactive, bulk = self._queues[Priority.INTERACTIVE], self._queues[Priority.BULK]
        if interactive and bulk:
            self._contended_batches += 1
            if self._contended_batches % self._bulk_every == 0:
                return [bulk, interactive]
        return [interactive, bulk]

    def take(self, fits: Callable[[Sequence[E], E], bool]) -> list[E]:
        """Pop entries in service order while ``fits(batch, entry)``; stop at the first misfit."""
        batch: list[E] = []
        for queue in self._order():
            while queue and fits(batch, queue[0]):
                batch.append(queue.popleft())
            if queue:
                break
        return batch
