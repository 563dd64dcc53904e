"""The server returns exactly the scores the training tool computes: a real server (port 0,
align2.client) against features extracted by the training package, times the installed
head. Fast on a tiny Idefics3; slow (marked) on the embedded defaults with the shipped
heads."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil

import pytest
import torch
from support import ServerThread

from align2.client import CurationClient, Sample, Turn
from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import Config, ModelConfig
from align2.server.models import embedded, heads
from align2.server.training import data, features
from align2.server.training.evaluate import head_scores

QUESTIONS = [
    ["<image>\nWhat is on the table?", "Why is it there?"],
    ["How many cups are there?"],
    ["Describe the picture.\n<image>"],
]
ANSWERS = [
    ("<image>\nWhat is on the table?", "A red cup, half full of coffee."),
    ("<image>\nWhat is on the table?", "Nothing."),
]


def write_files(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """One question group and one answer record holding the candidates above."""
    question = folder / "q.json"
    question.write_text(json.dumps([{"id": "1", "questions": QUESTIONS, "score": [0.1] * 3}]))
    answer = folder / "a.json"
    turns = [
        {"from": "human", "value": ANSWERS[0][0]},
        {"from": "gpt", "value": [a for _, a in ANSWERS], "score": [0.2, 0.1]},
    ]
    answer.write_text(json.dumps([{"id": "1", "conversations": turns}]))
    return question, answer


def tool_scores(folder: pathlib.Path, preference: data.PreferenceSet) -> list[float]:
    """What align2 train-heads computes: features through the backend, times the head."""
    backend = TransformersScoring.load("m", ModelConfig(path=str(folder)), folder)
    try:
        rows, _ = asyncio.run(
            features.extract(backend, preference.texts, batch_size=2, max_text_tokens=2048)
        )
    finally:
        backend.close()
    scores = head_scores(rows, read_reward_checkpoint(folder).score_weight)
    return [float(scores[row]) for row in preference.groups[0].rows]


def server_scores(config: Config) -> tuple[list[float], list[float]]:
    """Question and answer scores of the candidates, from a real server, placeholder image."""
    image = features.placeholder_png()
    questions = [Sample(f"q{i}", image, [Turn(q) for q in c]) for i, c in enumerate(QUESTIONS)]
    answers = [Sample(f"a{i}", image, [Turn(q, a)]) for i, (q, a) in enumerate(ANSWERS)]
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=120) as client:
            question = client.score(questions, ["question"])
            answer = client.score(answers, ["answer"])
    finally:
        server.stop()
    return [r.question_score for r in question], [r.answer_scores[0] for r in answer]  # type: ignore[misc]


def assert_parity(config: Config, folders: dict[str, pathlib.Path], tmp: pathlib.Path) -> None:
    question_file, answer_file = write_files(tmp)
    expected_question = tool_scores(folders["question"], data.load(question_file, "question"))
    expected_answer = tool_scores(folders["answer"], data.load(answer_file, "answer"))
    question, answer = server_scores(config)
    assert question == pytest.approx(expected_question, rel=1e-5, abs=1e-6)
    assert answer == pytest.approx(expected_answer, rel=1e-5, abs=1e-6)
    assert len(set(question)) == len(question)  # distinct inputs, distinct scores


def test_server_scores_equal_the_training_tool_on_a_tiny_model(
    tiny_idefics3: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    folder = pathlib.Path(shutil.copytree(tiny_idefics3, tmp_path / "trained"))
    weight = torch.randn(read_reward_checkpoint(folder).score_weight.shape)
    heads.install(
        folder,
        heads.TrainedHead.from_tensor(
            "question",
            weight,
            backbone_revision=heads.backbone_revision(folder),
            template_version="t",
        ),
    )
    config = Config()
    config.models = {name: ModelConfig(path=str(folder)) for name in ("question", "answer")}
    assert_parity(config, {"question": folder, "answer": folder}, tmp_path)


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The embedded reward models (reused from ALIGN2_TEST_CACHE when set, else ~40 s)."""
    configured = os.environ.get("ALIGN2_TEST_CACHE")
    cache = pathlib.Path(configured) if configured else tmp_path_factory.mktemp("align2-cache")
    for name in ("reward-question", "reward-answer"):
        embedded.ensure(name, cache)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("head", ["question", "answer"])
def test_embedded_defaults_carry_the_shipped_heads(embedded_cache: pathlib.Path, head: str) -> None:
    shipped = heads.shipped(head)
    assert shipped is not None
    folder = embedded.ensure(f"reward-{head}", embedded_cache)
    assert torch.equal(read_reward_checkpoint(folder).score_weight, shipped.tensor())
    # The backbone build is deterministic: the shipped head fits the backbone built here.
    assert heads.backbone_revision(folder) == shipped.backbone_revision


@pytest.mark.slow
def test_server_scores_equal_the_training_tool_on_the_embedded_idefics3_pair(
    embedded_cache: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = Config()
    config.server.cache_dir = str(embedded_cache)
    # The Idefics3 pair with the train-heads heads (the defaults are the LoRA adapters:
    # tests/training/test_lora_training.py and tests/integration/test_embedded_defaults.py).
    config.models = {h: ModelConfig(path=f"embedded:reward-{h}") for h in ("question", "answer")}
    folders = {h: embedded.ensure(f"reward-{h}", embedded_cache) for h in ("question", "answer")}
    assert_parity(config, folders, tmp_path)
