"""Curate: the method end to end on a stream of samples, as a generator produces them.

Per sample, cheapest work first (its turns checked and its image decoded once for both
heads: ``Scorer.begin``; a sample without answers is an error decision before any head):
1. the question head scores it; it is kept when the score is among the top
   ``question_keep_fraction`` of its task type (see selection.py), else dropped;
2. only then the answer head scores each turn; the mean answer score must be among the top
   ``answer_keep_fraction`` of the question-kept samples of its task type. A turn with
   candidate answers scores each; its best counts (``rank_answers.py``'s rule), and a kept
   sample is the sample with each turn's best candidate as its one answer;
3. a kept sample is aligned (rewrite, guards, review) when the stream asked for it.

The stream: at most ``limits.max_stream_inflight`` samples are held at once, from being read
until their decision has been handed to the transport; the next one is read only when a
slot frees, so gRPC flow control slows a producer (or a reader of decisions) that is
faster than the server, and nothing is refused for being early. Decisions come back as they
are made (not in input order; each carries its sample's id). Every accepted sample gets
exactly one decision: a failure of one sample (bad image, deadline) is a decision with an
error; a full model queue is waited out with backoff, within the stream's deadline. A
stream that fails as a whole (misplaced options, shutdown) first answers every sample it
accepted. A kept sample whose alignment fails stays kept (the original), with the
alignment's error on ``aligned`` (decision KEPT_ALIGN_FAILED). Each decision carries
its sample's ``sequence`` (position in the stream), the matching key: ids are the caller's
and may repeat.

Selection (selector.py): thresholds the stream gives (calibration), else windows of scores:
the stream's own, or those every stream naming the same ``selection_key`` on this server
shares (selection_keys.py; never shared across replicas); decisions wait while a window
warms up (``min_window``), within the stream's in-flight bound.

With concurrent samples, the order in which scores reach the selector (and so a borderline
decision) depends on timing; ``max_stream_inflight = 1`` or a single-sample stream makes
decisions repeatable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from align2.client.types import Sample, Turn, choose_candidates
from align2.server import metrics
from align2.server.config import CurateConfig, LimitsConfig
from align2.server.core.align_types import AlignCall, SampleAlignment
from align2.server.core.alignment import Aligner
from align2.server.core.budget import ByteBudget, ByteClaim
from align2.server.core.lifecycle import Lifecycle
from align2.server.core.priority import Priority
from align2.server.core.scoring import Head, SampleScore, Scorer, ScoringSample
from align2.server.core.selection_keys import MAX_NAME_LENGTH, SelectionKeys
from align2.server.core.selector import Holds, SelectorState, StageSelector, StoredScores
from align2.server.errors import (
    Align2Error,
    BackendError,
    InvalidArgument,
    Overloaded,
    StoredScoresFull,
    Unimplemented,
    detached,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_SAMPLE = "sample"
"""How the one-sample Score and Align calls of a stream name their sample in errors."""
_BY_TASK = (
    "question_thresholds",
    "answer_thresholds",
    "question_seed_scores",
    "answer_seed_scores",
)


def _owned(options: CurateOptions) -> CurateOptions:
    """``options`` with its thresholds copied (they may be read in place from the request;
    copied once checked, at their checked size). Seeds are not: the windows copy them into
    arrays and the stream drops them (a list of float objects took 32 bytes a score, and a
    refused stream's copy lived on in reference cycles of the error path until the cyclic
    GC ran: 18 M float objects with 180 streams refused)."""
    return dataclasses.replace(
        options,
        question_thresholds=dict(options.question_thresholds),
        answer_thresholds=dict(options.answer_thresholds),
    )


class Decision(enum.Enum):
    KEPT = "kept"
    KEPT_ALIGN_FAILED = "kept_align_failed"  # kept by both stages; the restyle failed
    DROPPED_QUESTION = "dropped_question"
    DROPPED_ANSWER = "dropped_answer"
    ERROR = "error"


@dataclass(frozen=True)
class CurateOptions:
    """A stream's settings; None takes the configured default. Thresholds and seed scores
    are by task type; ``selection_key`` "" keeps the stream's selection to itself."""

    question_keep_fraction: float | None = None
    answer_keep_fraction: float | None = None
    align: AlignCall | None = None  # the Align settings (no samples) when kept ones are aligned
    priority: Priority = Priority.BULK
    selection_key: str = ""
    question_thresholds: Mapping[str, float] = field(default_factory=dict)
    answer_thresholds: Mapping[str, float] = field(default_factory=dict)
    min_window: int | None = None
    question_seed_scores: Mapping[str, Sequence[float]] = field(default_factory=dict)
    answer_seed_scores: Mapping[str, Sequence[float]] = field(default_factory=dict)


