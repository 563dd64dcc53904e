"""The reward templates against the reference's ``preprocess_qa``, typed out independently
in tests/lora_reference.py, on any text: markers anywhere, blank and empty answers, runs of
whitespace (the method's data has an empty candidate answer: answer-dev.json)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lora_reference import answer_text as reference_answer
from lora_reference import question_text as reference_questions

from align2.client.types import Turn
from align2.server.core import templates

PIECES = st.sampled_from(["<image>", " ", "\n", "\t", "a", "Why?", "é", "\r\n", "", "<im"])
TEXTS = st.lists(PIECES, max_size=8).map("".join)


@given(question=TEXTS, answer=TEXTS)
def test_answer_text_is_the_reference_prompt(question: str, answer: str) -> None:
    assert templates.answer_text(Turn(question, answer)) == reference_answer(question, answer)


@given(questions=st.lists(TEXTS, min_size=1, max_size=4))
def test_question_text_is_the_reference_prompt(questions: list[str]) -> None:
    turns = [Turn(q) for q in questions]
    assert templates.question_text(turns) == reference_questions(questions)


def test_the_edges_spelled_out() -> None:
    assert templates.answer_text(Turn("<image>\nWhat?", "")) == "<image>\nWhat?"
    assert templates.answer_text(Turn("What?", " <image> ")) == "<image>\nQuestion: What?\nAnswer:"
    assert templates.answer_text(Turn(" What? ", "A.\n")) == "<image>\nQuestion: What?\nAnswer: A."
