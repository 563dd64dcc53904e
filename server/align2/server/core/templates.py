"""The reward models' input templates, exactly as the method defines them.

No chat template and no system prompt; the tokenizer adds BOS, nothing adds EOS.
question head f(I, Q): all human turns of one conversation, joined by newlines:
    "<image>\\n{q1}\\n{q2}\\n...\\n{qn}"
answer head g(I, Q, A): one turn alone, without earlier turns:
    "<image>\\nQuestion: {q}\\nAnswer: {a}"
Each question and answer has ``<image>`` removed and is stripped, and so is the whole text
(an answer that is blank once cleaned leaves "...Answer:", no trailing space). An empty
answer ("") takes the question head's form of its one question, "<image>\\n{q}": the
reference (``preprocess_qa`` in ``reward_model/llava/data/utils.py``) branches on
``if answer:``, so that is what its answer model scored for such a turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from align2.client.types import Turn
from align2.server.formats import IMAGE_TOKEN

TEMPLATE_VERSION = "align2llava-reward-v1"


def clean(text: str) -> str:
    """Remove every image marker and surrounding whitespace, as the reference does."""
    return text.replace(IMAGE_TOKEN, "").strip()


def question_text(turns: Sequence[Turn]) -> str:
    return (IMAGE_TOKEN + "\n" + "\n".join(clean(t.question) for t in turns)).strip()


def answer_text(turn: Turn) -> str:
    if not turn.answer:  # the reference's ``if answer:`` (before cleaning: "  " is an answer)
        return question_text([turn])
    text = f"{IMAGE_TOKEN}\nQuestion: {clean(turn.question)}\nAnswer: {clean(turn.answer)}"
    return text.strip()
