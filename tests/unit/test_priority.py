"""The two-class queue: interactive first, bulk never starved."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from align2.server.core.priority import Priority, PriorityQueue


@dataclass
class E:
    name: str
    submitted: float = 0.0


def take_one(queue: PriorityQueue[E]) -> list[str]:
    return [e.name for e in queue.take(lambda batch, _e: len(batch) < 1)]


def test_bulk_gets_every_fourth_batch_while_interactive_keeps_coming() -> None:
    queue: PriorityQueue[E] = PriorityQueue(bulk_every=4)
    for i in range(3):
        queue.push(E(f"b{i}"), Priority.BULK)
    served = []
    for i in range(12):
        queue.push(E(f"i{i}"), Priority.INTERACTIVE)
        served += take_one(queue)
    assert [s for s in served if s.startswith("b")] == ["b0", "b1", "b2"]
    assert served.index("b0") == 3


@given(st.lists(st.sampled_from(list(Priority)), min_size=1, max_size=40))
def test_fifo_within_each_class_and_nothing_lost(classes: list[Priority]) -> None:
    queue: PriorityQueue[E] = PriorityQueue()
    for i, p in enumerate(classes):
        queue.push(E(f"{p.name}{i}"), p)
    out: list[str] = []
    while len(queue):
        out += [e.name for e in queue.take(lambda batch, _e: len(batch) < 3)]
    assert sorted(out) == sorted(f"{p.name}{i}" for i, p in enumerate(classes))
    for p in Priority:
        mine = [n for n in out if n.startswith(p.name)]
        assert mine == sorted(mine, key=lambda n: int(n[len(p.name) :]))


def test_the_batch_wait_counts_from_the_oldest_queued_item() -> None:
    """The batcher bounds a queued item's wait for batch-mates by max_delay from the
    OLDEST item (PriorityQueue.oldest_submitted): a later arrival must not restart it."""
    queue: PriorityQueue[E] = PriorityQueue()
    queue.push(E("a", 5.0), Priority.BULK)
    queue.push(E("b", 7.0), Priority.BULK)
    queue.push(E("c", 6.0), Priority.INTERACTIVE)
    assert queue.oldest_submitted() == 5.0


def test_only_contended_batches_count_towards_bulks_turn() -> None:
    """Batches taken while one class waits alone do not advance bulk's turn: after three
    bulk-only batches, the next three batches with both classes waiting still go to
    interactive, and the fourth to bulk."""
    queue: PriorityQueue[E] = PriorityQueue(bulk_every=4)
    for i in range(6):
        queue.push(E(f"b{i}"), Priority.BULK)
    assert [name for _ in range(3) for name in take_one(queue)] == ["b0", "b1", "b2"]
    served = []
    for i in range(4):
        queue.push(E(f"i{i}"), Priority.INTERACTIVE)
        served += take_one(queue)
    assert served == ["i0", "i1", "i2", "b3"]
