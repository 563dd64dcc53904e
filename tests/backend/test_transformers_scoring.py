"""The transformers reward backend on tiny real models of both families.

Scores are checked against an independent computation written here: the template text
typed out literally, token ids assembled by hand (BOS + the family's image expansion + the
text), the image padded by hand, the base model run directly, the hidden state at the last
position times score.weight read from the safetensors file.
"""

from __future__ import annotations

import asyncio
import pathlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from align2.client.types import Sample, Turn
from align2.server.backends.base import InputTooLong
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import BatchingConfig, LimitsConfig, ModelConfig, ScoreConfig
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.scoring import ScoreCall, Scorer

FAMILIES = ["tiny_llava", "tiny_idefics3"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest) -> pathlib.Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def backend(checkpoint: pathlib.Path) -> TransformersScoring:
    return TransformersScoring.load("m", ModelConfig(path=str(checkpoint)), checkpoint)


def hand_score(folder: pathlib.Path, text_after_marker: str, image: Image.Image) -> float:
    """Independent reference: ids by hand, image padded by hand, hidden state at the end."""
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    mean = processor.image_processor.image_mean
    side = max(image.size)
    # LLaVA's expand2square: the colour truncated, int(c * 255), as the reference does.
    square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    config = model.config
    if config.model_type == "llava":
        n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        image_ids = [config.image_token_id] * n
        pixels = processor.image_processor(square, return_tensors="pt")
    else:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        fake, glob = tok.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
        image_ids = [fake, glob] + [config.image_token_id] * n + [fake]
        pixels = processor.image_processor([[square]], return_tensors="pt")
    text_ids = tok(text_after_marker, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *image_ids, *text_ids]])
    assert tok.eos_token_id not in ids[0, 1:].tolist()
    with torch.no_grad():
        hidden = model.model(input_ids=ids, **dict(pixels)).last_hidden_state
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("score.weight")
    return float(hidden[0, -1] @ weight[0].float())


def score_sample(backend: TransformersScoring, sample: Sample, **limits: object):
    async def run():
        runtime = ScoringRuntime(backend, BatchingConfig())
        runtime.batcher.start()
        with ThreadPoolExecutor(2) as pool:
            scorer = Scorer(
                {"q": runtime, "a": runtime},
                ScoreConfig(question_model="q", answer_model="a"),
                LimitsConfig(**limits),
                pool,
            )
            outcome = await scorer.score(ScoreCall(samples=[sample]))
        await runtime.batcher.close()
        return outcome.results[0]

    return asyncio.run(run())


def wide_image() -> Image.Image:
    image = Image.effect_noise((48, 30), 60).convert("RGB")
    return image


def test_scores_equal_the_method_computed_by_hand(
    backend: TransformersScoring, checkpoint: pathlib.Path
) -> None:
    import io

    image = wide_image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    sample = Sample(
        id="x",
        image=buffer.getvalue(),
        turns=[
            Turn("<image>\nWhat is on the table? ", " A red cup."),
            Turn("Why is it there?", "Someone left it after breakfast. "),
        ],
    )
    result = score_sample(backend, sample)
    assert result.error is None
    question = hand_score(checkpoint, "\nWhat is on the table?\nWhy is it there?", image)
    answer0 = hand_score(checkpoint, "\nQuestion: What is on the table?\nAnswer: A red cup.", image)
    answer1 = hand_score(
        checkpoint, "\nQuestion: Why is it there?\nAnswer: Someone left it after breakfast.", image
    )
    assert result.question_score == pytest.approx(question, abs=1e-5)
    assert result.answer_scores == pytest.approx([answer0, answer1], abs=1e-5)
    assert result.answer_score == pytest.approx((answer0 + answer1) / 2, abs=1e-5)


def test_batch_of_32_mixed_lengths_equals_each_alone(backend: TransformersScoring) -> None:
    images = [Image.effect_noise((20 + 3 * i, 40 - i), 30 + i).convert("RGB") for i in range(32)]
    texts = [
        "<image>\nQuestion: "
        + "how many birds are there " * (1 + i % 7)
        + "?\nAnswer: "
        + "two" * i
        for i in range(32)
    ]
    prepared = [
        backend.prepare(t, im, max_text_tokens=2048, truncate=False)
        for t, im in zip(texts, images, strict=True)
    ]
    assert len({p.tokens for p in prepared}) > 5  # really mixed lengths
    together = asyncio.run(backend.score(prepared))
    alone = [asyncio.run(backend.score([p]))[0] for p in prepared]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 32


