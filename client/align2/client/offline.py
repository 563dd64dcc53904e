"""Offline curation of finite LLaVA files: the method's exact selection
(:mod:`align2.client.selection`) on scores from an align2 server's Score RPC.

Per task type: the question head scores every record and the top ``int(a * N)`` stay; the
answer head scores the turns of those, a conversation's score is the mean of its turns', and
the top ``int(b * N1)`` stay; the task types are then merged. A turn with candidate answers
(a list-valued ``gpt``) counts with its best candidate, which a kept record keeps as the
turn's one answer, as the reference's ``rank_answers.py`` does. Scores go to a
:class:`~align2.client.scorestore.ScoreStore` as each chunk comes back, so a rerun after an
interruption scores only what is missing and selects from the same numbers.

Records are ranked by position (file order, then record order), never matched by id: two
records with the same id are two candidates, and the store tells them apart by content.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from align2.client.aio import AsyncCurationClient, gather_bounded
from align2.client.calls import split_chunks, without_place
from align2.client.records import Inputs, Invalid, InvalidRecords, Record
from align2.client.results import AlignResult, ProtocolError, ScoreReply, ScoreResult
from align2.client.scorestore import (
    HEAD_ANSWER,
    HEAD_QUESTION,
    Scorer,
    ScoreStore,
    TurnScores,
)
from align2.client.selection import (
    DEFAULT_KEEP,
    best_candidates,
    check_fraction,
    conversation_score,
    merge,
    top_fraction,
)
from align2.client.types import Sample, choose_candidates

# Item errors that mean the sample itself cannot be scored, as opposed to a server that is
# busy, stopping or failing (those stop the run: a rerun resumes).
INVALID_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
_ROLES = {HEAD_QUESTION: "question_reward", HEAD_ANSWER: "answer_reward"}

Advance = Callable[[int], Any]
Progress = Callable[[str, int], AbstractContextManager[Advance]]
"""``progress(what, total)``: a context whose value is called with each count done."""


@contextlib.contextmanager
def no_progress(what: str, total: int) -> Iterator[Advance]:
    yield lambda _: None


class RunStopped(RuntimeError):
    """The run stopped before its end for a reason outside the data (an item error of a
    busy or stopping server, a model that changed); what was scored is saved."""


# ---------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class OfflineSettings:
    """How an offline run selects and sends. Fractions as the method's (0.3 and 0.3)."""

    question_keep: float = DEFAULT_KEEP
    answer_keep: float = DEFAULT_KEEP
    skip_invalid: bool = False
    concurrency: int = 4  # Score RPCs in flight at once
    priority: str | None = None
    question_model: str | None = None
    answer_model: str | None = None

    def __post_init__(self) -> None:
        check_fraction(self.question_keep)
        check_fraction(self.answer_keep)
        if self.concurrency < 1:
            raise ValueError(f"concurrency: {self.concurrency} is not positive")


@dataclass
class Stage:
    """One head's stage on one task type. ``candidates``: indices into the task's records,
    in the order the stage ranks them from (input order, then stage 1's rank order);
    ``scores``: one per candidate (the question score, or the mean answer score);
    ``kept``: indices, best first; ``best`` (answer stage): per candidate index, each
    turn's best candidate answer (0 for a turn with one answer)."""

    candidates: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    best: dict[int, list[int]] = field(default_factory=dict)

    @property
    def kept_scores(self) -> list[float]:
        by_index = dict(zip(self.candidates, self.scores, strict=True))
        return [by_index[i] for i in self.kept]


@dataclass
class Outcome:
    """What a run decided: per task type both stages, the merged kept records (a record
    with candidate answers with its best candidates chosen: ``choose_candidates``), and
    how many samples each head sent and took from the store."""

    inputs: Inputs
    scorers: dict[str, Scorer]
    question: dict[str, Stage]
    answer: dict[str, Stage]
    kept: list[Record]
    sent: dict[str, int]
    cached: dict[str, int]