@dataclass
class Curated:
    """The decision on one sample. ``sequence``: the sample's position among the stream's
    samples (from 0), the key that matches the decision to its sample. ``scores`` holds what
    was computed (no answer scores when the question stage dropped it); the thresholds are
    those in force at the decision, ranked among ``*_window_size`` scores (0: a given
    threshold); ``warm_up``: a stage decided before its window reached ``min_window``."""

    id: str
    sequence: int
    decision: Decision
    scores: SampleScore
    question_threshold: float | None = None
    answer_threshold: float | None = None
    question_window_size: int = 0
    answer_window_size: int = 0
    warm_up: bool = False
    aligned: SampleAlignment | None = None
    error: Align2Error | None = None


class Curator:
    """Runs Curate streams over the Score (and, when enabled, Align) cores. The app builds
    it only when Curate is on (``limits.max_stream_inflight`` >= 1); the servicer checks
    that the server is serving before it opens a stream."""

    def __init__(
        self,
        scorer: Scorer,
        aligner: Aligner | None,
        config: CurateConfig,
        limits: LimitsConfig,
        lifecycle: Lifecycle,
        budget: ByteBudget | None = None,
        align_off: str = "",
        scores_freed: Callable[[int], None] | None = None,
    ) -> None:
        """``align_off``: why Align is off (Config.align_off_reason), for the refusal of a
        stream that asks for it. ``scores_freed(nbytes)``: windows were dropped (a stream's
        own as it ends, a key's as it expires), freeing ``nbytes``."""
        self._scorer = scorer
        self._align_off = align_off or "its start-up log says why"
        # Request bytes, shared with Score and Align calls (None: counted, not bounded).
        self._budget = budget if budget is not None else ByteBudget(0)
        self._streams_holds: set[Holds] = set()  # of the streams running now
        self._aligner = aligner
        self._config = config
        self._limits = limits
        self._lifecycle = lifecycle
        self.stored_scores = StoredScores(config.max_stored_scores, scores_freed)
        self.selection_keys = SelectionKeys(
            config.max_selection_keys,
            config.selection_key_idle_seconds,
            config.window,
            config.max_task_types,
            self.stored_scores,
        )

    def _release_held(self) -> None:
        """A sample waits for bytes: no stream can read on, so the held decisions of every
        stream whose samples in flight are all held are made now (their bytes free only
        then; a stream waiting for its own would wait forever)."""
        for holds in list(self._streams_holds):
            holds.check()

    def session(self, options: CurateOptions, holds: Holds) -> Session:
        """Validated settings and selection state for one stream (its own, or its
        selection key's); ``holds``: the stream's held decisions. The caller closes it."""
        fractions = {}
        for key in ("question_keep_fraction", "answer_keep_fraction"):
            value = getattr(options, key)
            value = getattr(self._config, key) if value is None else value
            if not 0 < value <= 1:
                raise InvalidArgument(f"options.{key}: {value} is not in (0, 1]")
            fractions[key] = value
        min_window = self._check_selection(options)
        options = _owned(options)
        if options.align is not None:
            if self._aligner is None:
                raise Unimplemented(
                    f"options.align: Align is disabled on this server ({self._align_off})"
                )
            self._aligner.check(options.align)  # once, not as an error on every kept sample
        key = options.selection_key
        state = (
            self.selection_keys.acquire(key)
            if key
            else SelectorState.fresh(
                self._config.window, self._config.max_task_types, self.stored_scores
            )
        )
        close = (lambda: self.selection_keys.release(key)) if key else state.close
        try:  # a key's windows may already hold other task types than the seeds'
            state.check_seeds(options.question_seed_scores, options.answer_seed_scores)
        except Align2Error:
            close()
            raise
        state.questions.seed(options.question_seed_scores)  # nothing fails from here on
        state.answers.seed(options.answer_seed_scores)
        # The windows hold the seeds now; the stream need not (500 idle streams of 400 KB
        # of seeds each held 3.7 GB with their copies kept).
        options = dataclasses.replace(options, question_seed_scores={}, answer_seed_scores={})
        return Session(
            self._scorer,
            self._aligner if options.align is not None else None,
            options,
            StageSelector(
                fractions["question_keep_fraction"],
                state.questions,
                options.question_thresholds,
                min_window,
                holds,
            ),
            StageSelector(
                fractions["answer_keep_fraction"],
                state.answers,
                options.answer_thresholds,
                min_window,
                holds,
            ),
            close,
        )

    def _check_selection(self, options: CurateOptions) -> int:
        """The stream's min_window, after checking its selection options."""
        window = self._config.window
        if len(options.selection_key) > MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"options.selection_key: {len(options.selection_key)} characters exceeds "
                f"limits.max_name_length {MAX_NAME_LENGTH}"
            )
        limit = self._config.max_task_types
        for name in _BY_TASK:  # sizes first: nothing is copied or iterated before
            by_task = getattr(options, name)
            if len(by_task) > limit:
                raise InvalidArgument(
                    f"options.{name}: {len(by_task)} task types exceeds "
                    f"limits.max_task_types {limit}"
                )
            for task in by_task:
                if len(task) > MAX_NAME_LENGTH:
                    raise InvalidArgument(
                        f"options.{name}: a task of {len(task)} characters exceeds "
                        f"limits.max_name_length {MAX_NAME_LENGTH}"
                    )
        per_stage = {
            name: sum(len(values) for values in getattr(options, name).values())
            for name in ("question_seed_scores", "answer_seed_scores")
        }
        seeds = sum(per_stage.values())
        if seeds > self._config.max_seed_scores:
            most = max(per_stage, key=lambda name: per_stage[name])  # the field to shorten
            raise InvalidArgument(
                f"options.{most}: {seeds} seed scores (both stages) exceeds "
                f"limits.max_seed_scores {self._config.max_seed_scores}"
            )
        for name in ("question_thresholds", "answer_thresholds"):
            for task, value in getattr(options, name).items():
                if not math.isfinite(value):
                    raise InvalidArgument(f"options.{name}: task {task!r}: {value} is not finite")
        for name in ("question_seed_scores", "answer_seed_scores"):
            for task, values in getattr(options, name).items():
                if not all(math.isfinite(v) for v in values):
                    raise InvalidArgument(f"options.{name}: task {task!r}: a score is not finite")
        min_window = self._config.min_window if options.min_window is None else options.min_window
        if not 1 <= min_window <= window:
            raise InvalidArgument(
                f"options.min_window: {min_window} is not in 1..limits.selection_window {window}"
            )
        return min_window

    async def stream(
        self,
        requests: AsyncIterator[CurateOptions | Sample],
        deadline: float | None,
        priority: Callable[[], Priority] = lambda: Priority.BULK,
    ) -> AsyncGenerator[Curated, None]:
        """One decision per sample of ``requests``, as each is made (see the module doc).
        ``priority``: the class of a stream that sends no options (from call metadata), read
        only then (a bad metadata value fails only a stream whose options do not set one).

        A slot is held from reading a sample until its decision has been handed on, so a
        consumer that reads decisions slowly slows the reading of samples too. Raises after
        the accepted samples are answered when the stream itself is wrong (options after a
        sample) or the server stops serving (UNAVAILABLE at once, even while the producer
        is idle: the rest goes to another replica)."""
        slots = asyncio.Semaphore(self._limits.max_stream_inflight)  # >= 1: Curate is on
        finished: asyncio.Queue[asyncio.Task[Curated] | None] = asyncio.Queue()
        working: dict[asyncio.Task[Curated], ByteClaim] = {}  # each with its sample's bytes
        holds = Holds(
            self._limits.max_stream_inflight, lambda: len(working), lambda: self._budget.waiting > 0
        )
        self._streams_holds.add(holds)
        opened: list[Session] = []
        accepted = 0

        def on_done(task: asyncio.Task[Curated]) -> None:
            working.pop(task).release()
            metrics.CURATE_INFLIGHT.dec()
            finished.put_nowait(task)
            holds.check()  # after the input ended, the rest may now all be held

        last_read = time.monotonic()

        async def read() -> None:
            nonlocal accepted, last_read
            session: Session | None = None
            position = 0
            async for request in requests:
                last_read = time.monotonic()
                if isinstance(request, CurateOptions):
                    if position > 0:
                        raise InvalidArgument(
                            f"options: message {position} carries options; only the first "
                            "message of a stream may"
                        )
                    session = self.session(request, holds)
                    opened.append(session)
                    position += 1
                    del request  # an idle stream holds neither its seeds nor its options
                    continue
                if session is None:
                    session = self.session(CurateOptions(priority=priority()), holds)
                    opened.append(session)
                position += 1
                await slots.acquire()
                # The sample's bytes: while they do not fit, no stream reads on (first come,
                # first served), so every stream's held decisions are made (_release_held).
                claim = await self._budget.claim_when_free(
                    _nbytes(request, self._limits), on_wait=self._release_held
                )
                task = asyncio.create_task(session.curate(request, accepted, deadline))
                del request  # the task holds it until its decision, the stream no longer
                accepted += 1
                metrics.CURATE_INFLIGHT.inc()
                working[task] = claim
                task.add_done_callback(on_done)

        def on_read(_: asyncio.Task[None]) -> None:
            holds.end()  # no more samples: what waits for a warm-up may be decided now
            finished.put_nowait(None)

        async def watch_idle(seconds: float) -> None:
            """Release held decisions when the producer pauses (see warm_up_idle_ms)."""
            while True:
                await asyncio.sleep(max(0.0, last_read + seconds - time.monotonic()))
                if time.monotonic() - last_read >= seconds:
                    holds.idle()
                    await asyncio.sleep(seconds)

        reader = asyncio.create_task(read())
        reader.add_done_callback(on_read)
        # At the deadline (a margin before the caller's: transport) held decisions are made,
        # and samples still in work end DEADLINE_EXCEEDED: every accepted one is answered.
        expiry = (
            None if deadline is None else asyncio.get_running_loop().call_at(deadline, holds.expire)
        )
        idle_ms = self._config.warm_up_idle_ms
        watcher = asyncio.create_task(watch_idle(idle_ms / 1000)) if idle_ms > 0 else None
        unregister = self._lifecycle.on_leaving_serving(reader.cancel)
        answered = 0
        try:
            reading = True
            while reading or answered < accepted:
                task = await finished.get()
                if task is None:
                    reading = False
                    continue
                answered += 1
                yield task.result()
                slots.release()  # only now: the decision has been taken off our hands
            if reader.cancelled():  # only on_leaving_serving cancels it before the finally
                self._lifecycle.check_serving()  # raises UNAVAILABLE with the phase's reason
            reader.result()  # the stream's own error, now that every accepted one is answered
        finally:
            self._streams_holds.discard(holds)
            if expiry is not None:
                expiry.cancel()
            unregister()
            reader.cancel()
            if watcher is not None:
                watcher.cancel()
            for task in list(working):
                task.cancel()
            for session in opened:
                session.close()
            # The reader holds the stream's error (raised above by reader.result()), whose
            # traceback holds this frame: held here, the two were a reference cycle that
            # kept the error's frames, the stream's options and seeds among them, until the
            # cyclic GC ran.
            del reader, unregister


