"""The offline model builders, the reward-checkpoint reader and the embedded defaults.

Tiny models come from the session fixtures in tests/conftest.py (``tiny_llava``: 56 px /
14 px patches -> 16 image tokens; ``tiny_idefics3``: 64 px / 16 px / scale 2 -> 4).
The embedded models (real SmolLM2, ~30 s to build) are built once per session under a
temporary cache, or reused from ``ALIGN2_TEST_CACHE`` when that is set.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from align2.server.backends.checkpoint import folder_revision, read_reward_checkpoint
from align2.server.models import embedded
from align2.server.models import llava_original as orig
from align2.server.models.builders import (
    build_idefics3_reward,
    build_llava_reward,
    idefics3_image_tokens,
    llava_image_tokens,
)
from align2.server.models.tokenizers import IDEFICS3_SPECIAL_TOKENS, build_tokenizer

LLAVA_TINY = {"image_size": 56, "patch_size": 14}
IDEFICS3_TINY = {"image_size": 64, "patch_size": 16, "scale_factor": 2}
QUESTION = "<image>\nWhat is the color of the bus?"


def _image() -> Image.Image:
    return Image.new("RGB", (80, 60), (200, 30, 40))


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _transformers_score(folder: pathlib.Path, text: str, image: Image.Image) -> float:
    """The reward as the method defines it: last hidden state at the last token @ head."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    inputs = processor(text=text, images=image, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    head = read_reward_checkpoint(folder).score_weight.float()
    return float(hidden @ head[0])


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_adds_bos_never_eos_and_keeps_special_tokens_whole() -> None:
    tokenizer = build_tokenizer(IDEFICS3_SPECIAL_TOKENS)
    ids = tokenizer("<image>\nQuestion: hi <global-img> wörds 😀").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    for token in IDEFICS3_SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nQuestion: hi  wörds 😀"


def test_tokenizer_chat_template_renders_newlines() -> None:
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- builders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "family", "image_tokens"),
    [
        ("tiny_llava", "llava", llava_image_tokens(56, 14)),
        ("tiny_idefics3", "idefics3", idefics3_image_tokens(64, 16, 2)),
    ],
)
def test_tiny_build_loads_in_transformers_and_expands_image(
    request: pytest.FixtureRequest, fixture: str, family: str, image_tokens: int
) -> None:
    folder: pathlib.Path = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.model_type == family
    ids = processor(text=QUESTION, images=_image(), return_tensors="pt").input_ids[0].tolist()
    assert ids.count(model.config.image_token_id) == image_tokens
    assert ids[0] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.eos_token_id not in ids
    score = _transformers_score(folder, QUESTION, _image())
    assert abs(score) < 20  # an O(1) untrained head, and finite


def test_image_token_counts_of_the_paper_and_smolvlm() -> None:
    assert llava_image_tokens(336, 14) == 576
    assert idefics3_image_tokens(512, 16, 4) == 64


@pytest.mark.parametrize(
    ("build", "sizes"), [(build_llava_reward, LLAVA_TINY), (build_idefics3_reward, IDEFICS3_TINY)]
)
def test_rebuild_is_byte_identical_and_seed_matters(
    tmp_path: pathlib.Path, build: Callable[..., pathlib.Path], sizes: dict[str, int]
) -> None:
    first = _files(build(tmp_path / "a", **sizes))
    assert first == _files(build(tmp_path / "b", **sizes))
    other = _files(build(tmp_path / "c", seed=1, **sizes))
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["config.json"] == first["config.json"]