class OfflineCuration:
    """One run over ``Inputs`` with an :class:`AsyncCurationClient`; scores are read from
    and appended to ``store``."""

    def __init__(
        self,
        client: AsyncCurationClient,
        store: ScoreStore,
        settings: OfflineSettings,
        progress: Progress = no_progress,
    ) -> None:
        self._client = client
        self._store = store
        self._settings = settings
        self._progress = progress

    async def run(self, inputs: Inputs) -> Outcome:
        scorers = await self._scorers()
        outcome = Outcome(inputs, scorers, {}, {}, [], {}, {})
        items = [(t, i) for t, records in inputs.tasks.items() for i in range(len(records))]
        found = await self._score(HEAD_QUESTION, inputs, items, outcome)
        for task, records in inputs.tasks.items():
            candidates = [i for i in range(len(records)) if (task, i) in found]
            outcome.question[task] = _stage(
                candidates, [found[task, i] for i in candidates], self._settings.question_keep
            )
        items = [(t, i) for t, stage in outcome.question.items() for i in stage.kept]
        turns = await self._score(HEAD_ANSWER, inputs, items, outcome)
        for task, stage in outcome.question.items():
            candidates = [i for i in stage.kept if (task, i) in turns]
            means = [conversation_score(turns[task, i]) for i in candidates]
            answer = _stage(candidates, means, self._settings.answer_keep)
            answer.best = {i: best_candidates(turns[task, i]) for i in candidates}
            outcome.answer[task] = answer
        kept = {
            task: [_chosen(inputs.tasks[task][i], s.best[i]) for i in s.kept]
            for task, s in outcome.answer.items()
        }
        outcome.kept = merge(kept)
        return outcome

    async def _scorers(self) -> dict[str, Scorer]:
        """Each head's model revision and the template version, as the server reports them
        now: only scores stored under these are reused."""
        info = await self._client.server_info()
        if "Score" not in info.services:
            raise RunStopped(f"the server does not serve Score (it serves {list(info.services)})")
        wanted = {
            HEAD_QUESTION: self._settings.question_model,
            HEAD_ANSWER: self._settings.answer_model,
        }
        scorers = {}
        for head, name in wanted.items():
            matches = [
                m.ref
                for m in info.models
                if (m.ref.name == name if name else _ROLES[head] in m.role.split("+"))
            ]
            if not matches:
                known = [(m.ref.name, m.role) for m in info.models]
                raise RunStopped(
                    f"the server reports no model for the {head} head "
                    f"({name or _ROLES[head]}); its models: {known}"
                )
            ref = matches[0]
            scorers[head] = Scorer(head, ref.revision, info.template_version, ref.settings)
        return scorers

    async def _score(
        self, head: str, inputs: Inputs, items: list[tuple[str, int]], outcome: Outcome
    ) -> dict[tuple[str, int], Any]:
        """Scores of ``items`` (task, index) by ``head``: stored ones, then the others sent
        in chunks, at most ``concurrency`` at once, each chunk stored as it comes back.
        Items that turn out invalid are left out (listed in ``inputs.invalid``)."""
        scorer = outcome.scorers[head]
        found: dict[tuple[str, int], Any] = {}
        todo = []
        for item in items:
            record = inputs.tasks[item[0]][item[1]]
            stored = self._store.get(scorer.key(record.sample.id, record.digest, record.image_size))
            if stored is None:
                todo.append(item)
            else:
                found[item] = stored
        outcome.sent[head], outcome.cached[head] = len(todo), len(items) - len(todo)
        chunks = split_chunks(todo, self._client.chunk_size)
        with self._progress(f"{head} head", len(todo)) as advance:

            async def send(n: int) -> None:
                await self._send(
                    head,
                    [(i, inputs.tasks[i[0]][i[1]]) for i in chunks[n]],
                    scorer,
                    found,
                    inputs.invalid,
                )
                advance(len(chunks[n]))

            await gather_bounded(len(chunks), send, self._settings.concurrency)
        return found

    async def _send(
        self,
        head: str,
        chunk: list[tuple[tuple[str, int], Record]],
        scorer: Scorer,
        found: dict[tuple[str, int], Any],
        invalid: list[Invalid],
    ) -> None:
        settings = self._settings
        reply = await when_room(
            lambda: self._client.score_with_info(
                [record.sample for _, record in chunk],
                [head],
                priority=settings.priority,
                question_model=settings.question_model,
                answer_model=settings.answer_model,
            )
        )
        answered = _identity(head, reply) or scorer
        entries, bad, failed = [], [], []
        for (item, record), result in zip(chunk, reply.results, strict=True):
            value, problem = _value(head, record.sample, result)
            if value is not None:
                key = answered.key(record.sample.id, record.digest, record.image_size)
                entries.append((key, value))
                found[item] = value
            elif result.error is not None and result.error.code not in INVALID_CODES:
                failed.append(f"{_where(record)}: {head} head: {problem}")
            else:
                bad.append(Invalid(record.file, record.index, record.sample.id, head, problem))
        self._store.add(entries)  # kept whatever happens next
        if answered != scorer:
            raise RunStopped(
                f"the server's {head} head changed during the run (revision "
                f"{scorer.revision!r} -> {answered.revision!r}, settings "
                f"{scorer.settings!r} -> {answered.settings!r}, templates "
                f"{scorer.template_version!r} -> {answered.template_version!r})"
            )
        if failed:
            raise RunStopped(failed[0] + (f" (and {len(failed) - 1} more)" if failed[1:] else ""))
        invalid.extend(bad)
        if bad and not settings.skip_invalid:
            raise InvalidRecords(bad)


def _stage(candidates: list[int], scores: list[float], keep: float) -> Stage:
    return Stage(candidates, scores, [candidates[j] for j in top_fraction(scores, keep)])


