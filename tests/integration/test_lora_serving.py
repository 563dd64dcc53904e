"""The paper's release format served directly: a [models.NAME] with ``path`` = the
original-LLaVA base and ``adapter`` = the PEFT LoRA reward adapter, through a real server
and align2.client. Scores equal the reference forward with the adapter applied unmerged by
peft (tests/lora_reference.py), for both heads and several samples."""

from __future__ import annotations

import pathlib

import pytest
from lora_reference import REL, OriginalSet, Reference, assert_matches_reference, samples
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


def test_one_shared_base_serves_the_merged_scores(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    """``share_base = true`` on both models: one base in memory, each adapter applied per
    batch. Through a real server, the scores equal the merged mode's (converted copies),
    for the whole batch and for each sample alone; nothing is converted; the vision tower
    runs once per image although both heads score every sample."""
    o = original_llava
    batch = samples()
    replies = {}
    for mode in ("merged", "shared"):
        config = config_for(o, tmp_path / mode, question=o.question, answer=o.answer)
        for model in config.models.values():
            model.share_base = mode == "shared"
        server = ServerThread(config).start()
        try:
            with CurationClient(server.target, timeout=60) as client:
                if mode == "shared":
                    base = server.app.scoring_backend("question")._shared
                    assert base is server.app.scoring_backend("answer")._shared
                    warm = base.tower_images  # the warm-up's image
                together = client.score_with_info(batch)
                alone = [client.score_with_info([s]).results[0] for s in batch]
                if mode == "shared":
                    assert base.tower_images - warm == len(batch)  # not once per input
        finally:
            server.stop()
        replies[mode] = (together, alone)
    merged, shared = replies["merged"], replies["shared"]
    for got in (shared[0].results, shared[1]):
        for mine, theirs in zip(got, merged[0].results, strict=True):
            assert mine.error is None
            assert mine.question_score == pytest.approx(theirs.question_score, rel=REL, abs=1e-5)
            assert mine.answer_scores == pytest.approx(theirs.answer_scores, rel=REL, abs=1e-5)
    assert not (tmp_path / "shared" / "converted").exists()
    described = shared[0].question_model, shared[0].answer_model
    assert [m.model_id for m in described if m is not None] == ["lora-question", "lora-answer"]
    assert all(m is not None and len(m.revision) == 12 for m in described)