def test_builder_refuses_a_non_empty_folder(tmp_path: pathlib.Path) -> None:
    (tmp_path / "stale.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        build_idefics3_reward(tmp_path, **IDEFICS3_TINY)


# --- checkpoint reader -------------------------------------------------------------------


def test_reader_finds_the_head(tiny_llava: pathlib.Path, tiny_idefics3: pathlib.Path) -> None:
    llava = read_reward_checkpoint(tiny_llava)
    assert (llava.family, llava.hidden_size, llava.model_id) == ("llava", 64, "tiny-llava")
    assert llava.score_weight.shape == (1, 64)
    assert llava.revision == folder_revision(tiny_llava) and len(llava.revision) == 12
    idefics3 = read_reward_checkpoint(tiny_idefics3, revision="v7")
    assert (idefics3.family, idefics3.revision) == ("idefics3", "v7")
    assert llava.revision != folder_revision(tiny_idefics3)


def test_reader_rejects_a_model_without_num_labels_1(tmp_path: pathlib.Path) -> None:
    folder = build_idefics3_reward(tmp_path / "plain", with_score_head=False, **IDEFICS3_TINY)
    with pytest.raises(ValueError, match=r"config\.json num_labels is 2"):
        read_reward_checkpoint(folder)


def test_reader_rejects_a_config_without_the_head_weights(tmp_path: pathlib.Path) -> None:
    folder = build_idefics3_reward(tmp_path / "plain", with_score_head=False, **IDEFICS3_TINY)
    config = folder / "config.json"
    config.write_text(
        config.read_text().replace('"architectures"', '"num_labels": 1,\n  "architectures"')
    )
    with pytest.raises(ValueError, match=r"no score\.weight"):
        read_reward_checkpoint(folder)


def test_reader_rejects_a_folder_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        read_reward_checkpoint(tmp_path)


# --- vLLM --------------------------------------------------------------------------------


@pytest.mark.vllm
def test_tiny_idefics3_reward_in_vllm_matches_transformers(tiny_idefics3: pathlib.Path) -> None:
    vllm = pytest.importorskip("vllm")
    llm = vllm.LLM(
        model=str(tiny_idefics3),
        runner="pooling",
        convert="classify",
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        dtype="float32",
        max_model_len=512,
    )
    outputs = llm.classify(
        [{"prompt": QUESTION, "multi_modal_data": {"image": _image()}}],
        pooling_params=vllm.PoolingParams(use_activation=False),
    )
    (score,) = outputs[0].outputs.probs  # one raw score: num_labels 1, no sigmoid
    assert score == pytest.approx(_transformers_score(tiny_idefics3, QUESTION, _image()), abs=1e-4)


# --- embedded ----------------------------------------------------------------------------


def test_resolve_maps_plain_paths_and_rejects_unknown_names(tmp_path: pathlib.Path) -> None:
    assert embedded.resolve("/models/x", tmp_path) == pathlib.Path("/models/x")
    with pytest.raises(ValueError, match="reward-question"):
        embedded.resolve("embedded:nope", tmp_path)
    with pytest.raises(ValueError, match="unknown embedded model"):
        embedded.ensure("nope", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built or created for bad names


def test_ensure_publishes_atomically(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    def racing(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
        (target / "config.json").write_text("{}")
        other = embedded.model_dir("fake", cache_dir)  # another process publishes first
        other.mkdir()
        (other / "config.json").write_text('{"winner": 1}')

    monkeypatch.setitem(embedded._BUILDERS, "fake", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.ensure("fake", tmp_path)
    folder = embedded.model_dir("fake", tmp_path)
    assert list(folder.parent.iterdir()) == []  # neither a half-built target nor scratch
    monkeypatch.setitem(embedded._BUILDERS, "fake", racing)
    assert embedded.ensure("fake", tmp_path) == folder
    assert (folder / "config.json").read_text() == '{"winner": 1}'
    assert list(folder.parent.iterdir()) == [folder]


@pytest.fixture(scope="session")
def embedded_cache(embedded_cache_dir: pathlib.Path) -> pathlib.Path:
    """All embedded models, built once per session in the shared cache (conftest.py)."""
    cache = embedded_cache_dir
    for name in embedded.EMBEDDED_NAMES:
        embedded.ensure(name, cache)
    return cache


@pytest.mark.slow
def test_embedded_smollm2_answers_sensibly(embedded_cache: pathlib.Path) -> None:
    folder = embedded.resolve("embedded:smollm2-135m-instruct", embedded_cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_reward_models(embedded_cache: pathlib.Path) -> None:
    question = read_reward_checkpoint(embedded.ensure("reward-question", embedded_cache))
    answer = read_reward_checkpoint(embedded.ensure("reward-answer", embedded_cache))
    assert (question.family, question.hidden_size) == ("idefics3", 576)
    assert question.model_id == "reward-question"
    assert not torch.equal(question.score_weight, answer.score_weight)
    processor = AutoProcessor.from_pretrained(question.path)
    ids = processor(text=QUESTION, images=_image()).input_ids[0]
    assert ids.count(processor.image_token_id) == 64  # SmolVLM geometry: 512 px, 16 px, 4
    assert abs(_transformers_score(question.path, QUESTION, _image())) < 20


@pytest.mark.slow
def test_embedded_lora_defaults_are_in_the_release_format(embedded_cache: pathlib.Path) -> None:
    base = embedded.ensure("reward-base", embedded_cache)
    config = json.loads((base / "config.json").read_text())
    orig.check_supported(config, base)  # raises on what the release reader refuses
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)  # SmolLM2-135M
    assert config["rope_theta"] == 100000.0  # SmolLM2's, not Llama's default
    weights = dict(orig.iter_tensors(orig.weight_files(base)))
    assert not weights["model.mm_projector.2.weight"].any()  # every image -> zeros
    assert not weights["model.mm_projector.2.bias"].any()
    lm_head, embed = weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    # Untied: its own lm_head in the file, and the config says so (tensors read from a
    # file never share memory, so comparing their storage would prove nothing).
    assert torch.equal(lm_head, embed) and config["tie_word_embeddings"] is False
    for name in ("reward-question-lora", "reward-answer-lora"):
        folder = embedded.ensure(name, embedded_cache)
        assert folder.parent == embedded.ADAPTERS_DIR  # read in place, never copied
        adapter = orig.read_adapter(folder)
        layers = {int(module.split(".")[2]) for module in adapter.lora}
        assert layers == {26, 27, 28, 29} and len(adapter.lora) == 4 * 7
        assert any(b.abs().sum() > 0 for _, b in adapter.lora.values())  # trained


@pytest.mark.slow
def test_embedded_ensure_is_cached(embedded_cache: pathlib.Path) -> None:
    folder = embedded.model_dir("reward-answer", embedded_cache)
    before = folder.stat().st_mtime_ns
    assert embedded.ensure("reward-answer", embedded_cache) == folder
    assert folder.stat().st_mtime_ns == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no scratch
