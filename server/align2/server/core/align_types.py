"""The domain types of Align: what a call asks for and what it gets back."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from align2.client.types import Sample, Turn
from align2.server.backends.base import ModelDescription
from align2.server.core.priority import Priority
from align2.server.core.validation import SAMPLE_FIELD
from align2.server.errors import Align2Error


class Parts(enum.Enum):
    """Which parts of each turn are rewritten."""

    QUESTIONS = "questions"
    ANSWERS = "answers"
    BOTH = "both"

    @property
    def questions(self) -> bool:
        return self is not Parts.ANSWERS

    @property
    def answers(self) -> bool:
        return self is not Parts.QUESTIONS


REVIEW = "review"
"""Reason of a turn the review decided (see its margin)."""
UNREVIEWED = "unreviewed"
"""Reason of a rewrite kept without review (the call switched the review off)."""
UNCHANGED = "unchanged"
"""Reason of a rewrite identical to its original: nothing to review, the original stays."""


class Kept(enum.StrEnum):
    ORIGINAL = "original"
    REWRITE = "rewrite"


@dataclass(frozen=True)
class DecodingOptions:
    """Per-call overrides of the configured decoding (None: the server's default)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class AlignCall:
    """One Align request in domain terms."""

    samples: Sequence[Sample]
    parts: Parts = Parts.BOTH
    review: bool | None = None  # None: the configured default
    decoding: DecodingOptions = DecodingOptions()
    template: str = ""  # empty: the configured default set
    priority: Priority = Priority.BULK
    deadline: float | None = None  # time.monotonic() instant
    sample_field: str = SAMPLE_FIELD
    """How error messages name sample ``index`` (a Curate stream's calls say ``sample``)."""
    options_field: str = "options"
    """How error messages name the call's AlignOptions (a Curate stream's:
    ``options.align_options``)."""


@dataclass(frozen=True)
class AlignedTurn:
    """One turn: the original as sent, the rewrite (marker restored), which was kept, why."""

    original: Turn
    rewrite: Turn
    kept: Kept
    reason: str  # REVIEW, UNREVIEWED, UNCHANGED or a guard name
    margin: float | None = None
    """Set when the review ran: mean over both orders of P(rewrite) - P(original)."""


@dataclass
class SampleAlignment:
    """The turns of one sample, in order, or its error (then no turns)."""

    id: str
    turns: list[AlignedTurn] = field(default_factory=list)
    error: Align2Error | None = None


@dataclass
class AlignOutcome:
    """One result per request sample, same order, plus what produced them.

    ``compute_seconds``: wall time during which the LLM was working on this call's requests
    (overlapping requests counted once); ``queue_seconds``: the rest of the call's time.
    """

    results: list[SampleAlignment]
    model: ModelDescription
    template_name: str
    template_sha256: str
    prompt_tokens: int
    generated_tokens: int
    queue_seconds: float
    compute_seconds: float
