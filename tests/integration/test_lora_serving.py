"""The paper's release format served directly: a [models.NAME] with ``path`` = the
original-LLaVA base and ``adapter`` = the PEFT LoRA reward adapter, through a real server
and align2.client. Scores equal the reference forward with the adapter applied unmerged by
peft (tests/lora_reference.py), for both heads and several samples."""

from __future__ import annotations

import pathlib

import pytest
from lora_reference import OriginalSet, Reference, assert_matches_reference, samples
from support import ServerThread

from align2.client import CurationClient
from align2.server.backends.checkpoint import folder_revision
from align2.server.config import Config, ModelConfig
from align2.server.errors import ConfigError
from align2.server.models.convert_reward import PROVENANCE


def config_for(o: OriginalSet, cache: pathlib.Path, **adapters: pathlib.Path) -> Config:
    config = Config()
    config.server.cache_dir = str(cache)
    config.models = {
        name: ModelConfig(
            path=str(o.base), adapter=str(adapter), vision_tower=str(o.clip), image_mode="square"
        )
        for name, adapter in adapters.items()
    }
    return config


def test_base_plus_adapter_serves_the_reference_scores(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    o = original_llava
    config = config_for(o, tmp_path, question=o.question, answer=o.answer)
    references = (Reference(o.base, o.clip, o.question), Reference(o.base, o.clip, o.answer))
    batch = samples()
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=60) as client:
            reply = client.score_with_info(batch)
    finally:
        server.stop()
    assert_matches_reference(reply.results, references, batch)
    converted = sorted((tmp_path / "converted" / "v1").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in converted] == ["lora-answer", "lora-question"]
    assert all((p / PROVENANCE).is_file() for p in converted)
    assert reply.question_model is not None and reply.answer_model is not None
    assert reply.question_model.revision == folder_revision(converted[1])
    assert reply.answer_model.revision == folder_revision(converted[0])
    # A restart finds the conversions in the cache: nothing is converted again.
    stamps = {p: (p / "model.safetensors").stat().st_mtime_ns for p in converted}
    server = ServerThread(config_for(o, tmp_path, question=o.question, answer=o.answer)).start()
    server.stop()
    assert sorted((tmp_path / "converted" / "v1").iterdir()) == converted
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in converted} == stamps


def test_an_adapter_it_cannot_read_fails_the_start_naming_the_model(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    o = original_llava
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    config = config_for(o, tmp_path / "cache", question=not_an_adapter, answer=o.answer)
    with pytest.raises(ConfigError, match=r"models\.question\.adapter: .*no adapter_config\.json"):
        ServerThread(config).start()
    converted = tmp_path / "cache" / "converted" / "v1"
    leftovers = (
        [p.name for p in converted.iterdir() if p.name.startswith(".")]
        if converted.is_dir()
        else []
    )
    assert leftovers == []
