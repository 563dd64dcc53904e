"""A loaded model and the batcher in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from align2.server.backends.base import ModelDescription, Prepared, ScoringBackend
from align2.server.config import BatchingConfig
from align2.server.core.batcher import Batcher


class ScoringRuntime:
    """One reward model: its backend and its own batcher (items of one model only)."""

    def __init__(
        self,
        backend: ScoringBackend,
        batching: BatchingConfig,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.backend = backend
        self.batcher: Batcher[Prepared, float] = Batcher(
            backend.score,
            name=backend.description.name,
            max_batch_size=batching.max_batch_size,
            max_batch_tokens=batching.max_batch_tokens,
            max_delay=batching.max_delay_ms / 1000.0,
            max_queue=batching.max_queue_items,
            on_fatal=on_fatal,
        )

    @property
    def description(self) -> ModelDescription:
        return self.backend.description

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        await asyncio.to_thread(self.backend.close)  # waits for the device thread: off the loop
