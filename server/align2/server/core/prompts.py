"""Align prompt templates: versioned sets of chat messages, shipped as package data.

A set is a folder ``align2/server/templates/align/<name>/`` with three TOML files:

- ``rewrite-question.toml``: placeholder ``{question}``;
- ``rewrite-answer.toml``: placeholders ``{question}`` (context) and ``{answer}``;
- ``review.toml``: placeholders ``{question_a}``, ``{answer_a}``, ``{question_b}``,
  ``{answer_b}``, plus ``choices``: the labels of the version shown first and second.

Each file holds ``messages``, a list of ``{role, content}`` tables (roles system, user,
assistant; the last one is the user's). The messages are rendered afterwards by the LLM's
own chat template (the backend's business), so a set works for ChatML and Vicuna models
alike. Texts arrive here with the ``<image>`` marker removed: the LLM never sees it.

Why ``str.format`` and not Jinja: a prompt is fixed text with named holes and needs no
logic; the holes are checked when the set loads (a missing or unknown one names the file);
and sample text is inserted once and never parsed again, so braces or template syntax in
a sample are inert. The LLM's control tokens in a sample are not: the backend refuses a
message holding one (backends/chat.py, check_no_control_tokens).

A set is identified by its name and the sha256 of its files (names and bytes, in name
order), reported with every Align response. By convention a changed prompt gets a new
name (``default-v2``); the hash shows any edit either way.
"""

from __future__ import annotations

import hashlib
import string
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from align2.client.types import Turn
from align2.server.backends.base import Message
from align2.server.core.templates import clean
from align2.server.errors import NotFound

REWRITE_QUESTION = "rewrite-question"
REWRITE_ANSWER = "rewrite-answer"
REVIEW = "review"
PLACEHOLDERS: Mapping[str, frozenset[str]] = {
    REWRITE_QUESTION: frozenset({"question"}),
    REWRITE_ANSWER: frozenset({"question", "answer"}),
    REVIEW: frozenset({"question_a", "answer_a", "question_b", "answer_b"}),
}
"""The holes each prompt must use, all of them and no others."""
_ROLES = frozenset({"system", "user", "assistant"})


def templates_root() -> Traversable:
    """The folder of the shipped template sets."""
    return resources.files("align2.server") / "templates" / "align"


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat messages whose contents are ``str.format`` templates."""

    messages: tuple[tuple[str, str], ...]  # (role, content template)

    def render(self, **values: str) -> list[Message]:
        return [{"role": role, "content": text.format(**values)} for role, text in self.messages]


@dataclass(frozen=True)
class TemplateSet:
    """The three prompts of one set, and what identifies it."""

    name: str
    sha256: str
    rewrite_question: Prompt
    rewrite_answer: Prompt
    review: Prompt
    choices: tuple[str, str]  # labels of the version shown first, second

    def question_messages(self, question: str) -> list[Message]:
        return self.rewrite_question.render(question=question)

    def answer_messages(self, question: str, answer: str) -> list[Message]:
        return self.rewrite_answer.render(question=question, answer=answer)

    def rewrite_requests(
        self, turn: Turn, *, questions: bool = True, answers: bool = True
    ) -> list[tuple[str, list[Message]]]:
        """What Align asks the inner LLM for one turn: ("question" | "answer", messages),
        the texts cleaned (marker removed, stripped) as the prompts expect them."""
        question, answer = clean(turn.question), clean(turn.answer)
        requests: list[tuple[str, list[Message]]] = []
        if questions:
            requests.append(("question", self.question_messages(question)))
        if answers:
            requests.append(("answer", self.answer_messages(question, answer)))
        return requests

    def review_messages(self, first: Turn, second: Turn) -> list[Message]:
        return self.review.render(
            question_a=first.question,
            answer_a=first.answer,
            question_b=second.question,
            answer_b=second.answer,
        )


def load_set(folder: Traversable) -> TemplateSet:
    """Read and check the set in ``folder``; ValueError names the file and the problem."""
    raw = {name: (folder / f"{name}.toml").read_bytes() for name in PLACEHOLDERS}
    tables = {name: _parse(folder.name, name, data) for name, data in raw.items()}
    prompts = {name: _prompt(folder.name, name, table) for name, table in tables.items()}
    return TemplateSet(
        name=folder.name,
        sha256=_digest(raw),
        rewrite_question=prompts[REWRITE_QUESTION],
        rewrite_answer=prompts[REWRITE_ANSWER],
        review=prompts[REVIEW],
        choices=_choices(folder.name, tables[REVIEW]),
    )


class TemplateLibrary:
    """Every template set under a root folder, loaded and checked once (at start-up)."""

    def __init__(self, root: Traversable | None = None) -> None:
        root = templates_root() if root is None else root
        folders = sorted((f for f in root.iterdir() if f.is_dir()), key=lambda f: f.name)
        self._sets = {f.name: load_set(f) for f in folders if not f.name.startswith((".", "_"))}

    def __iter__(self) -> Iterator[TemplateSet]:
        return iter(self._sets.values())

    @property
    def names(self) -> list[str]:
        return list(self._sets)

    def get(self, name: str, *, field: str = "template") -> TemplateSet:
        """The set called ``name``; NotFound names ``field`` and lists the valid names."""
        found = self._sets.get(name)
        if found is None:
            raise NotFound(
                f"{field}: unknown template set {name!r}; available: {', '.join(self._sets)}",
                resource_type="template",
                resource_name=name,
            )
        return found


def _parse(set_name: str, name: str, data: bytes) -> dict[str, object]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"template {set_name}/{name}.toml: {exc}") from exc


def _prompt(set_name: str, name: str, table: Mapping[str, object]) -> Prompt:
    where = f"template {set_name}/{name}.toml"
    messages = table.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: needs a non-empty [[messages]] list")
    pairs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}] needs role in {sorted(_ROLES)} and content")
        pairs.append((str(role), content))
    if pairs[-1][0] != "user":
        raise ValueError(f"{where}: the last message must be the user's")
    used = {
        field for _, text in pairs for _, field, _, _ in string.Formatter().parse(text) if field
    }
    expected = PLACEHOLDERS[name]
    if used != expected:
        raise ValueError(
            f"{where}: placeholders {sorted(used)}; expected exactly {sorted(expected)}"
        )
    return Prompt(tuple(pairs))


def _choices(set_name: str, table: Mapping[str, object]) -> tuple[str, str]:
    choices = table.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) != 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
        or choices[0] == choices[1]
    ):
        raise ValueError(f"template {set_name}/{REVIEW}.toml: choices must be two labels")
    return (choices[0], choices[1])


def _digest(raw: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(raw):
        data = raw[name]
        # Length-prefixed so that moving bytes between files changes the hash.
        digest.update(f"{name}.toml\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
