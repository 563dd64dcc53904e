"""Pixel- and token-level parity with the reference code.

Align2LLaVA's reward models were trained and run with LLaVA's ``llava/mm_utils.py``. The
two functions that shape a reward input are re-implemented here from the reference's text,
independently of align2:

- ``expand2square``: a square of ``tuple(int(x * 255) for x in image_mean)`` (truncated),
  the image pasted at ``(0, (width - height) // 2)`` or ``((height - width) // 2, 0)``, a
  square image returned as it is;
- ``tokenizer_image_token``: the prompt split on ``<image>``, each chunk tokenised alone
  (with BOS), the chunks joined by IMAGE_TOKEN_INDEX (-200), BOS kept once. Tokenising is
  done by the SentencePiece model itself (``sentencepiece.SentencePieceProcessor``), as the
  reference's slow Llama tokenizer did, not by transformers.

The Llama-style SentencePiece model is Mistral-7B v0.1's ``tokenizer.model`` (BPE, byte
fallback, "▁" dummy prefix, ``<unk> <s> </s>`` = 0 1 2 like Llama's, 32000 pieces), a
493 KB file that the locked ``mistral-common`` package ships; it is read from disk, the
package is not imported. It is wrapped as transformers' LlamaTokenizer both ways its
``legacy`` switch goes (transformers 5 defaults to False, which drops the "▁" piece after
``<image>`` when a whole text is tokenised at once) in a tiny LLaVA reward checkpoint.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlamaTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN

from align2.client.types import Turn
from align2.server.backends.base import Prepared
from align2.server.backends.preprocess import pad_to_square, reward_ids
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import ModelConfig
from align2.server.core import templates
from align2.server.models.builders import build_idefics3_reward, build_llava_reward
from align2.server.models.tokenizers import IDEFICS3_SPECIAL_TOKENS, llama_tokenizer

IMAGE_TOKEN_INDEX = -200  # llava/constants.py

# Template texts as align2 renders them, and raw texts around the marker.
TEXTS = [
    templates.question_text([Turn("<image>\nWhat is on the table?"), Turn("Why is it there?")]),
    templates.question_text([Turn(f"Question {i}: how many {i * 7} dogs?") for i in range(4)]),
    templates.answer_text(Turn("  What colour is the bus? ", " Red and white.  ")),
    templates.answer_text(Turn("Is there an answer?", "")),  # empty answer: the question alone
    templates.answer_text(Turn("Qu'est-ce que c'est ? Ünïcödé", "東京の バス 🚌, naïve café.")),
    templates.answer_text(Turn("How much is 12345 + 0.5?", "12345.5, or 1.23e4 (approx.)")),
    "<image>\n  two  leading spaces, runs   of  spaces and trailing   ",
    "<image>",
    "Describe the picture.\n<image>",
    "<image>\n\n\tTabs,\nnewlines\r\nand CRLF.\n",
]


# -- the reference, re-implemented from llava/mm_utils.py ---------------------------------
def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def tokenizer_image_token(prompt: str, encode: Callable[[str], list[int]], bos: int) -> list[int]:
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(items: list[list[int]], sep: list[int]) -> list[list[int]]:
        return [e for pair in zip(items, [sep] * len(items), strict=True) for e in pair][:-1]

    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == bos:
        offset = 1
        input_ids.append(chunks[0][0])
    for x in insert_separator(chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand(ids: list[int], image_ids: list[int]) -> list[int]:
    """The reference's ids with IMAGE_TOKEN_INDEX replaced as HF LLaVA places image features."""
    out: list[int] = []
    for i in ids:
        out.extend(image_ids if i == IMAGE_TOKEN_INDEX else [i])
    return out


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model() -> pathlib.Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations, "mistral-common is in the lock"
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    assert path.is_file(), f"{path}: the Llama-style SentencePiece model these tests use"
    return path


@pytest.fixture(scope="module")
def sp(sp_model: pathlib.Path) -> sentencepiece.SentencePieceProcessor:
    proc = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    # Llama's conventions, which the reference relies on.
    assert (proc.unk_id(), proc.bos_id(), proc.eos_id()) == (0, 1, 2)
    assert proc.encode("\nQ", out_type=str) == ["▁", "<0x0A>", "Q"]  # dummy prefix, bytes
    return proc


