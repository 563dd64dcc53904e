"""Shared fixtures: offline environment, tiny real models built once per session."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterator

import pytest

# Nothing here may reach a model hub; vLLM runs in-process on loopback (ENVIRONMENT.md).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in-process (``cli.main``: convert-reward, train-heads) configures the
    root logger for the whole process, with a handler on that test's captured stderr; a
    later test's in-process server would log to it after pytest closed it ("Logging
    error ... I/O operation on closed file"). Each test gets the root logger back as it
    found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A LLaVA-1.5-shaped reward checkpoint (Llama + CLIP at layer -2), 16 image tokens."""
    from align2.server.models.builders import build_llava_reward

    return build_llava_reward(
        tmp_path_factory.mktemp("models") / "tiny-llava", image_size=56, patch_size=14
    )


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """An Idefics3 (SmolVLM-shaped) reward checkpoint, random and small."""
    from align2.server.models.builders import build_idefics3_reward

    return build_idefics3_reward(
        tmp_path_factory.mktemp("models") / "tiny-idefics3",
        image_size=64,
        patch_size=16,
        scale_factor=2,
    )


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random Llama causal LM with a ChatML template: the inner LLM of plumbing tests
    (its text is noise; it rarely emits EOS, so its rewrites mostly end "truncated")."""
    from align2.server.models.builders import build_llama_causal_lm

    return build_llama_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where this session builds embedded models: ``ALIGN2_TEST_CACHE`` when set (reused
    across sessions), else one session temp dir shared by every test. Builds nothing."""
    configured = os.environ.get("ALIGN2_TEST_CACHE")
    return pathlib.Path(configured) if configured else tmp_path_factory.mktemp("align2-cache")


@pytest.fixture(scope="session")
def smollm2(embedded_cache_dir: pathlib.Path) -> pathlib.Path:
    """The embedded real SmolLM2-135M-Instruct folder (built once per cache, ~20 s)."""
    from align2.server.models import embedded

    return embedded.ensure(embedded.SMOLLM2, embedded_cache_dir)


@pytest.fixture(scope="session")
def original_llava(tmp_path_factory: pytest.TempPathFactory):
    """The paper's release format in tiny: a CLIP folder, an original-LLaVA base (with a
    Llama-style SentencePiece tokenizer, "legacy": false, as llava-v1.5-7b), and two
    reward adapters written by peft as the reference trainer writes them. They differ in
    the options the converter reads: safetensors vs .bin, plain vs rslora scaling, rank."""
    from lora_reference import OriginalSet

    from align2.server.models import original_builders as ob

    root = tmp_path_factory.mktemp("original")
    clip = ob.build_clip_tower(root / "clip", image_size=56)
    base = ob.build_original_base(root / "llava-base", clip, tokenizer="sentencepiece")
    question = ob.build_reward_adapter(root / "lora-question", base, seed=1, r=8, lora_alpha=16)
    answer = ob.build_reward_adapter(
        root / "lora-answer",
        base,
        seed=2,
        r=4,
        lora_alpha=32,
        use_rslora=True,
        safe_serialization=False,
    )
    return OriginalSet(clip=clip, base=base, question=question, answer=answer)


@pytest.fixture(scope="session")
def converted(original_llava, tmp_path_factory: pytest.TempPathFactory):
    """``original_llava``'s two adapters converted into align2 reward folders (question,
    answer) by ``align2 convert-reward``'s code; read-only for the tests."""
    from align2.server.models.convert_reward import convert_reward

    root = tmp_path_factory.mktemp("converted")
    o = original_llava
    return (
        convert_reward(o.base, o.question, root / "question", vision_tower=o.clip),
        convert_reward(o.base, o.answer, root / "answer", vision_tower=o.clip),
    )
