"""A bare SentencePiece ``tokenizer.model`` (Vicuna-7B-v1.5, llava-v1.5-7b) is split as
SentencePiece splits it, checked against SentencePiece itself: in the tokenizer loader, the
inner LLM's backend and the reward converter's tokenizer."""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest
import sentencepiece
from transformers import AutoTokenizer, LlamaForCausalLM

from align2.server.backends.base import Message
from align2.server.backends.chat import render
from align2.server.backends.transformers_generation import TransformersGeneration
from align2.server.config import ModelConfig
from align2.server.models.builders import llama_config
from align2.server.models.llava_tokenizer import reward_tokenizer
from align2.server.models.original_builders import sentencepiece_tokenizer
from align2.server.models.sentencepiece_merges import load_tokenizer

# Runs of spaces inside a text: where score order and id order of the merges part.
SPACED = [
    "a  b",
    "The cat   sat on  the mat.",
    "What is on the table?  Why is it there?",
    "code:\n    return  x",
    "numbers 12345  and  symbols",
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    words = ["a", "the", "cat", "sat", "on", "mat", "What", "is", "12", "x", "\n", "é"]
    gaps = [" ", "  ", "   ", "    ", ""]
    rng = random.Random(seed)
    # Not led by spaces: transformers' Metaspace keeps one "▁" fewer than SentencePiece
    # there, a separate difference that no prompt meets (each starts with its template).
    return [
        "Q " + "".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(1, 12)))
        for _ in range(count)
    ]


@pytest.fixture(scope="module", params=["tiny", "mistral-7b-v0.1"])
def vicuna_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A folder with only ``tokenizer.model`` and ``tokenizer_config.json``, as Vicuna's:
    the tiny trained one with Llama's whitespace pieces, or a real Llama-style 32k model
    (Mistral-7B v0.1's, shipped by the locked ``mistral-common``; "▁▁" is id 259 there)."""
    folder = tmp_path_factory.mktemp("vicuna-tokenizer")
    sentencepiece_tokenizer(folder, vocab_size=512, whitespace_pieces=True)
    if request.param != "tiny":
        spec = importlib.util.find_spec("mistral_common")
        assert spec is not None and spec.submodule_search_locations, "in the lock"
        real = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
        (folder / "tokenizer.model").write_bytes(real.read_bytes())
    assert not (folder / "tokenizer.json").exists()
    return folder


def _sentencepiece_ids(folder: pathlib.Path, text: str) -> list[int]:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return [processor.bos_id(), *processor.encode(text)]


def test_a_bare_tokenizer_model_splits_as_sentencepiece(vicuna_tokenizer: pathlib.Path) -> None:
    texts = SPACED + _random_texts(500)
    loaded = load_tokenizer(vicuna_tokenizer, local_files_only=True)
    assert [loaded(t).input_ids for t in texts] == [
        _sentencepiece_ids(vicuna_tokenizer, t) for t in texts
    ]
    # transformers' own load orders the merges by id: "a  b" -> ▁a ▁▁ b, not ▁a ▁ ▁b.
    plain = AutoTokenizer.from_pretrained(vicuna_tokenizer, local_files_only=True)
    differs = [t for t in SPACED if plain(t).input_ids != _sentencepiece_ids(vicuna_tokenizer, t)]
    assert differs == SPACED


def test_a_saved_tokenizer_json_keeps_the_order_and_is_read_as_written(
    vicuna_tokenizer: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """What the reward converter saves: its tokenizer.json holds the score order, and a
    folder with a tokenizer.json is loaded as it is."""
    load_tokenizer(vicuna_tokenizer, local_files_only=True).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    saved = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in SPACED:
        assert saved(text).input_ids == _sentencepiece_ids(vicuna_tokenizer, text)


def test_the_inner_llms_prompt_is_tokenised_as_sentencepiece(
    vicuna_tokenizer: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    folder = tmp_path / "vicuna"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((vicuna_tokenizer / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    LlamaForCausalLM(llama_config(tokenizer, 32, 1, 2, None, 2048)).save_pretrained(folder)
    backend = TransformersGeneration.load("llm", ModelConfig(path=str(folder)), folder)
    messages = [Message(role="user", content="Rewrite:  The cat   sat on  the mat.")]
    text = render(tokenizer, messages)  # Vicuna's text: no chat template in the folder
    expected = _sentencepiece_ids(folder, text)
    assert backend._prompts.ids(messages) == expected  # the ids that reach the model
    assert backend.prompt_tokens(messages) == len(expected)
    assert tokenizer(text).input_ids != expected  # transformers' own load: the test can fail


def test_the_reward_converters_tokenizer_splits_as_sentencepiece(
    vicuna_tokenizer: pathlib.Path,
) -> None:
    tokenizer, _ = reward_tokenizer(vicuna_tokenizer)
    for text in SPACED:
        assert tokenizer(text).input_ids == _sentencepiece_ids(vicuna_tokenizer, text)
