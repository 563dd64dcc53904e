"""Feature extraction order and batching (with a fake backend), the cache, the placeholder."""

from __future__ import annotations

import asyncio
import io
import pathlib
from collections.abc import Sequence

import torch
from PIL import Image

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.training import data, features

DESCRIPTION = ModelDescription("m", "m", "r", "fake", "idefics3", "float32", "cpu", 2048, 64)


class FakeBackend:
    """Features are (text length, first character); inputs over 5 characters are "cut"."""

    description = DESCRIPTION

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def prepare(
        self, text: str, image: Image.Image, *, max_text_tokens: int, truncate: bool
    ) -> Prepared:
        assert image.size == (512, 512) and truncate
        return Prepared(len(text), len(text) > 5, text)

    async def features(self, batch: Sequence[Prepared]) -> torch.Tensor:
        self.batches.append([p.payload for p in batch])
        return torch.tensor([[float(len(p.payload)), float(ord(p.payload[0]))] for p in batch])


def test_extract_keeps_input_order_and_batches_by_length() -> None:
    backend = FakeBackend()
    texts = ["ccc", "a", "bbbbbbb", "dd", "eeeeee"]
    rows, truncated = asyncio.run(
        features.extract(backend, texts, batch_size=2, max_text_tokens=10)
    )
    assert rows[:, 0].tolist() == [3, 1, 7, 2, 6]
    assert rows[:, 1].tolist() == [ord(t[0]) for t in texts]
    assert backend.batches == [["a", "dd"], ["ccc", "eeeeee"], ["bbbbbbb"]]
    assert truncated == 2


def preference(texts: tuple[str, ...]) -> data.PreferenceSet:
    return data.PreferenceSet("question", "q.json", "f" * 64, texts, ())


def test_cache_round_trips_and_keys_on_the_rendered_inputs(tmp_path: pathlib.Path) -> None:
    cache = features.FeatureCache(tmp_path / "features")
    key = features.feature_key(DESCRIPTION, "backbone", preference(("a", "b")), 2048)
    assert cache.load(key) is None
    stored = torch.randn(2, 8)
    cache.save(key, stored, truncated=1)
    found = cache.load(key)
    assert found is not None and torch.equal(found[0], stored) and found[1] == 1
    assert [p.name for p in cache.folder.iterdir()] == [cache.path(key).name]  # no scratch
    reordered = features.feature_key(DESCRIPTION, "backbone", preference(("b", "a")), 2048)
    assert cache.load(reordered) is None
    other = features.feature_key(DESCRIPTION, "other", preference(("a", "b")), 2048)
    assert cache.load(other) is None


def test_placeholder_png_decodes_to_the_placeholder() -> None:
    decoded = Image.open(io.BytesIO(features.placeholder_png())).convert("RGB")
    assert decoded.tobytes() == features.placeholder_image().tobytes()
    assert decoded.getpixel((0, 0)) == features.PLACEHOLDER_RGB