def test_text_limit_rejects_or_truncates_and_says_so(backend: TransformersScoring) -> None:
    text = "<image>\nQuestion: " + "word " * 200 + "\nAnswer: yes"
    image = wide_image()
    with pytest.raises(InputTooLong, match=r"exceeds limits\.max_text_tokens 50"):
        backend.prepare(text, image, max_text_tokens=50, truncate=False)
    cut = backend.prepare(text, image, max_text_tokens=50, truncate=True)
    full = backend.prepare(text, image, max_text_tokens=4096, truncate=False)
    assert cut.truncated and not full.truncated
    assert cut.tokens == backend.description.image_tokens + 50
    assert torch.equal(cut.payload.input_ids, full.payload.input_ids[: cut.tokens])


def test_model_max_length_is_named_when_it_binds(checkpoint: pathlib.Path) -> None:
    backend = TransformersScoring.load(
        "small", ModelConfig(path=str(checkpoint), max_length=40), checkpoint
    )
    room = 40 - backend.description.image_tokens
    with pytest.raises(InputTooLong, match=f"the {room} tokens that models.small.max_length 40"):
        backend.prepare(
            "<image>\n" + "many words " * 40, wide_image(), max_text_tokens=2048, truncate=False
        )


def test_pad_and_square_modes(checkpoint: pathlib.Path, backend: TransformersScoring) -> None:
    square = TransformersScoring.load(
        "s", ModelConfig(path=str(checkpoint), image_mode="square"), checkpoint
    )
    text = "<image>\nWhat is it?"
    wide = wide_image()
    same = Image.effect_noise((32, 32), 50).convert("RGB")

    def score(b: TransformersScoring, im: Image.Image) -> float:
        return asyncio.run(b.score([b.prepare(text, im, max_text_tokens=99, truncate=False)]))[0]

    assert score(backend, wide) != pytest.approx(score(square, wide), abs=1e-6)
    assert score(backend, same) == pytest.approx(score(square, same), abs=1e-6)


def test_bfloat16_is_close_to_float32(
    checkpoint: pathlib.Path, backend: TransformersScoring
) -> None:
    bf16 = TransformersScoring.load(
        "b", ModelConfig(path=str(checkpoint), dtype="bfloat16"), checkpoint
    )
    assert bf16.description.dtype == "bfloat16"
    text, image = "<image>\nQuestion: What colour?\nAnswer: Blue.", wide_image()
    ref = asyncio.run(
        backend.score([backend.prepare(text, image, max_text_tokens=99, truncate=False)])
    )
    low = asyncio.run(bf16.score([bf16.prepare(text, image, max_text_tokens=99, truncate=False)]))
    assert low[0] == pytest.approx(ref[0], abs=0.05 + 0.02 * abs(ref[0]))


def test_description(backend: TransformersScoring, checkpoint: pathlib.Path) -> None:
    d = backend.description
    assert d.backend == "transformers" and d.device == "cpu" and d.dtype == "float32"
    assert d.family in {"llava", "idefics3"}
    # LLaVA: (56/14)^2; Idefics3: (64/16)^2 / 2^2 image tokens + 2 <fake_token_around_image>
    # + <global-img>
    assert d.image_tokens == (16 if d.family == "llava" else 7)
    assert d.model_id == checkpoint.name and len(d.revision) == 12


def test_an_image_that_fills_max_length_is_refused_even_when_truncating(
    checkpoint: pathlib.Path,
) -> None:
    from align2.server.errors import InvalidArgument

    probe = TransformersScoring.load("p", ModelConfig(path=str(checkpoint)), checkpoint)
    n = probe.description.image_tokens
    tight = TransformersScoring.load(
        "t", ModelConfig(path=str(checkpoint), max_length=n), checkpoint
    )
    for truncate in (False, True):
        with pytest.raises(InvalidArgument, match=f"image: takes {n} tokens, leaving no room"):
            tight.prepare("<image>\nHi", wide_image(), max_text_tokens=99, truncate=truncate)


def test_the_image_processor_resizes_with_pil_where_torchvision_is_installed(
    checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers picks its torchvision image processors whenever torchvision is
    installed (the CUDA image has it), whose resize gives other pixels than the PIL resize
    of the reference's CLIPImageProcessor. Fails on: loading the processor without
    ``backend="pil"`` (this machine has no torchvision: it is made to look installed)."""
    from transformers.models.auto import image_processing_auto as auto

    resolve = auto._resolve_backend
    chosen: list[str] = []

    def recording(*args: object) -> str:
        chosen.append(resolve(*args))  # type: ignore[arg-type]
        return chosen[-1]

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(auto, "_resolve_backend", recording)
    TransformersScoring.load("question", ModelConfig(path=str(checkpoint)), checkpoint)
    assert chosen and set(chosen) == {"pil"}