class Session:
    """One stream: its settings and its selectors; ``close()`` once, when it ends."""

    def __init__(
        self,
        scorer: Scorer,
        aligner: Aligner | None,
        options: CurateOptions,
        questions: StageSelector,
        answers: StageSelector,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._scorer = scorer
        self._aligner = aligner
        self._options = options
        self._questions = questions
        self._answers = answers
        self._on_close = on_close

    def close(self) -> None:
        """Give back the selection key (its windows then live on for their idle TTL), or the
        scores of the stream's own windows."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def curate(self, sample: Sample, sequence: int, deadline: float | None) -> Curated:
        """The decision on the stream's sample number ``sequence``. Never raises for one
        sample's failure: it becomes the decision's error."""
        result = Curated(sample.id, sequence, Decision.ERROR, SampleScore(id=sample.id))
        try:
            await self._decide(sample, deadline, result)
        except Align2Error as exc:
            result.error = detached(exc)  # its frames hold ``result``
        except Exception as exc:  # a bug on one sample must not end the stream
            log.error("unexpected error in Curate on sample %r", sample.id, exc_info=exc)
            result.error = BackendError(f"sample: internal error: {exc}")
        if result.error is not None:
            result.decision = Decision.ERROR
        metrics.CURATE_DECISIONS.labels(decision=result.decision.value).inc()
        return result

    async def _decide(self, sample: Sample, deadline: float | None, result: Curated) -> None:
        try:
            self._take_task(sample.task)
        except InvalidArgument:
            metrics.REJECTED.labels(reason="invalid").inc()  # as Score counts a bad sample
            raise
        except StoredScoresFull:
            metrics.REJECTED.labels(reason="overloaded").inc()  # the caller is told to retry
            raise
        try:
            await self._stages(sample, deadline, result)
        finally:  # a window the sample took and left empty takes no task-type slot
            for stage in (self._questions, self._answers):
                stage.give_back_window(sample.task)

    async def _stages(self, sample: Sample, deadline: float | None, result: Curated) -> None:
        # One ScoringSample for both stages: checked once, the scores written straight
        # into the decision's (each head decodes the image and lets it go: Scorer).
        work = self._scorer.begin(sample, _SAMPLE)
        result.scores = work.result
        await self._score(work, Head.QUESTION, deadline)
        assert work.result.question_score is not None
        selected = await self._questions.select(sample.task, work.result.question_score)
        result.question_threshold = selected.threshold
        result.question_window_size = selected.window_size
        result.warm_up = selected.warm_up
        if not selected.kept:
            result.decision = Decision.DROPPED_QUESTION
            return
        await self._score(work, Head.ANSWER, deadline)
        answer = work.result
        assert answer.answer_score is not None
        selected = await self._answers.select(sample.task, answer.answer_score)
        result.answer_threshold = selected.threshold
        result.answer_window_size = selected.window_size
        result.warm_up = result.warm_up or selected.warm_up
        if not selected.kept:
            result.decision = Decision.DROPPED_ANSWER
            return
        aligner = self._aligner
        if aligner is not None and self._options.align is not None:
            call = dataclasses.replace(
                self._options.align,
                samples=[choose_candidates(sample, answer.best_candidates)],  # as kept
                priority=self._options.priority,
                deadline=deadline,
                sample_field=_SAMPLE,
            )
            # A failure here, of the sample or of its whole Align call (queues full until the
            # deadline, shutdown), leaves the sample kept: the original, with the reason.
            try:
                outcome = await _when_admitted(lambda: aligner.align(call), deadline)
                result.aligned = outcome.results[0]
            except Align2Error as exc:
                result.aligned = SampleAlignment(id=sample.id, error=detached(exc))
            if result.aligned.error is not None:
                result.decision = Decision.KEPT_ALIGN_FAILED
                return
        result.decision = Decision.KEPT

    def _take_task(self, task: str) -> None:
        """The sample's task type, checked, and both stages' windows for it, taken as the
        sample arrives: one of a task type beyond limits.max_task_types is refused before
        any forward pass, whatever the order of its batch-mates' scores."""
        if len(task) > MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"{_SAMPLE}.task: {len(task)} characters exceeds "
                f"limits.max_name_length {MAX_NAME_LENGTH}"
            )
        for stage in (self._questions, self._answers):
            stage.check_task(task)
        growth = sum(stage.growth(task) for stage in (self._questions, self._answers))
        self._questions.stored.check(growth, f"{_SAMPLE}.task")  # both stages count there
        for stage in (self._questions, self._answers):
            stage.take_window(task)

    async def _score(self, work: ScoringSample, head: Head, deadline: float | None) -> None:
        priority = self._options.priority
        await _when_admitted(
            lambda: self._scorer.score_sample(work, head, priority, deadline), deadline
        )
        error, work.result.error = work.result.error, None  # the decision's, not a score's
        if error is not None:
            raise error


