"""Score: validate, admit, prepare and batch reward-model inputs; collect per-sample results.

Order of work for one call, cheapest refusal first:
1. call-level checks (sample count, heads, model names) -> the whole call fails;
2. per-sample structure checks (empty conversation, empty question, ...) -> that sample fails;
3. admission: queue slots for every forward pass of the call, at once -> RESOURCE_EXHAUSTED
   before any image is decoded;
4. per sample, in worker threads: decode + check the image, render the templates,
   tokenise -> a bad image or text fails only its sample;
5. the items join their model's batcher; the sample's result is assembled in order.

A sample is one ``ScoringSample`` for all of it: checked once, its result filled in place
by each head. Curate uses that across its two stages (``begin``, then ``score_sample`` per
head), so a question-kept sample is not checked again for its answers.

Decoded images are bounded server-wide (limits.max_decoded_image_bytes, estimated from each
header): a sample claims its image's memory before decoding it, waiting its turn when it
does not fit, and gives it back with the image once its forward passes on the heads of one
``score_sample`` (or Score call) are done. The holders never wait for anything else (their
queue slots are reserved before), so a waiting image always gets its turn; Curate decodes a
question-kept sample's image again for its answers rather than hold it between stages.

A turn with candidate answers is one answer-head item per candidate, each the answer
template of the question with that candidate, exactly as if it were the turn's only answer;
the turn's answer score is its best candidate's (highest, first on ties: see
``align2.client.selection.best_candidate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from PIL import Image

from align2.client.selection import best_candidate
from align2.client.types import Sample, Turn
from align2.server import metrics
from align2.server.backends.base import InputTooLong, ModelDescription, Prepared
from align2.server.config import LimitsConfig, ScoreConfig
from align2.server.core import deadlines, templates
from align2.server.core.batcher import Outcome, Reservation, busy_seconds
from align2.server.core.budget import ByteBudget, ByteClaim
from align2.server.core.gather import all_or_first_error
from align2.server.core.images import decoded_bytes, load_image, open_image
from align2.server.core.priority import Priority
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.validation import (
    SAMPLE_FIELD,
    check_sample_count,
    check_turns,
    prefixed,
    sample_error,
)
from align2.server.errors import Align2Error, InvalidArgument, NotFound

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class Head(enum.StrEnum):
    QUESTION = "question"
    ANSWER = "answer"


@dataclass(frozen=True)
class ScoreCall:
    """One Score request in domain terms."""

    samples: Sequence[Sample]
    heads: frozenset[Head] = frozenset(Head)
    question_model: str = ""  # empty: the configured default
    answer_model: str = ""
    priority: Priority = Priority.BULK
    deadline: float | None = None  # time.monotonic() instant
    sample_field: str = SAMPLE_FIELD
    """How error messages name sample ``index`` (a Curate stream's calls say ``sample``)."""


@dataclass
class TurnCandidates:
    """The answer head's scores of one turn's candidate answers, in the order sent."""

    scores: list[float] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    @property
    def best(self) -> int:
        """The highest score's index; the first among equal highest."""
        return best_candidate(self.scores)


@dataclass
class SampleScore:
    """The scores of one sample, or its error (then no scores). ``answer_scores`` and
    ``answer_truncated``: per turn, its answer's (with candidates: its best candidate's);
    ``candidates``: per turn, every candidate's, when some turn of the sample has them."""

    id: str
    question_score: float | None = None
    question_truncated: bool = False
    answer_scores: list[float] = field(default_factory=list)
    answer_truncated: list[bool] = field(default_factory=list)
    error: Align2Error | None = None
    candidates: list[TurnCandidates] = field(default_factory=list)

    @property
    def answer_score(self) -> float | None:
        return statistics.fmean(self.answer_scores) if self.answer_scores else None

    @property
    def best_candidates(self) -> list[int]:
        """Each turn's best candidate (empty when the sample has no candidates)."""
        return [c.best for c in self.candidates]


@dataclass
class ScoreOutcome:
    """One result per request sample, same order, plus what produced them."""

    results: list[SampleScore]
    question_model: ModelDescription | None
    answer_model: ModelDescription | None
    template_version: str
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class _Item:
    """One forward pass a sample needs."""

    head: Head
    where: str  # the field it comes from, for error messages
    text: str  # the rendered template
    turn: int = 0  # the answer head's turn


@dataclass
class _ItemDone:
    item: _Item
    score: float
    truncated: bool
    outcome: Outcome[float]


Plan = Mapping[ScoringRuntime, list[_Item]]


@dataclass(eq=False)
class ScoringSample:
    """One sample on its way through the heads that score it: its structural ``problem``
    (checked once, for every head it may meet) and its ``result``, which each head fills
    in place. Its image is decoded for each pass and let go at its end (_score_sample)."""

    sample: Sample
    where: str  # how error messages name it ("samples[3]", "sample")
    question: ScoringRuntime | None  # the models its heads run on (None: not to be run)
    answer: ScoringRuntime | None
    problem: InvalidArgument | None
    result: SampleScore

    @property
    def padded(self) -> bool:
        """Is its image padded to a square by either model (see images.open_image)?"""
        return any(
            rt is not None and rt.backend.description.image_mode == "pad"
            for rt in (self.question, self.answer)
        )


class Scorer:
    """Runs Score calls against the loaded reward models (``runtimes``, by config name)."""

    def __init__(
        self,
        runtimes: Mapping[str, ScoringRuntime],
        config: ScoreConfig,
        limits: LimitsConfig,
        pool: Executor,
    ) -> None:
        self._runtimes = runtimes
        self._config = config
        self._limits = limits
        self._pool = pool
        self._images = ByteBudget(limits.max_decoded_image_bytes, gauge=metrics.DECODED_IMAGE_BYTES)

    async def score(self, call: ScoreCall) -> ScoreOutcome:
        started = time.monotonic()
        self._check_call(call)
        question, question_desc = self._runtime(
            "question_model", call.question_model, Head.QUESTION in call.heads
        )
        answer, answer_desc = self._runtime(
            "answer_model", call.answer_model, Head.ANSWER in call.heads
        )
        works = [
            self._begin(s, call.sample_field.format(index=i), question, answer)
            for i, s in enumerate(call.samples)
        ]
        outcomes = await self._run(works, call.heads, call.priority, call.deadline)
        return ScoreOutcome(
            results=[w.result for w in works],
            question_model=question_desc,
            answer_model=answer_desc,
            template_version=templates.TEMPLATE_VERSION,
            queue_seconds=max((o.started - started for o in outcomes), default=0.0),
            compute_seconds=busy_seconds(outcomes),
        )

    # -- checks --------------------------------------------------------------------------
    def _check_call(self, call: ScoreCall) -> None:
        check_sample_count(len(call.samples), self._limits.max_samples_per_call)
        if not call.heads:
            raise InvalidArgument("heads: no head to run; valid: question, answer")

    def begin(self, sample: Sample, where: str) -> ScoringSample:
        """A sample both heads will score, on the configured models, one head at a time
        (``score_sample``): Curate's, checked here once for both."""
        question, _ = self._runtime("question_model", "")
        answer, _ = self._runtime("answer_model", "")
        return self._begin(sample, where, question, answer)

    async def score_sample(
        self, work: ScoringSample, head: Head, priority: Priority, deadline: float | None
    ) -> None:
        """Run ``head`` on a begun sample: admission for its forward passes (Overloaded when
        they do not fit: nothing is done), then its scores, or its error, in
        ``work.result``."""
        await self._run([work], frozenset({head}), priority, deadline)

    def _begin(
        self,
        sample: Sample,
        where: str,
        question: ScoringRuntime | None,
        answer: ScoringRuntime | None,
    ) -> ScoringSample:
        # Answers may be empty: the answer head scores an empty one as the method's
        # reference does (templates.answer_text).
        problem = check_turns(
            sample,
            self._limits.max_turns,
            answers_needed=None,
            max_candidates=self._limits.max_candidates,
            max_text_bytes=self._limits.max_text_bytes,
        )
        return ScoringSample(sample, where, question, answer, problem, SampleScore(id=sample.id))

    async def _run(
        self,
        works: Sequence[ScoringSample],
        heads: frozenset[Head],
        priority: Priority,
        deadline: float | None,
    ) -> list[Outcome[float]]:
        """``heads`` on every sample of ``works``: admitted all at once, or none."""
        plans: list[Plan] = [
            {}
            if w.problem
            else _plan(
                w.sample,
                w.question if Head.QUESTION in heads else None,
                w.answer if Head.ANSWER in heads else None,
            )
            for w in works
        ]
        reservations = _reserve_all(plans, deadline)
        try:
            done = await asyncio.gather(
                *(
                    self._score_sample(w, plan, reservations, priority, deadline)
                    for w, plan in zip(works, plans, strict=True)
                )
            )
        finally:
            for reservation in reservations.values():
                reservation.release()
        return [o for outcomes in done for o in outcomes]

    def _runtime(
        self, key: str, name: str, wanted: bool = True
    ) -> tuple[ScoringRuntime | None, ModelDescription | None]:
        """The runtime of model ``name`` (empty: config ``key``'s) and its description;
        None for a head not ``wanted`` (its model is not looked up)."""
        if not wanted:
            return None, None
        name = name or getattr(self._config, key)
        runtime = self._runtimes.get(name)
        if runtime is None:
            raise NotFound(
                f"{key}: unknown model {name!r}; loaded: {', '.join(sorted(self._runtimes))}",
                resource_type="model",
                resource_name=name,
            )
        return runtime, dataclasses.replace(runtime.description, name=name)

    # -- one sample ----------------------------------------------------------------------
    async def _score_sample(
        self,
        work: ScoringSample,
        plan: Plan,
        reservations: Mapping[ScoringRuntime, Reservation],
        priority: Priority,
        deadline: float | None,
    ) -> list[Outcome[float]]:
        if work.problem is not None:
            metrics.REJECTED.labels(reason="invalid").inc()
            work.result.error = prefixed(work.where, work.problem)
            return []
        submitted = dict.fromkeys(plan, 0)
        claim: ByteClaim | None = None
        try:
            opened = await self._in_pool(
                open_image,
                work.sample.image_bytes(),
                max_bytes=self._limits.max_image_bytes,
                max_pixels=self._limits.max_image_pixels,
                padded=work.padded,
            )
            claim = await self._claim_image(decoded_bytes(opened, padded=work.padded), deadline)
            image = await self._in_pool(
                load_image, opened, exif_transpose=self._config.image_exif_transpose
            )
            del opened  # its header parser: the image is decoded
            done = await all_or_first_error(
                self._score_item(rt, item, image, reservations[rt], submitted, priority, deadline)
                for rt, items in plan.items()
                for item in items
            )
        except Exception as exc:
            work.result.error = sample_error(work.where, exc)
            return []
        finally:
            for rt, count in submitted.items():
                reservations[rt].release(len(plan[rt]) - count)
            if claim is not None:  # its forward passes are done: its memory goes to the next
                claim.release()
        _fill(work.result, done, work.sample)
        return [d.outcome for d in done]

    async def _claim_image(self, nbytes: int, deadline: float | None) -> ByteClaim:
        """Claim ``nbytes`` of decoded-image memory, waiting for room until the deadline
        (DeadlineExpired)."""
        claim = self._images.claim_when_free(nbytes)

        def where() -> str:  # read when the deadline is missed: what was held then
            return (
                f"while the image waited for decoding room ({nbytes} bytes decoded, "
                f"{self._images.in_flight} held, limits.max_decoded_image_bytes "
                f"{self._images.limit})"
            )

        async with deadlines.within(deadline, where):
            return await claim

    async def _score_item(
        self,
        runtime: ScoringRuntime,
        item: _Item,
        image: Image.Image,
        reservation: Reservation,
        submitted: dict[ScoringRuntime, int],
        priority: Priority,
        deadline: float | None,
    ) -> _ItemDone:
        try:
            prepared: Prepared = await self._in_pool(
                runtime.backend.prepare,
                item.text,
                image,
                max_text_tokens=self._limits.max_text_tokens,
                truncate=self._limits.truncation == "truncate",
            )
        except InputTooLong as exc:
            raise InvalidArgument(f"{item.where}: {exc} (limits.truncation is reject)") from None
        submitted[runtime] += 1
        outcome = await runtime.batcher.submit(
            prepared,
            cost=prepared.tokens,
            reservation=reservation,
            deadline=deadline,
            priority=priority,
        )
        return _ItemDone(item, outcome.value, prepared.truncated, outcome)

    async def _in_pool(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))


