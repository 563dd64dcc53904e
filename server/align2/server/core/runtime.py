"""A loaded model and the batcher in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from align2.server.backends.base import ModelDescription, Prepared, ScoringBackend
from align2.server.config import BatchingConfig
from align2.server.core.batcher import Batcher
from align2.server.formats import as_float16


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
            self._score,
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

    async def _score(self, batch: Sequence[Prepared]) -> list[float]:
        """The backend's scores; in float16, rounded to float16 as the reference's float16
        model returns them (its scalar head runs in the model's dtype: eval.py writes
        ``logits.tolist()`` of a float16 tensor), so that ties and the order they are
        broken in match its selection. The head runs in float32 here, for every dtype."""
        scores = await self.backend.score(batch)
        if self.backend.description.dtype != "float16":
            return list(scores)
        return [as_float16(score) for score in scores]

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        await asyncio.to_thread(self.backend.close)  # waits for the device thread: off the loop
