"""The inner LLM behind one admission gate: batched by our Batcher, or continuous.

Two ways to run a GenerationBackend, chosen by its ``continuous`` flag:

- **batched** (transformers): one Batcher takes both kinds of request (generations and
  review choices); a batch that mixes them runs as one device call per kind. Admission is
  the batcher's own reservation, bounded by ``align.max_inflight_items``. A generation
  whose caller is cancelled or expires while its batch runs is flagged
  (``GenerationRequest.abandoned``) and its row leaves the batch at the next step.
- **continuous** (vLLM): the engine batches by itself, so each request goes straight to
  ``backend.generate([one])`` / ``backend.choose([one])``, concurrently, with only a
  counter in front (the same bound). A deadline cancels the call, and cancelling the
  awaiting task aborts the request in the engine (the backend's contract).

Either way a call first ``reserve``s every request it may need, and fails at once with
RESOURCE_EXHAUSTED (Overloaded) when the gate is full, before any work is done, told when
its turn comes at the present pace (core/drain.py: the batcher's compute time per item, or
the continuous engine's time between completions), or not to retry when that is after its
deadline (NoTurnBeforeDeadline).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast

from align2.server import metrics
from align2.server.backends.base import (
    ChoiceRequest,
    Generation,
    GenerationBackend,
    GenerationRequest,
    ModelDescription,
)
from align2.server.config import BatchingConfig
from align2.server.core import deadlines
from align2.server.core.batcher import Batcher, Outcome, Reservation
from align2.server.core.drain import DrainEstimate
from align2.server.core.priority import Priority
from align2.server.errors import BackendError, DeadlineExpired, Unavailable

LlmRequest = GenerationRequest | ChoiceRequest
LlmResult = Generation | list[float]


class Slots(Protocol):
    """Capacity claimed by one call: each request uses one slot; ``release`` the rest."""

    remaining: int

    def release(self, count: int | None = None) -> None: ...


class _GateSlots:
    def __init__(self, gate: _Gate, count: int) -> None:
        self._gate = gate
        self.remaining = count

    def release(self, count: int | None = None) -> None:
        count = self.remaining if count is None else min(count, self.remaining)
        if count > 0:
            self.remaining -= count
            self._gate.give_back(count)


class _Gate:
    """A bounded count of requests in flight (reserved, queued in the engine or running)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.load = 0
        self.closing = False
        self._gauge = metrics.QUEUE_DEPTH.labels(model=name)
        self.drain = DrainEstimate()
        self._last_done: float | None = None

    def finished(self, started: float) -> None:
        """One request completed: the engine's pace is the time between completions."""
        now = time.monotonic()
        since = started if self._last_done is None else max(self._last_done, started)
        self.drain.observe(1, now - since)
        self._last_done = now

    def give_back(self, count: int) -> None:
        self.load -= count
        self._gauge.set(self.load)

    def reserve(self, count: int, deadline: float | None = None) -> _GateSlots:
        if self.closing:
            raise Unavailable("server is shutting down")
        if self.load + count > self.limit:
            metrics.refused(count)
            full = (
                f"model {self.name!r} is full: {self.load} of {self.limit} requests in flight "
                f"(limits.max_llm_inflight), the call needs {count}"
            )
            raise self.drain.refusal(full, self.load, count, self.limit, deadline)
        self.load += count
        self._gauge.set(self.load)
        return _GateSlots(self, count)


