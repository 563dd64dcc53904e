"""A scripted inner LLM implementing the GenerationBackend protocol, for core unit tests.

Rewrites are a function of the last user message's last line (the text to rewrite, in the
default templates); the review prefers whichever version carries :data:`MARK` with
probability ``prefer``, plus a position bias towards the version shown first, so that a
correct both-orders margin is ``2 * prefer - 1`` and a one-order margin is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from align2.server.backends.base import (
    ChoiceRequest,
    Generation,
    GenerationRequest,
    Message,
    ModelDescription,
)
from align2.server.errors import BackendError

MARK = "indeed"


def restyle(text: str) -> str:
    """The default rewrite: the text with a word added (no number, no name)."""
    return f"{text.rstrip('.?')}, {MARK}."


@dataclass
class FakeLLM:
    """GenerationBackend for tests. ``gate``: while cleared, every call waits on it.
    ``calls`` records each call's kind and batch size; ``cancelled`` counts calls cancelled
    while waiting (a continuous engine's abort)."""

    rewrite: Callable[[str], str] = restyle
    prefer: float = 0.8
    bias: float = 0.15
    continuous: bool = False
    control_tokens: tuple[str, ...] = ("<|im_end|>",)
    finished: bool = True
    fail: str | None = None  # a text that makes its batch fail with BackendError
    description: ModelDescription = field(
        default_factory=lambda: ModelDescription(
            name="llm",
            model_id="fake-llm",
            revision="r1",
            backend="fake",
            family="llama",
            dtype="float32",
            device="cpu",
            max_length=400,
            image_tokens=0,
        )
    )
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a call reached the gate
    calls: list[tuple[str, int]] = field(default_factory=list)
    seen: list[GenerationRequest] = field(default_factory=list)
    cancelled: int = 0

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        self.calls.append(("generate", len(batch)))
        self.seen.extend(batch)
        await self._wait()
        out = []
        for request in batch:
            text = _subject(request.messages)
            if self.fail is not None and self.fail in text:
                raise BackendError("scripted failure")
            out.append(
                Generation(
                    text=self.rewrite(text),
                    prompt_tokens=self.prompt_tokens(request.messages),
                    generated_tokens=len(self.rewrite(text).split()),
                    finished=self.finished,
                )
            )
        return out

    async def choose(self, batch: Sequence[ChoiceRequest]) -> list[list[float]]:
        self.calls.append(("choose", len(batch)))
        await self._wait()
        return [self._probabilities(r.messages[-1]["content"]) for r in batch]

    def close(self) -> None:
        pass

    def _probabilities(self, content: str) -> list[float]:
        second = content.find("Version B")
        rewrite_first = 0 <= content.find(MARK) < second
        first = self.prefer if rewrite_first else 1 - self.prefer
        first = min(1.0, first + self.bias)
        return [first, 1 - first]

    async def _wait(self) -> None:
        if self.gate is None:
            return
        self.entered.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _subject(messages: Sequence[Message]) -> str:
    """The text a rewrite prompt asks about: the last line of the last user message, after
    its "Answer: " / "Question: " label if any."""
    line = messages[-1]["content"].splitlines()[-1]
    return line.split(": ", 1)[1] if line.startswith(("Answer: ", "Question: ")) else line
