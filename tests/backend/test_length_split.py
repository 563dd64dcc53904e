"""Length-aware batches in the transformers reward backend: a batch of very different
lengths runs as several forwards of neighbouring lengths, and every score stays what the
input gets whole and alone."""

from __future__ import annotations

import asyncio
import io
import pathlib

import pytest
from PIL import Image

from align2.server.backends.base import Prepared
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import Config, ModelConfig
from align2.server.errors import ConfigError

SHORT = "<image>\nWhat is it?"
LONG = "<image>\n" + " ".join(f"Question {i}: what else is on the left?" for i in range(12))


def picture(seed: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.effect_noise((36, 28), 20 + seed).convert("RGB").save(buffer, format="PNG")
    return Image.open(buffer).convert("RGB")


def score(backend: TransformersScoring, prepared: list[Prepared]) -> list[float]:
    return asyncio.run(backend.score(prepared))


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_idefics3"])
def test_a_split_batch_scores_as_each_input_alone(
    request: pytest.FixtureRequest, family: str
) -> None:
    folder: pathlib.Path = request.getfixturevalue(family)
    split = TransformersScoring.load(
        "q", ModelConfig(path=str(folder), length_split_tokens=1), folder
    )
    whole = TransformersScoring.load(
        "q", ModelConfig(path=str(folder), length_split_tokens=0), folder
    )
    # Six short inputs and two long ones, each on its own image, interleaved.
    texts = [SHORT, SHORT, LONG, SHORT, SHORT, LONG, SHORT, SHORT]
    batch = [
        split.prepare(text, picture(i), max_text_tokens=2048, truncate=False)
        for i, text in enumerate(texts)
    ]
    lengths = [p.tokens for p in batch]
    assert max(lengths) > min(lengths) + 50  # a real spread to split

    got = score(split, batch)
    assert split.padded_tokens_saved > 0  # it did split
    assert score(whole, batch) == pytest.approx(got, rel=1e-5, abs=1e-5)
    assert whole.padded_tokens_saved == 0
    alone = [score(whole, [p])[0] for p in batch]
    assert got == pytest.approx(alone, rel=1e-5, abs=1e-5)  # in the batch's order
    split.close()
    whole.close()


def test_a_negative_split_is_refused_naming_the_field(tiny_llava: pathlib.Path) -> None:
    config = Config()
    config.models["question"] = ModelConfig(path=str(tiny_llava), length_split_tokens=-1)
    with pytest.raises(ConfigError, match=r"models\.question\.length_split_tokens: must be >= 0"):
        config.validate()
