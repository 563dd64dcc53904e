"""Fixtures for the head-training tests: a tiny preference data folder in the real schemas."""

from __future__ import annotations

import json
import pathlib

import pytest

QUESTIONS = ["What is on the table", "Why is the dog here", "How many cups are there"]
ANSWERS = ["A cup.", "There is a red cup on the wooden table.", "Nothing at all, sadly."]


def question_groups(offset: int, count: int) -> list[dict[str, object]]:
    """``count`` question groups: 4 candidates each, one tie, the first marked ``<image>``."""
    groups = []
    for g in range(offset, offset + count):
        candidates = [
            [f"<image>\n{QUESTIONS[g % 3]} in picture {g}?"],
            [f"{QUESTIONS[(g + 1) % 3]}?", "And what else is there?"],
            [f"{QUESTIONS[(g + 2) % 3]} and why, in picture {g}?"],
            ["Describe it."],
        ]
        scores = [0.5, 0.9, 0.7, 0.5 if g % 2 else 0.2]
        groups.append(
            {"id": f"{g:012d}", "image": f"{g:012d}.jpg", "questions": candidates, "score": scores}
        )
    return groups


def answer_records(offset: int, count: int) -> list[dict[str, object]]:
    """``count`` answer records; every other one has two turns; 3 candidates per turn."""
    records = []
    for r in range(offset, offset + count):
        turns: list[dict[str, object]] = []
        for t in range(1 + r % 2):
            marker = "<image>\n" if t == 0 else ""
            turns.append({"from": "human", "value": f"{marker}{QUESTIONS[(r + t) % 3]}?"})
            scores = [0.6, 0.8, 0.6] if t else [0.3, 0.9, 0.5]
            turns.append({"from": "gpt", "value": [f"{a} ({r})" for a in ANSWERS], "score": scores})
        records.append({"id": f"{r:012d}", "image": f"{r:012d}.jpg", "conversations": turns})
    return records


@pytest.fixture(scope="session")
def preference_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The four files of the preference data folder, small: train/dev and test disjoint."""
    folder = tmp_path_factory.mktemp("preference")
    files = {
        "question-train.json": question_groups(0, 10),
        "question-test.json": question_groups(100, 3),
        "answer-dev.json": answer_records(0, 10),
        "answer-test.json": answer_records(100, 3),
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    return folder