def _chosen(record: Record, best: list[int]) -> Record:
    """The record as kept: each turn's best candidate answer as its one answer."""
    if not record.sample.has_candidates:
        return record
    return dataclasses.replace(record, sample=choose_candidates(record.sample, best))


T = TypeVar("T")
PACING_ROUNDS = 8
"""Times a chunk refused as RESOURCE_EXHAUSTED (after gRPC's own retries) is sent again."""
PACING_FIRST_PAUSE = 0.5
PACING_MAX_PAUSE = 30.0


async def when_room(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, sent again while the server refuses it as too busy: RESOURCE_EXHAUSTED
    with a retry delay (``grpc-retry-pushback-ms`` >= 0), once gRPC's own retries are
    spent. The pauses double from 0.5 s to 30 s, jittered, and are never shorter than the
    server's delay: a long run paces itself to a busy server instead of stopping. Score
    changes nothing, so sending it again is safe. A refusal that says not to retry
    (pushback -1), or that carries no delay (the client's own, e.g. a message too large),
    stands, and so does the one after :data:`PACING_ROUNDS` more tries (45-92 s of pauses
    and the calls' own time): the run stops, and the same command resumes."""
    pause = PACING_FIRST_PAUSE
    for _ in range(PACING_ROUNDS):
        try:
            return await call()
        except grpc.RpcError as error:
            delay = _retry_delay(error)
            if delay is None:
                raise
        await asyncio.sleep(max(delay, pause * random.uniform(0.5, 1.0)))
        pause = min(pause * 2, PACING_MAX_PAUSE)
    return await call()


def _retry_delay(error: grpc.RpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED refusal asks to wait; None when it is another
    error or says not to retry."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailers = dict(error.trailing_metadata() or ())
    try:
        millis = int(trailers.get("grpc-retry-pushback-ms", ""))
    except ValueError:
        return None
    return None if millis < 0 else millis / 1000


def _identity(head: str, reply: ScoreReply) -> Scorer | None:
    """Who answered: None when no RPC was made (every sample failed locally)."""
    if not reply.calls:
        return None
    model = reply.question_model if head == HEAD_QUESTION else reply.answer_model
    if model is None:
        raise ProtocolError(f"Score reply without the {head} head's model")
    return Scorer(head, model.revision, reply.template_version, model.settings)


def _value(head: str, sample: Sample, result: ScoreResult) -> tuple[Any, str]:
    """The head's score(s) of one result, or None and what is wrong."""
    if result.error is not None:  # the record is named by the caller: not its place in a call
        return None, f"{result.error.code.name}: {without_place(result.error.message)}"
    if head == HEAD_QUESTION:
        if result.question_score is None:
            raise ProtocolError(f"sample {result.id!r}: no question score and no error")
        value: Any = result.question_score
        scores: tuple[float, ...] = (value,)
    else:
        value = _turn_scores(sample, result)
        scores = tuple(x for s in value for x in (s if isinstance(s, tuple) else (s,)))
    if any(math.isnan(s) for s in scores):
        return None, f"{head} score is NaN"
    return value, ""


def _turn_scores(sample: Sample, result: ScoreResult) -> TurnScores:
    """Per turn, its answer's score, or its candidates' scores (the best is chosen here,
    from the scores, by the reference's rule)."""
    turns = sample.turns
    if len(result.answer_scores) != len(turns):
        raise ProtocolError(
            f"sample {result.id!r}: {len(result.answer_scores)} answer "
            f"scores for {len(turns)} turns"
        )
    if not sample.has_candidates:
        return tuple(result.answer_scores)
    candidates = result.answer_candidates
    if len(candidates) != len(turns) or any(
        len(c.scores) != len(t.answers) for c, t in zip(candidates, turns, strict=True)
    ):
        counts = [len(c.scores) for c in candidates]
        raise ProtocolError(
            f"sample {result.id!r}: candidate scores {counts} for the candidate answers "
            f"{[len(t.answers) for t in turns]} of its turns"
        )
    return tuple(
        tuple(c.scores) if t.candidates else c.scores[0]
        for c, t in zip(candidates, turns, strict=True)
    )


def _where(record: Record) -> str:
    return f"{record.file}: record {record.index} (id {record.sample.id!r})"


# ---------------------------------------------------------------------------------------
# Align after selection


async def align_kept(
    client: AsyncCurationClient,
    samples: Sequence[Sample],
    options: dict[str, Any],
    *,
    concurrency: int,
    progress: Progress = no_progress,
) -> list[AlignResult]:
    """Align (restyle) ``samples`` in chunks, at most ``concurrency`` at once: one result
    per sample, same order. ``options`` as for :meth:`AsyncCurationClient.align`."""
    chunks = split_chunks(samples, client.chunk_size)
    with progress("align", len(samples)) as advance:

        async def send(n: int) -> list[AlignResult]:
            results = await client.align(chunks[n], **options)
            advance(len(chunks[n]))
            return results

        parts = await gather_bounded(len(chunks), send, concurrency)
    return [result for part in parts for result in part]
