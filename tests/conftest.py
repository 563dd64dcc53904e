"""Shared fixtures: offline environment, tiny real models built once per session."""

from __future__ import annotations

import os
import pathlib

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