def _plan(
    sample: Sample, question: ScoringRuntime | None, answer: ScoringRuntime | None
) -> dict[ScoringRuntime, list[_Item]]:
    """The forward passes one sample needs, per model (both heads may share one)."""
    plan: dict[ScoringRuntime, list[_Item]] = {}
    if question is not None:
        text = templates.question_text(sample.turns)
        plan.setdefault(question, []).append(_Item(Head.QUESTION, "turns (question)", text))
    if answer is not None:
        plan.setdefault(answer, []).extend(_answer_items(sample))
    return plan


def _answer_items(sample: Sample) -> Iterator[_Item]:
    """The answer head's inputs, in turn order: a turn's answer, or each of its candidates
    as if it were the turn's only answer."""
    for i, turn in enumerate(sample.turns):
        if not turn.candidates:
            yield _Item(Head.ANSWER, f"turns[{i}] (answer)", templates.answer_text(turn), i)
        for j, candidate in enumerate(turn.candidates):
            text = templates.answer_text(Turn(turn.question, candidate))
            yield _Item(Head.ANSWER, f"turns[{i}].answer_candidates[{j}]", text, i)


def _reserve_all(
    plans: Sequence[Plan], deadline: float | None
) -> dict[ScoringRuntime, Reservation]:
    """Admission for the whole call: every model's slots, or none."""
    needed: dict[ScoringRuntime, int] = {}
    for plan in plans:
        for runtime, items in plan.items():
            needed[runtime] = needed.get(runtime, 0) + len(items)
    reservations: dict[ScoringRuntime, Reservation] = {}
    try:
        for runtime, count in needed.items():
            reservations[runtime] = runtime.batcher.reserve(count, deadline)
    except Align2Error:
        for reservation in reservations.values():
            reservation.release()
        raise
    return reservations


def _fill(result: SampleScore, done: list[_ItemDone], sample: Sample) -> None:
    """Put item results (answers in turn and candidate order) into the sample's result."""
    turns: list[TurnCandidates] = []
    for d in done:
        if d.item.head is Head.QUESTION:
            result.question_score = d.score
            result.question_truncated = d.truncated
        else:
            if d.item.turn == len(turns):
                turns.append(TurnCandidates())
            turns[d.item.turn].scores.append(d.score)
            turns[d.item.turn].truncated.append(d.truncated)
    for turn in turns:
        best = turn.best
        result.answer_scores.append(turn.scores[best])
        result.answer_truncated.append(turn.truncated[best])
    if sample.has_candidates:
        result.candidates = turns
