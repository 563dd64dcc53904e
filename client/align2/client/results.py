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


class ProtocolError(RuntimeError):
    """The server broke the contract (e.g. not one result per sample, in request order)."""


@dataclass(frozen=True)
class ItemError:
    """Why one item was not processed. ``message`` names the field and, where one applies,
    the limit."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ScoreResult:
    """Reward-model scores of one sample.

    ``question_score`` is set when the question head ran; ``answer_scores`` holds one score
    per turn and ``answer_score`` their mean when the answer head ran. When ``error`` is set
    the sample was not scored and every score is empty. Scores are unbounded reals; the two
    heads are on different scales and are never combined.
    """

    id: str
    question_score: float | None = None
    answer_scores: tuple[float, ...] = ()
    answer_score: float | None = None
    error: ItemError | None = None
    question_truncated: bool = False
    answer_truncated: tuple[bool, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the error code by name (``"INVALID_ARGUMENT"``), None when absent."""
        error = None
        if self.error is not None:
            error = {"code": self.error.code.name, "message": self.error.message}
        return {
            "id": self.id,
            "question_score": self.question_score,
            "answer_scores": list(self.answer_scores),
            "answer_score": self.answer_score,
            "question_truncated": self.question_truncated,
            "answer_truncated": list(self.answer_truncated),
            "error": error,
        }


@dataclass(frozen=True)
class ModelRef:
    """A model as the server loaded it."""

    name: str
    model_id: str
    revision: str
    backend: str


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