class GenerationRuntime:
    """One inner LLM and the scheduling in front of it (see the module docstring).

    ``generate`` / ``choose`` return the backend's result in an Outcome (with timing), or
    raise the request's error: DeadlineExpired, Unavailable, InvalidArgument, BackendError.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        batching: BatchingConfig,
        max_inflight: int,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.backend = backend
        self._on_fatal = on_fatal
        name = backend.description.name
        self._gate: _Gate | None = None
        self._batcher: Batcher[LlmRequest, LlmResult] | None = None
        if backend.continuous:
            self._gate = _Gate(name, max_inflight)
        else:
            self._batcher = Batcher(
                self._run_batch,
                name=name,
                max_batch_size=batching.max_batch_size,
                max_batch_tokens=batching.max_batch_tokens,
                max_delay=batching.max_delay_ms / 1000.0,
                max_queue=max_inflight,
                on_fatal=on_fatal,
            )

    @property
    def description(self) -> ModelDescription:
        return self.backend.description

    def start(self) -> None:
        if self._batcher is not None:
            self._batcher.start()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        if self._gate is not None:
            self._gate.closing = True
        await asyncio.to_thread(self.backend.close)  # waits for the device thread: off the loop

    @property
    def load(self) -> int:
        """Requests admitted and not finished: reserved, queued or running."""
        if self._batcher is not None:
            return self._batcher.load
        assert self._gate is not None
        return self._gate.load

    def reserve(self, count: int, deadline: float | None = None) -> Slots:
        """Claim ``count`` requests at once, or raise Overloaded claiming none (with the
        batcher's retry delay; ``deadline``: see Batcher.reserve)."""
        if self._batcher is not None:
            return self._batcher.reserve(count, deadline)
        assert self._gate is not None
        return self._gate.reserve(count, deadline)

    async def generate(
        self,
        request: GenerationRequest,
        cost: int,
        slots: Slots,
        *,
        deadline: float | None,
        priority: Priority,
    ) -> Outcome[Generation]:
        """``cost``: prompt plus new tokens (the batcher's budget)."""
        outcome = await self._submit(request, cost, slots, deadline, priority)
        if not isinstance(outcome.value, Generation):
            raise BackendError(f"model {self.description.name!r} returned no generation")
        return cast(Outcome[Generation], outcome)

    async def choose(
        self,
        request: ChoiceRequest,
        cost: int,
        slots: Slots,
        *,
        deadline: float | None,
        priority: Priority,
    ) -> Outcome[list[float]]:
        """Per choice label, its probability (renormalised over the labels)."""
        outcome = await self._submit(request, cost, slots, deadline, priority)
        value = outcome.value
        if not isinstance(value, list) or len(value) != len(request.choices):
            raise BackendError(f"model {self.description.name!r} returned no choice")
        return cast(Outcome[list[float]], outcome)

    async def _submit(
        self,
        request: LlmRequest,
        cost: int,
        slots: Slots,
        deadline: float | None,
        priority: Priority,
    ) -> Outcome[LlmResult]:
        if self._batcher is not None:
            assert isinstance(slots, Reservation)
            # A generation is flagged when this caller stops waiting, so that a batch already
            # running drops the row instead of generating for nobody.
            abandoned = threading.Event()
            if isinstance(request, GenerationRequest):
                request = replace(request, abandoned=abandoned)
            try:
                return await self._batcher.submit(
                    request, cost=cost, reservation=slots, deadline=deadline, priority=priority
                )
            except (asyncio.CancelledError, DeadlineExpired):
                abandoned.set()
                raise
        return await self._direct(request, slots, deadline)

    async def _direct(
        self, request: LlmRequest, slots: Slots, deadline: float | None
    ) -> Outcome[LlmResult]:
        """One request straight to a continuous engine; its slot frees when it ends."""
        if slots.remaining < 1:
            raise RuntimeError("request without a reserved slot")
        slots.remaining -= 1  # used: still counted in the gate's load until the end
        started = time.monotonic()
        try:
            deadlines.check(deadline, "before the request started")
            async with deadlines.within(deadline, "while generating"):
                [value] = await self._run_batch([request])
            assert self._gate is not None
            self._gate.finished(started)  # the engine's pace: only what it completed
        except BackendError as exc:
            if exc.fatal and self._on_fatal is not None:
                self._on_fatal(exc)
            raise
        finally:
            assert self._gate is not None
            self._gate.give_back(1)
        finished = time.monotonic()
        return Outcome(value, started, 0.0, finished - started)

    async def _run_batch(self, batch: Sequence[LlmRequest]) -> list[LlmResult]:
        """One result per request, in order: generations and choices each in one call."""
        results: list[Any] = [None] * len(batch)
        generations = [i for i, r in enumerate(batch) if isinstance(r, GenerationRequest)]
        choices = [i for i, r in enumerate(batch) if isinstance(r, ChoiceRequest)]
        if generations:
            made = await self.backend.generate([_as_generation(batch[i]) for i in generations])
            _place(results, generations, made)
            metrics.GENERATED_TOKENS.labels(model=self.description.name).inc(
                sum(g.generated_tokens for g in made)
            )
        if choices:
            chosen = await self.backend.choose([_as_choice(batch[i]) for i in choices])
            _place(results, choices, chosen)
        return results


def _place(results: list[Any], where: list[int], values: Sequence[Any]) -> None:
    if len(values) != len(where):
        raise BackendError(f"backend returned {len(values)} results for {len(where)}")
    for i, value in zip(where, values, strict=True):
        results[i] = value


def _as_generation(request: LlmRequest) -> GenerationRequest:
    assert isinstance(request, GenerationRequest)
    return request


def _as_choice(request: LlmRequest) -> ChoiceRequest:
    assert isinstance(request, ChoiceRequest)
    return request
