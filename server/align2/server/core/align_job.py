"""Bookkeeping of one Align call: its resolved settings, its admission slots turn by turn,
and the tokens and device time it used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align2.server.backends.base import Decoding
from align2.server.core.align_types import Parts
from align2.server.core.batcher import Outcome, busy_seconds
from align2.server.core.llm import Slots
from align2.server.core.priority import Priority
from align2.server.core.prompts import TemplateSet


@dataclass(frozen=True)
class ResolvedCall:
    """An Align call's settings after the configured defaults are filled in and checked."""

    parts: Parts
    template: TemplateSet
    decoding: Decoding
    review: bool
    priority: Priority
    deadline: float | None

    @property
    def requests_per_turn(self) -> int:
        """The most LLM requests one turn needs: a rewrite per part, two review choices."""
        rewrites = 2 if self.parts is Parts.BOTH else 1
        return rewrites + (2 if self.review else 0)

    @property
    def engine_priority(self) -> int:
        """GenerationRequest.priority: 0 interactive, 1 bulk (lower runs first)."""
        return 0 if self.priority is Priority.INTERACTIVE else 1


class TurnSlots:
    """The share of the call's slots one turn may use; the rest goes back at its end."""

    def __init__(self, pool: Slots | None, planned: int) -> None:
        self._pool = pool
        self._planned = planned
        self._used = 0

    def use(self) -> Slots:
        """Count one request; returns the call's slots for the runtime to consume one of.

        Call it right before handing the request to the runtime, which consumes the slot
        before its first suspension point.
        """
        if self._pool is None or self._used >= self._planned:
            raise RuntimeError("an LLM request beyond the turn's admitted slots")
        self._used += 1
        return self._pool

    def release_unused(self) -> None:
        if self._pool is not None and self._planned > self._used:
            self._pool.release(self._planned - self._used)
        self._planned = self._used


class Job:
    """One Align call in progress (used from the event loop only: no locking)."""

    def __init__(self, resolved: ResolvedCall, slots: Slots | None) -> None:
        self.resolved = resolved
        self._slots = slots
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._outcomes: list[Outcome[Any]] = []

    def turn_slots(self) -> TurnSlots:
        return TurnSlots(self._slots, self.resolved.requests_per_turn)

    def record(self, outcome: Outcome[Any], prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self._outcomes.append(outcome)

    def busy_seconds(self) -> float:
        """Wall time during which the device worked on this call's requests."""
        return busy_seconds(self._outcomes)

    def release(self) -> None:
        """Give back every slot still unused (the call ended, or failed)."""
        if self._slots is not None:
            self._slots.release()
