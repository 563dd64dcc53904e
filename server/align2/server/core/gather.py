"""Running the parts of one item together."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def all_or_first_error(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the parts of one item together, results in order; a failure cancels the rest
    and is raised as is (not wrapped in an ExceptionGroup).

    What comes out of the TaskGroup is let go of its reference cycles (Python 3.11's
    ``TaskGroup.__aexit__`` keeps the error it raises in its own frame's locals, and that
    frame is in the error's traceback), and the first error is raised outside the handler
    of its group, with no failed task held here: otherwise each such error, a
    cancellation included, kept every frame it passed through, with their samples (and
    decoded images), until the cyclic GC ran."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                tasks.append(group.create_task(coro))
            del group  # it holds our caller's task, which may come to hold our error
    except BaseExceptionGroup as group_error:
        first = group_error.exceptions[0]
        _clear_frames_below(group_error)
    except BaseException as error:  # a cancellation of this task, as the group ended
        _clear_frames_below(error)
        raise
    else:
        return [t.result() for t in tasks]
    tasks.clear()  # the failed one holds ``first``
    try:
        raise first from None
    finally:
        del first  # this frame joins its traceback


def _clear_frames_below(error: BaseException) -> None:
    """The locals of the finished frames below this one in ``error``'s traceback (the
    TaskGroup's ``__aexit__``), which hold ``error``."""
    if error.__traceback__ is not None:
        traceback.clear_frames(error.__traceback__.tb_next)