def reference_ids(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """tokenizer_image_token with the slow Llama tokenizer: BOS + SentencePiece pieces."""
    return tokenizer_image_token(text, lambda chunk: [sp.bos_id(), *sp.encode(chunk)], sp.bos_id())


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def sp_llava(
    request: pytest.FixtureRequest, sp_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> TransformersScoring:
    legacy = request.param
    folder = build_llava_reward(
        tmp_path_factory.mktemp("models") / f"sp-llava-{legacy}",
        image_size=28,
        patch_size=14,
        tokenizer=llama_tokenizer(sp_model, legacy=legacy),
    )
    return TransformersScoring.load("m", ModelConfig(path=str(folder)), folder)


def test_a_llava_folder_with_a_bare_tokenizer_model_is_refused(
    sp_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """transformers 5 loads a bare ``tokenizer.model`` in a "llava" folder without the
    SentencePiece dummy prefix (``"\\nQ"`` -> ``<0x0A> Q``, the reference ``▁ <0x0A> Q``):
    every score would be of ids the model never saw, so the folder is refused by name."""
    folder = build_llava_reward(
        tmp_path / "bare", image_size=28, patch_size=14, tokenizer=llama_tokenizer(sp_model)
    )
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.tokenize("\nQ") != ["▁", "<0x0A>", "Q"]  # what loading it would give
    refusal = r"needs a tokenizer.json \(it has only tokenizer.model\).*convert-reward"
    with pytest.raises(ValueError, match=refusal):
        TransformersScoring.load("m", ModelConfig(path=str(folder)), folder)


def image_ids(backend: TransformersScoring) -> list[int]:
    """LLaVA-1.5's image tokens, counted from the config: one per patch (no CLS)."""
    config = backend._base.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return [config.image_token_id] * patches


def forward_inputs(backend: TransformersScoring, prepared: Prepared) -> dict[str, torch.Tensor]:
    """What the backend passes to the model's forward, captured by a hook."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = backend._base.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        asyncio.run(backend.score([prepared]))
    finally:
        handle.remove()
    return seen


# -- pixels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(7, 3), (3, 7), (5, 5), (1, 9), (9, 1), (2, 7), (8, 3)])
def test_pad_to_square_equals_expand2square_pixel_for_pixel(size: tuple[int, int]) -> None:
    image = Image.effect_noise(size, 80).convert("RGB")
    theirs = expand2square(image, tuple(int(x * 255) for x in OPENAI_CLIP_MEAN))
    ours = pad_to_square(image, OPENAI_CLIP_MEAN)
    assert ours.size == theirs.size and ours.mode == theirs.mode
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    if size[0] == size[1]:
        assert ours is image  # returned as is, as the reference does


def test_pad_colour_truncates_like_the_reference() -> None:
    corner = pad_to_square(Image.new("RGB", (4, 2), (0, 0, 0)), OPENAI_CLIP_MEAN).getpixel((0, 0))
    assert corner == (122, 116, 104)  # int(); rounding would give (123, 117, 104)
    grey = pad_to_square(Image.new("RGB", (4, 2)), (0.5, 0.5, 0.5)).getpixel((0, 0))
    assert grey == (127, 127, 127)  # SmolVLM's mean 0.5: int(127.5)


def test_pixels_at_the_forward_are_the_reference_preprocessing(
    sp_llava: TransformersScoring,
) -> None:
    image = Image.effect_noise((9, 5), 80).convert("RGB")
    prepared = sp_llava.prepare("<image>\nWhat?", image, max_text_tokens=99, truncate=False)
    seen = forward_inputs(sp_llava, prepared)
    processor = sp_llava._processor.image_processor
    square = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    expected = processor(square, return_tensors="pt")["pixel_values"]
    assert torch.equal(seen["pixel_values"], expected)


# -- token ids ------------------------------------------------------------------------------
def test_reference_ids_of_the_example_in_the_docs(sp: sentencepiece.SentencePieceProcessor) -> None:
    ids = reference_ids(sp, "<image>\nQuestion: What is it?")
    assert ids[:4] == [1, IMAGE_TOKEN_INDEX, sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_at_the_forward_equal_tokenizer_image_token(
    sp_llava: TransformersScoring, sp: sentencepiece.SentencePieceProcessor, text: str
) -> None:
    prepared = sp_llava.prepare(text, Image.new("RGB", (6, 4)), max_text_tokens=999, truncate=False)
    seen = forward_inputs(sp_llava, prepared)
    expected = expand(reference_ids(sp, text), image_ids(sp_llava))
    assert seen["input_ids"][0].tolist() == expected
    assert prepared.tokens == len(expected)
    assert sp.eos_id() not in expected


def test_marker_ids_for_an_engine_equal_tokenizer_image_token(
    sp_model: pathlib.Path, sp: sentencepiece.SentencePieceProcessor
) -> None:
    """The vLLM backend's prompt ids: reward_ids with the unexpanded marker id."""
    for legacy in (False, True):
        tokenizer = llama_tokenizer(sp_model, legacy=legacy)
        marker = tokenizer.convert_tokens_to_ids("<image>")
        for text in TEXTS:
            assert reward_ids(tokenizer, text, [marker]) == expand(
                reference_ids(sp, text), [marker]
            )


def test_truncation_cuts_the_reference_ids_from_the_end(
    sp_llava: TransformersScoring, sp: sentencepiece.SentencePieceProcessor
) -> None:
    text = TEXTS[2]
    prepared = sp_llava.prepare(text, Image.new("RGB", (6, 4)), max_text_tokens=5, truncate=True)
    seen = forward_inputs(sp_llava, prepared)
    image = image_ids(sp_llava)
    expected = expand(reference_ids(sp, text), image)
    assert prepared.truncated
    assert seen["input_ids"][0].tolist() == expected[: len(image) + 5]  # BOS, image, 4 more


# -- what transformers 5 itself does differently from SentencePiece -------------------------
@pytest.mark.xfail(strict=True, reason="transformers 5 orders a tokenizer.model's merges by id")
def test_transformers_own_conversion_of_a_tokenizer_model(
    sp_model: pathlib.Path, sp: sentencepiece.SentencePieceProcessor, tmp_path: pathlib.Path
) -> None:
    """Why llama_tokenizer builds the merges itself: loading a folder that has only
    ``tokenizer.model`` (the original LLaVA layout) gives "▁▁" the first merge, so runs of
    spaces tokenise unlike SentencePiece (and the reference)."""
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a  b", add_special_tokens=False)["input_ids"] == sp.encode("a  b")


@pytest.mark.xfail(strict=True, reason="Metaspace adds no '▁' to a text that starts with one")
def test_a_part_that_starts_with_a_space(
    sp_model: pathlib.Path, sp: sentencepiece.SentencePieceProcessor
) -> None:
    """transformers 5's Llama tokenizer gives " a" no dummy prefix (SentencePiece: "▁▁a").
    The templates never produce such a part: the text after ``<image>`` starts with a
    newline, and the part before it is empty."""
    tokenizer = llama_tokenizer(sp_model)
    marker = tokenizer.convert_tokens_to_ids("<image>")
    text = "<image> a space after the marker"
    assert reward_ids(tokenizer, text, [marker]) == expand(reference_ids(sp, text), [marker])


# -- Idefics3: a byte-level BPE gives the same ids either way ------------------------------
@pytest.mark.parametrize("splitting", [False, True], ids=["whole", "split"])
def test_idefics3_ids_are_what_its_processor_gives_for_the_whole_text(
    tiny_idefics3: pathlib.Path, tmp_path: pathlib.Path, splitting: bool
) -> None:
    """Unchanged by reward_ids: before it, the processor tokenised the whole text."""
    folder = tiny_idefics3
    if splitting:  # the expansion then holds row/column markers and newlines
        folder = build_idefics3_reward(
            tmp_path / "split", image_size=64, patch_size=16, scale_factor=2,
            do_image_splitting=True,
        )  # fmt: skip
    config = ModelConfig(path=str(folder), image_mode="square", max_length=4096)
    backend = TransformersScoring.load("m", config, folder)
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.effect_noise((150, 70), 80).convert("RGB")
    for text in TEXTS:
        prepared = backend.prepare(text, image, max_text_tokens=999, truncate=False)
        whole = processor(text=[text], images=[[image]])
        assert prepared.payload.input_ids.tolist() == whole["input_ids"][0]
    assert (backend.description.image_tokens == 0) == splitting


@pytest.mark.slow
def test_embedded_reward_tokenizer_ids_are_unchanged(smollm2: pathlib.Path) -> None:
    """The embedded defaults' tokenizer (SmolLM2's byte-level BPE plus the Idefics3 tokens):
    tokenising the parts alone gives the ids of tokenising the whole text, so the trained
    heads saw the same ids."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
    marker = tokenizer.convert_tokens_to_ids("<image>")
    for text in TEXTS:
        assert reward_ids(tokenizer, text, [marker]) == tokenizer(text)["input_ids"]


def test_an_image_is_padded_once_per_colour() -> None:
    """Every forward pass of a sample pads its image: the square is made once and shared
    (a vLLM prompt holds its image until its batch runs), also when the passes are prepared
    at once in several threads. Fails on: a new square per call, or per thread."""
    image = Image.effect_noise((9, 4), 80).convert("RGB")
    first = pad_to_square(image, OPENAI_CLIP_MEAN)
    assert pad_to_square(image, OPENAI_CLIP_MEAN) is first
    grey = pad_to_square(image, (0.5, 0.5, 0.5))  # another model's colour: its own square
    assert grey is not first and grey.getpixel((0, 0)) == (127, 127, 127)
    assert np.array_equal(
        np.asarray(first), np.asarray(pad_to_square(image.copy(), OPENAI_CLIP_MEAN))
    )

    wide = Image.new("RGB", (3000, 1000), (1, 2, 3))
    with ThreadPoolExecutor(4) as pool:
        squares = list(pool.map(lambda _: pad_to_square(wide, OPENAI_CLIP_MEAN), range(16)))
    assert len({id(square) for square in squares}) == 1
