"""An App loads its models through its own backend registry: a benchmark or test adds a
backend there instead of editing the module's dicts."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from llm_fakes import MARK, FakeLLM
from support import ServerThread

from align2.client import CurationClient, Sample, Turn
from align2.server import backends
from align2.server.app import App
from align2.server.config import Config, ModelConfig
from align2.server.errors import ConfigError


def _config(tmp_path: pathlib.Path) -> Config:
    config = Config()
    config.score.enabled = False
    config.server.cache_dir = str(tmp_path)
    config.models = {"llm": ModelConfig(path=str(tmp_path), backend="fake")}
    return config


def test_added_backends_stay_in_the_registry() -> None:
    registry = backends.Registry().adding(generation={"fake": lambda n, c, p: FakeLLM()})
    assert set(registry.generation) == {"transformers", "vllm", "fake"}
    assert "fake" not in backends.GENERATION_BACKENDS
    assert set(backends.Registry().generation) == {"transformers", "vllm"}


def test_an_app_serves_a_backend_from_its_registry_only(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.llm\.backend: unknown backend 'fake'"):
        asyncio.run(App(_config(tmp_path)).start())
    llm = FakeLLM()
    registry = backends.Registry().adding(generation={"fake": lambda n, c, p: llm})
    server = ServerThread(_config(tmp_path), registry).start()
    try:
        with CurationClient(server.target, timeout=60) as client:
            [result] = client.align([Sample("s", b"", [Turn("What is it?", "A cup.")])])
    finally:
        server.stop()
    assert MARK in result.turns[0].rewrite.answer
    assert llm.calls  # the registry's instance did the work
