"""What the client hands back: results and reply metadata as plain values.

A per-item failure is an :class:`ItemError` value on its result, never an exception: one bad
sample does not cost its batch-mates their scores. Only a failure of a whole call raises
(``grpc.RpcError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from align2.client.types import Sample, Turn


class ProtocolError(RuntimeError):
    """The server broke the contract (e.g. not one result per sample, in request order)."""


@dataclass(frozen=True)
class ItemError:
    """Why one item was not processed. ``message`` names the field and, where one applies,
    the limit."""

    code: grpc.StatusCode
    message: str


def _error_dict(error: ItemError | None) -> dict[str, str] | None:
    """JSON-ready: the code by name (``"INVALID_ARGUMENT"``), None when absent."""
    if error is None:
        return None
    return {"code": error.code.name, "message": error.message}


@dataclass(frozen=True)
class CandidateScores:
    """The answer head's scores of one turn's candidate answers (``Turn.candidates``), in
    the order sent. ``best``: the index of the highest score, the first among equal
    highest (as the reference's ``rank_answers.py`` picks it). ``truncated``: per
    candidate, whether its input was cut to fit the model."""

    scores: tuple[float, ...]
    best: int
    truncated: tuple[bool, ...] = ()

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "best": self.best, "truncated": list(self.truncated)}


@dataclass(frozen=True)
class ScoreResult:
    """Reward-model scores of one sample.

    ``question_score`` is set when the question head ran; ``answer_scores`` holds one score
    per turn and ``answer_score`` their mean when the answer head ran. For a sample with
    candidate answers, ``answer_candidates`` holds every candidate's score per turn (a turn
    with a plain answer is one candidate) and the best's index; ``answer_scores`` are then
    the best candidates' scores, ``answer_score`` their mean, and
    ``choose_candidates(sample, result.best_candidates)`` is the sample with the best
    answers. When ``error`` is set the sample was not scored and every score is empty.
    Scores are unbounded reals; the two heads are on different scales and are never
    combined.
    """

    id: str
    question_score: float | None = None
    answer_scores: tuple[float, ...] = ()
    answer_score: float | None = None
    error: ItemError | None = None
    question_truncated: bool = False
    answer_truncated: tuple[bool, ...] = ()
    answer_candidates: tuple[CandidateScores, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def best_candidates(self) -> tuple[int, ...]:
        """Each turn's best candidate; empty when the sample had no candidate answers."""
        return tuple(c.best for c in self.answer_candidates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the error code by name (``"INVALID_ARGUMENT"``), None when absent."""
        return {
            "id": self.id,
            "question_score": self.question_score,
            "answer_scores": list(self.answer_scores),
            "answer_score": self.answer_score,
            "question_truncated": self.question_truncated,
            "answer_truncated": list(self.answer_truncated),
            "answer_candidates": [c.to_dict() for c in self.answer_candidates],
            "error": _error_dict(self.error),
        }


@dataclass(frozen=True)
class ModelRef:
    """A model as the server loaded it."""

    name: str
    model_id: str
    revision: str
    backend: str
    settings: str = ""  # digest of the server settings that change its outputs (the proto's)


@dataclass(frozen=True)
class Timing:
    """Where the time of one call went on the server (seconds)."""

    queue_seconds: float = 0.0
    compute_seconds: float = 0.0

    def __add__(self, other: Timing) -> Timing:
        return Timing(
            self.queue_seconds + other.queue_seconds,
            self.compute_seconds + other.compute_seconds,
        )


@dataclass(frozen=True)
class CallInfo:
    """Metadata of one RPC (one chunk of samples); ``size`` is the samples it carried."""

    size: int
    question_model: ModelRef | None
    answer_model: ModelRef | None
    template_version: str
    timing: Timing


@dataclass(frozen=True)
class ScoreReply:
    """The results of one ``score`` call and the metadata of the RPCs that carried them.

    ``results``: one per input sample, same order. ``calls``: one entry per RPC (chunk), in
    input order; the convenience properties report the first call's models and template,
    which all calls share unless the server reloaded a model mid-run (check ``calls`` then).
    """

    results: list[ScoreResult]
    calls: Sequence[CallInfo] = ()

    @property
    def question_model(self) -> ModelRef | None:
        return next((c.question_model for c in self.calls if c.question_model), None)

    @property
    def answer_model(self) -> ModelRef | None:
        return next((c.answer_model for c in self.calls if c.answer_model), None)

    @property
    def template_version(self) -> str:
        return next((c.template_version for c in self.calls if c.template_version), "")

    @property
    def timing(self) -> Timing:
        """Summed over calls: the server time spent on this reply, not its wall time."""
        return sum((c.timing for c in self.calls), Timing())


# ---------------------------------------------------------------------------------------
# Align


@dataclass(frozen=True)
class AlignedTurn:
    """One turn after Align: the original as sent, the LLM's rewrite, which one was kept
    and why.

    ``kept`` is "original" or "rewrite". ``reason`` is "review" (the review decided; see
    ``margin``), "unreviewed" (review off, rewrite kept), "unchanged" (the rewrite equals
    the original), or the guard that rejected the rewrite: "image_marker",
    "control_token", "truncated", "empty", "numbers_changed", "entities_changed".
    ``margin``, set when the review ran, is the mean over both presentation orders of
    P(rewrite) - P(original), in [-1, 1]; the rewrite is kept iff it is positive.
    """

    original: Turn
    rewrite: Turn
    kept: str
    reason: str
    margin: float | None = None

    @property
    def turn(self) -> Turn:
        """The turn that was kept."""
        return self.rewrite if self.kept == "rewrite" else self.original


@dataclass(frozen=True)
class AlignResult:
    """One sample after Align.

    ``turns``: one per turn of the sample, in order. ``sample``: the input sample with each
    turn replaced by the one kept (image, marker placement, task and extra keys as they
    were), ready for ``write_llava``. When ``error`` is set the sample was not aligned:
    ``turns`` is empty and ``sample`` is None.
    """

    id: str
    turns: tuple[AlignedTurn, ...] = ()
    sample: Sample | None = None
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, like :meth:`ScoreResult.to_dict`."""
        turns = [
            {
                "original": {"question": t.original.question, "answer": t.original.answer},
                "rewrite": {"question": t.rewrite.question, "answer": t.rewrite.answer},
                "kept": t.kept,
                "reason": t.reason,
                "margin": t.margin,
            }
            for t in self.turns
        ]
        return {"id": self.id, "turns": turns, "error": _error_dict(self.error)}


@dataclass(frozen=True)
class TemplateRef:
    """A prompt template set: its name and the sha256 of its files."""

    name: str
    sha256: str


@dataclass(frozen=True)
class TokenCounts:
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.prompt_tokens + other.prompt_tokens,
            self.generated_tokens + other.generated_tokens,
        )


