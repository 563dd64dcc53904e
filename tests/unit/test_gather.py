"""core.gather.all_or_first_error: results in order, the first error as is, and nothing
left in reference cycles by its TaskGroup (checked with the cyclic GC off)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from align2.server.core.gather import all_or_first_error


class Held:
    """What a caller's frame holds while its parts run (in Curate: a sample, its image)."""


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def part(value: int, fail: bool = False, block: asyncio.Event | None = None) -> int:
    await asyncio.sleep(0)
    if fail:
        raise ValueError(f"part {value}")
    if block is not None:
        await block.wait()
    return value


async def settle() -> None:
    """Let the loop run the done callbacks of the tasks that just ended (they hold them)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def caller(held: Held, *parts: Coroutine[Any, Any, int]) -> list[int]:
    return await all_or_first_error(parts)


async def test_results_come_in_order() -> None:
    assert await all_or_first_error([part(1), part(2), part(3)]) == [1, 2, 3]


async def test_the_first_error_is_raised_as_is_and_cancels_the_rest() -> None:
    never = asyncio.Event()
    with pytest.raises(ValueError, match="part 2"):
        await all_or_first_error([part(1, block=never), part(2, fail=True)])


async def test_a_failed_part_leaves_its_callers_frames_to_refcounting(
    no_cyclic_gc: None,
) -> None:
    """Fails on: the first error raised inside its group's handler (chained to the
    ExceptionGroup, which TaskGroup.__aexit__'s frame holds) with the failed task and the
    error in this function's locals: the error's traceback held the caller's frame."""
    held = Held()
    watched = weakref.ref(held)
    never = asyncio.Event()
    task = asyncio.ensure_future(caller(held, part(1, block=never), part(2, fail=True)))
    del held
    with pytest.raises(ValueError):
        await task
    del task
    await settle()
    assert watched() is None


async def test_a_cancelled_caller_leaves_its_frames_to_refcounting(no_cyclic_gc: None) -> None:
    """Fails on: Python 3.11's TaskGroup.__aexit__ raising the CancelledError it keeps in
    its own frame's locals (a cycle through the error's traceback, which holds every frame
    the cancellation went through: in Curate, a cancelled stream's samples in scoring)."""
    held = Held()
    watched = weakref.ref(held)
    never = asyncio.Event()
    task = asyncio.ensure_future(caller(held, part(1, block=never), part(2, block=never)))
    del held
    await settle()  # the parts are running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    await settle()
    assert watched() is None
