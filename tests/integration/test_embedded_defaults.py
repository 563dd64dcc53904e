"""The default configuration (what ``make serve`` serves): the LoRA reward adapters over one
shared embedded base, as a user of the paper's released adapters serves them."""

from __future__ import annotations

import io
import pathlib

import pytest
from PIL import Image
from support import ServerThread

from align2.client import CurationClient, Sample, Turn
from align2.server.config import Config


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_defaults_name_the_shared_base_and_the_two_adapters() -> None:
    models = Config().models
    assert models["question"].base_key == models["answer"].base_key  # one base for both
    for head in ("question", "answer"):
        model = models[head]
        assert model.path == "embedded:reward-base"
        assert model.adapter == f"embedded:reward-{head}-lora"
        assert model.vision_tower == "embedded:reward-vision"
        assert model.share_base and model.backend == "transformers"


@pytest.mark.slow
def test_default_server_scores_with_the_shipped_adapters_on_one_base(
    embedded_cache_dir: pathlib.Path,
) -> None:
    config = Config()
    config.server.cache_dir = str(embedded_cache_dir)
    config.align.enabled = False
    turns = [Turn("What is on the table?", "A red cup, half full of coffee.")]
    other = [Turn("What is on the table?", "Nothing.")]
    samples = [
        Sample("grey", _png((128, 128, 128), (64, 48)), turns),
        Sample("blue", _png((20, 40, 200), (300, 500)), turns),
        Sample("short", _png((20, 40, 200), (300, 500)), other),
    ]
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=300) as client:
            results = client.score(samples, ["question", "answer"])
            info = client.server_info()
    finally:
        server.stop()
    by_name = {m.ref.name: m for m in info.models}
    assert by_name["question"].ref.model_id == "reward-question-lora"
    assert by_name["answer"].ref.model_id == "reward-answer-lora"
    assert by_name["question"].family == "llava"
    grey, blue, short = results
    # The embedded base projects every image to zeros: the text alone decides the score
    # (equal up to float32 rounding, as any input in another batch row).
    assert grey.question_score == pytest.approx(blue.question_score, rel=1e-5)
    assert grey.answer_scores[0] == pytest.approx(blue.answer_scores[0], rel=1e-5)
    assert short.answer_scores[0] != pytest.approx(blue.answer_scores[0], rel=1e-3)
    assert grey.question_score != grey.answer_scores[0]  # two heads, two adapters