@dataclass(frozen=True)
class AlignCallInfo:
    """Metadata of one Align RPC (one chunk of samples); ``size`` is the samples it carried."""

    size: int
    model: ModelRef | None
    template: TemplateRef | None
    tokens: TokenCounts
    timing: Timing


@dataclass(frozen=True)
class AlignReply:
    """The results of one ``align`` call and the metadata of the RPCs that carried them.

    ``results``: one per input sample, same order. ``calls``: one entry per RPC (chunk), in
    input order; ``model`` and ``template`` are the first call's, ``tokens`` and ``timing``
    are summed over calls.
    """

    results: list[AlignResult]
    calls: Sequence[AlignCallInfo] = ()

    @property
    def model(self) -> ModelRef | None:
        return next((c.model for c in self.calls if c.model), None)

    @property
    def template(self) -> TemplateRef | None:
        return next((c.template for c in self.calls if c.template), None)

    @property
    def tokens(self) -> TokenCounts:
        return sum((c.tokens for c in self.calls), TokenCounts())

    @property
    def timing(self) -> Timing:
        return sum((c.timing for c in self.calls), Timing())


# ---------------------------------------------------------------------------------------
# Curate

DECISIONS = ("kept", "dropped_question", "dropped_answer", "error")


@dataclass(frozen=True)
class CurateResult:
    """The Curate decision on one sample.

    ``decision``: "kept", "dropped_question" (below its task's question threshold),
    "dropped_answer" (below its task's answer threshold, among the question-kept) or
    "error" (then ``error`` says why; the scores computed before it stay). ``scores``: the
    question score, and the answer scores when the question stage kept it. The thresholds
    are those in force at the decision, for the stages it reached; ``*_window_size``: how
    many scores each was ranked among (0: a threshold the stream gave), and ``warm_up``:
    True when a stage decided before its window held the stream's ``min_window`` scores.
    ``aligned``: set when it was kept and the stream asked to align. ``sample``: for a kept
    sample, the sample as kept (each turn's best candidate as its answer when it had
    candidates; restyled when aligned), ready for ``write_llava``; None otherwise.
    """

    id: str
    decision: str
    scores: ScoreResult
    question_threshold: float | None = None
    answer_threshold: float | None = None
    aligned: AlignResult | None = None
    error: ItemError | None = None
    sample: Sample | None = None
    question_window_size: int = 0
    answer_window_size: int = 0
    warm_up: bool = False
    index: int = -1
    """The sample's place among those the caller's iterator gave, from 0 (-1: unknown):
    ids may repeat, this does not; decisions come in any order."""

    @property
    def kept(self) -> bool:
        return self.decision == "kept"

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, like :meth:`ScoreResult.to_dict` (scores and alignment nested)."""
        scores = self.scores.to_dict()
        del scores["id"], scores["error"]
        aligned = None
        if self.aligned is not None:
            aligned = self.aligned.to_dict()
            del aligned["id"], aligned["error"]
        return {
            "id": self.id,
            "index": self.index,
            "decision": self.decision,
            "scores": scores,
            "question_threshold": self.question_threshold,
            "answer_threshold": self.answer_threshold,
            "question_window_size": self.question_window_size,
            "answer_window_size": self.answer_window_size,
            "warm_up": self.warm_up,
            "aligned": aligned,
            "error": _error_dict(self.error),
        }