_FIRST_BACKOFF = 0.01
_MAX_BACKOFF = 1.0


async def _when_admitted(attempt: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    """``attempt()``, tried again with exponential backoff while the model queues are full.

    A stream is already bounded (``limits.max_stream_inflight`` samples), so its sample
    waits for room, holding its slot, which slows the stream through flow control, instead
    of coming back as a RESOURCE_EXHAUSTED decision the producer would have to resend.
    The stream's deadline bounds the wait: past it, the refusal is the sample's error."""
    backoff = _FIRST_BACKOFF
    while True:
        with metrics.admission_waits() as refusals:
            try:
                result = await attempt()
            except Overloaded as exc:
                pause = backoff * random.uniform(0.5, 1.0)  # jitter: waiting streams spread
                # The queue gave this sample a turn (its retry_after): not sooner than that.
                pause = max(pause, exc.retry_after or 0.0)
                waits = deadline is None or time.monotonic() + pause < deadline
                refusals.count(waited=waits)
                if not waits:
                    raise
            else:
                # Parts refused without failing the attempt became errors inside its
                # result: not waited out, so overloaded.
                refusals.count(waited=False)
                return result
        await asyncio.sleep(pause)
        backoff = min(backoff * 2, _MAX_BACKOFF)


_TEXT_OVERHEAD = 64
"""Bytes a text holds beyond its characters once converted (a str and its reference):
counted so that thousands of empty texts are not free."""


def _nbytes(sample: Sample, limits: LimitsConfig) -> int:
    """What a stream's sample holds, as its request bytes: its image and texts (UTF-8 at
    most 4 bytes a character; counted as one, as the wire carries mostly ASCII), each text
    with _TEXT_OVERHEAD. Turns over limits.max_turns, and candidates over
    limits.max_candidates, are not read (the transport kept only their count; the sample
    is refused by it at once)."""
    turns = sample.turns if len(sample.turns) <= limits.max_turns else ()
    texts = sum(
        len(turn.question) + len(turn.answer) + 2 * _TEXT_OVERHEAD + _candidates(turn, limits)
        for turn in turns
    )
    return len(sample.image_bytes()) + texts + len(sample.id) + len(sample.task)


def _candidates(turn: Turn, limits: LimitsConfig) -> int:
    if len(turn.candidates) > limits.max_candidates:
        return 0
    return sum(len(c) + _TEXT_OVERHEAD for c in turn.candidates)
