"""Decoded images are bounded server-wide (limits.max_decoded_image_bytes): the Scorer
claims an image's estimated decoded memory before decoding it and gives it back once the
sample's forward passes are done. A fake backend records what is held at each prepare."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from support import metric

from align2.client.types import Sample, Turn
from align2.server.backends.base import ModelDescription, Prepared
from align2.server.config import BatchingConfig, LimitsConfig, ScoreConfig
from align2.server.core.images import decoded_bytes, open_image
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.scoring import ScoreCall, Scorer
from align2.server.errors import Code

SIDE = 300  # one colour: a tiny PNG that decodes to 360 KB (RGB at 4 bytes a pixel)


def png(side: int = SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageSizeBackend:
    """Scores an input by its image's width; notes the decoded bytes held at each prepare."""

    def __init__(self, scorer: list[Scorer], device_seconds: float) -> None:
        self.description = ModelDescription(
            name="m", model_id="fake", revision="", backend="fake", family="llava",
            dtype="float32", device="cpu", max_length=4096, image_tokens=1, image_mode="square",
        )  # fmt: skip
        self._scorer = scorer
        self._seconds = device_seconds
        self.held: list[int] = []
        self._lock = threading.Lock()

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        with self._lock:
            self.held.append(self._scorer[0]._images.in_flight)
        return Prepared(2, False, float(image.width))

    async def score(self, batch: Sequence[Prepared]) -> list[float]:
        await asyncio.sleep(self._seconds)  # the device: images stay held meanwhile
        return [p.payload for p in batch]

    def close(self) -> None:
        pass


def run_score(samples: list[Sample], limit: int, timeout: float | None = None, device=0.01):
    async def run():
        holder: list[Scorer] = []
        backend = ImageSizeBackend(holder, device)
        runtime = ScoringRuntime(backend, BatchingConfig(max_batch_size=2))
        runtime.batcher.start()
        with ThreadPoolExecutor(2) as pool:
            scorer = Scorer(
                {"m": runtime},
                ScoreConfig(question_model="m", answer_model="m"),
                LimitsConfig(max_decoded_image_bytes=limit),
                pool,
            )
            holder.append(scorer)
            deadline = None if timeout is None else time.monotonic() + timeout
            call = ScoreCall(samples=samples, deadline=deadline)
            outcome = await scorer.score(call)
            left = scorer._images.in_flight
        await runtime.batcher.close()
        return outcome.results, backend.held, left

    return asyncio.run(run())


def sample(i: int, image: bytes) -> Sample:
    return Sample(id=str(i), image=image, turns=[Turn("q?", "a."), Turn("q2?", "a2.")])


def test_images_held_at_once_stay_within_the_limit_and_every_sample_is_scored() -> None:
    """Fails on: every sample of the call decoded at once (8 images held), or an image
    waiting forever for its batch-mates (the call never ends)."""
    image = png()
    one = decoded_bytes(open_image(image, max_bytes=1 << 20, max_pixels=1 << 30))
    assert one == 8 * SIDE * SIDE
    results, held, left = run_score([sample(i, image) for i in range(8)], limit=2 * one)
    assert [r.error for r in results] == [None] * 8
    assert [r.answer_scores for r in results] == [[float(SIDE)] * 2] * 8
    assert max(held) <= 2 * one and max(held) > 0
    assert left == 0  # every claim given back
    # Unbounded (0), the same scores: the bound changes when images decode, not results.
    unbounded, _, _ = run_score([sample(i, image) for i in range(8)], limit=0)
    assert [r.answer_scores for r in unbounded] == [r.answer_scores for r in results]


def test_an_image_larger_than_the_limit_is_decoded_alone() -> None:
    image = png()
    results, held, left = run_score([sample(i, image) for i in range(3)], limit=1000)
    assert [r.error for r in results] == [None] * 3
    assert set(held) == {8 * SIDE * SIDE}  # one at a time
    assert left == 0


def test_a_bad_image_claims_nothing_and_fails_alone() -> None:
    results, _, left = run_score([sample(0, b"not an image"), sample(1, png())], limit=1 << 30)
    assert results[0].error is not None and results[0].error.code is Code.INVALID_ARGUMENT
    assert "image" in str(results[0].error)
    assert results[1].error is None and left == 0


def test_an_image_waiting_for_room_past_its_deadline_fails_naming_the_limit() -> None:
    expired = metric("align2_items_rejected_total", reason="expired")
    results, _, left = run_score([sample(0, png()), sample(1, png())], 1000, 0.2, device=0.5)
    assert results[1].error is not None and results[1].error.code is Code.DEADLINE_EXCEEDED
    assert metric("align2_items_rejected_total", reason="expired") > expired
    assert "limits.max_decoded_image_bytes 1000" in str(results[1].error)
    assert left == 0


def test_the_estimate_counts_the_padded_square_only_where_one_is_made() -> None:
    limits = {"max_bytes": 1 << 20, "max_pixels": 1 << 30}
    wide = io.BytesIO()
    Image.new("RGB", (40, 10)).save(wide, format="PNG")
    assert decoded_bytes(open_image(wide.getvalue(), **limits)) == 8 * 400
    opened = open_image(wide.getvalue(), **limits, padded=True)
    assert decoded_bytes(opened, padded=True) == 8 * 400 + 4 * 1600
    square = open_image(png(20), **limits, padded=True)
    assert decoded_bytes(square, padded=True) == 8 * 400  # returned as it is
    webp = io.BytesIO()
    Image.new("RGB", (40, 10)).save(webp, format="WEBP")  # libwebp decodes through buffers
    assert decoded_bytes(open_image(webp.getvalue(), **limits)) == 20 * 400
