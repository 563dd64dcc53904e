"""A Curate stream's selection: given thresholds, or windows (its own or shared), and the
warm-up that decides how early a decision may rest on a small window.

Per stage (question, answer) and task type a decision is made:

- against a **given threshold** when the stream's options carry one for the task
  (calibration): kept iff score >= threshold; no window is read or written;
- else against the task's **window** (selection.py): the stream's own, or the one shared by
  every stream of the same selection key on this server (selection_keys.py). A window may
  start **seeded** with calibration scores: a window takes the seeds of the first stream
  that brings some, once;
- **warm-up**: while the window holds fewer than the stream's ``min_window`` scores, a
  decision is *held*: its score is in the window at once (so it counts for every other
  decision), and its decision waits until the window reaches ``min_window``, then is made
  against the window as it is then. So that a stream never waits for itself, the stream's
  held decisions are all made at once, against what the windows hold, when every sample
  it has in flight is held and (a) those fill its ``limits.max_stream_inflight`` slots (it
  cannot read more), or (b) its input has ended (no more samples will come; also when the
  stream fails as a whole), or (c) its producer has been idle for ``curate.warm_up_idle_ms``,
  or (d) a sample (of any stream) waits for room in ``limits.max_inflight_bytes``: then no
  stream may read on, and held samples keep bytes that only their decisions free. Such a
  decision says ``warm_up``.

Scores are ranked as float32, the precision CurateResponse reports them (and thresholds are
given) in: a client that compares a reported score with a reported or given threshold
finds the server's decision.

All of it runs on the server's one event loop and is never touched from another thread:
plain dicts and lists, no locks. A held decision is an ``asyncio.Future`` resolved by
whichever call makes the window big enough (possibly another stream's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from align2.server import metrics
from align2.server.core.selection import SCORE_BYTES, Selection, Window
from align2.server.errors import InvalidArgument, StoredScoresFull
from align2.server.formats import as_float32


@dataclass(eq=False)
class _Held:
    """A decision waiting for its window to warm up."""

    score: float
    fraction: float
    min_window: int
    holds: Holds
    future: asyncio.Future[Selection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class StoredScores:
    """The scores every window of the server holds, against ``limit`` (0: no bound): the
    memory of selection is bounded by what the server admits, not only per selection.

    Windows count what they add as they add it (they never shrink) and a selection gives
    its windows' scores back when it is dropped (:meth:`SelectorState.close`). Room is
    checked before the work that would add scores: a stream's seeds as it opens, a sample
    as it arrives. A sample admitted while there was room still adds its score, so the
    total may pass the limit by at most the samples in flight (one score each per stage).
    ``on_given_back(nbytes)``: called with the bytes of the scores given back (the app's
    heap trimmer: seeded windows free hundreds of MB that no request bytes account for)."""

    def __init__(self, limit: int = 0, on_given_back: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self._on_given_back = on_given_back

    def check(self, adding: int, field: str) -> None:
        """StoredScoresFull naming ``field`` unless ``adding`` more scores fit."""
        if self.limit and adding and self.held + adding > self.limit:
            raise StoredScoresFull(
                f"{field}: {adding} more score(s) for the selection windows, which hold "
                f"{self.held} on this server: more than limits.max_stored_scores "
                f"{self.limit} (scores are given back as streams end and idle selection "
                "keys expire)"
            )

    def add(self, count: int) -> None:
        self.held += count
        metrics.CURATE_STORED_SCORES.inc(count)

    def give_back(self, count: int) -> None:
        self.held -= count
        metrics.CURATE_STORED_SCORES.dec(count)
        if count and self._on_given_back is not None:
            self._on_given_back(count * SCORE_BYTES)


class TaskWindow:
    """The window of one task type and stage, with the decisions waiting for it."""

    def __init__(self, size: int, stored: StoredScores) -> None:
        self.scores = Window(size)
        self.seeded = False
        self.users = 0  # samples that took it (StageWindows.take) and are not finished
        self._stored = stored
        self._waiting: list[_Held] = []

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def full(self) -> bool:
        """Whether a score added now replaces one (adds nothing to the stored scores)."""
        return len(self.scores) >= self.scores.size

    def seed_growth(self, scores: Sequence[float]) -> int:
        """How many scores :meth:`seed` would add."""
        if not scores or self.seeded:
            return 0
        return min(self.scores.size, len(self.scores) + len(scores)) - len(self.scores)

    def seed(self, scores: Sequence[float]) -> None:
        """Prefill with calibration scores, once per window (later seeds are ignored: the
        window already holds a calibration)."""
        if scores and not self.seeded:
            self.seeded = True
            before = len(self.scores)
            self.scores.extend(scores)
            self._stored.add(len(self.scores) - before)
            self._settle_ready()

    def add(self, score: float) -> None:
        grows = not self.full
        self.scores.add(score)
        if grows:
            self._stored.add(1)
        self._settle_ready()

    def close(self) -> None:
        """The window is dropped: its scores are given back."""
        self._stored.give_back(len(self.scores))
        self.scores = Window(self.scores.size)

    def wait(self, held: _Held) -> None:
        self._waiting.append(held)

    def settle(self, held: _Held, warm_up: bool) -> None:
        """Make ``held``'s decision now, against the window as it is."""
        self.forget(held)
        held.holds.forget(held)
        if not held.future.done():
            held.future.set_result(self.scores.select(held.score, held.fraction, warm_up))

    def forget(self, held: _Held) -> None:
        if held in self._waiting:
            self._waiting.remove(held)

    def _settle_ready(self) -> None:
        for held in [h for h in self._waiting if len(self.scores) >= h.min_window]:
            self.settle(held, warm_up=False)


class StageWindows:
    """The windows of one stage, by task type, created on first use; at most ``max_tasks``
    of them (the task is any string the caller sends: each new one costs a window)."""

    def __init__(self, size: int, max_tasks: int, stored: StoredScores) -> None:
        self.size = size
        self.max_tasks = max_tasks
        self.stored = stored  # the server's count, which every window adds to
        self._by_task: dict[str, TaskWindow] = {}

    def __getitem__(self, task: str) -> TaskWindow:
        window = self._by_task.get(task)
        if window is None:
            self.check_room([task], "sample.task")
            window = self._by_task[task] = TaskWindow(self.size, self.stored)
        return window

    def take(self, task: str) -> None:
        """``task``'s window, for a sample that will need it (created, or InvalidArgument
        when no window fits any more); :meth:`give_back` when the sample is finished."""
        self[task].users += 1

    def give_back(self, task: str) -> None:
        """A sample that took ``task``'s window is finished: a window it left empty (the
        sample failed, or never reached this stage) is dropped, taking no task-type slot."""
        window = self._by_task.get(task)
        if window is None:
            return
        window.users -= 1
        if window.users <= 0 and not len(window) and not window.seeded:
            del self._by_task[task]

    def check_room(self, tasks: Iterable[str], field: str) -> None:
        """InvalidArgument naming ``field`` unless windows for ``tasks`` fit."""
        new = {t for t in tasks if t not in self._by_task}
        if len(self._by_task) + len(new) > self.max_tasks:
            raise InvalidArgument(
                f"{field}: {len(new)} new task type(s) where this selection already keeps "
                f"windows for {len(self._by_task)}: more than limits.max_task_types "
                f"{self.max_tasks}"
            )

    def growth(self, task: str) -> int:
        """Scores one more score of ``task`` adds to the stored: 0 when its window is full."""
        window = self._by_task.get(task)
        return 0 if window is not None and window.full else 1

    def seed_growth(self, scores: Mapping[str, Sequence[float]]) -> int:
        """How many scores :meth:`seed` would add."""
        growth = 0
        for task, values in scores.items():
            window = self._by_task.get(task)
            growth += min(self.size, len(values)) if window is None else window.seed_growth(values)
        return growth

    def seed(self, scores: Mapping[str, Sequence[float]]) -> None:
        """Seed the windows of ``scores``' tasks (check_room first: this never fails)."""
        for task, values in scores.items():
            self[task].seed(values)

    def close(self) -> None:
        """The selection is dropped: every window's scores are given back."""
        for window in self._by_task.values():
            window.close()
        self._by_task.clear()


@dataclass
class SelectorState:
    """What streams of one selection key share: the windows of both stages."""

    questions: StageWindows
    answers: StageWindows

    @classmethod
    def fresh(cls, window: int, max_tasks: int, stored: StoredScores) -> SelectorState:
        return cls(StageWindows(window, max_tasks, stored), StageWindows(window, max_tasks, stored))

    def check_seeds(
        self,
        questions: Mapping[str, Sequence[float]],
        answers: Mapping[str, Sequence[float]],
    ) -> None:
        """InvalidArgument when the seeds' task types do not fit the windows, and
        StoredScoresFull when the scores they would add do not fit the server's."""
        self.questions.check_room(questions, "options.question_seed_scores")
        self.answers.check_room(answers, "options.answer_seed_scores")
        growth = {
            "options.question_seed_scores": self.questions.seed_growth(questions),
            "options.answer_seed_scores": self.answers.seed_growth(answers),
        }
        most = max(growth, key=lambda name: growth[name])  # the field to shorten
        self.questions.stored.check(sum(growth.values()), most)

    def close(self) -> None:
        """Give back every score the windows hold (the selection is dropped)."""
        self.questions.close()
        self.answers.close()


class Holds:
    """One stream's held decisions (both stages). ``bound``: the stream's in-flight limit;
    ``inflight()``: how many of its samples are being worked on (held ones included). The
    stream calls :meth:`check` when one of them finishes and :meth:`end` when its input
    ends."""

    def __init__(
        self, bound: int, inflight: Callable[[], int], blocked: Callable[[], bool] = lambda: False
    ) -> None:
        self.bound = bound
        self.ended = False
        self._blocked = blocked  # True while no stream may read: samples wait for bytes
        self._inflight = inflight
        self._held: dict[_Held, TaskWindow] = {}  # in the order they were held

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, held: _Held, window: TaskWindow) -> None:
        window.wait(held)
        self._held[held] = window
        self.check()

    def forget(self, held: _Held) -> None:
        self._held.pop(held, None)

    def end(self) -> None:
        """No more samples will come (input ended, or the stream failed)."""
        self.ended = True
        self.check()

    def check(self) -> None:
        """Decide everything held when nothing of this stream could add a score any more."""
        if not self._held:
            return
        if len(self._held) >= self.bound:  # every slot holds a held sample: no more reads
            self._release("inflight_bound")
        elif len(self._held) < self._inflight():  # some sample may still add a score
            return
        elif self.ended:  # the rest is all held, and no sample will come
            self._release("stream_end")
        elif self._blocked():  # ... and none can be read until bytes are freed
            self._release("inflight_bytes")

    def expire(self) -> None:
        """The stream's deadline: decide everything held now, while its caller listens."""
        if self._held:
            self._release("deadline")

    def idle(self) -> None:
        """The producer has been quiet: if every sample in flight is held, nothing is
        coming that could fill the windows soon; decide them now."""
        if self._held and len(self._held) >= self._inflight():
            self._release("producer_idle")

    def _release(self, reason: str) -> None:
        metrics.CURATE_WARM_UP_RELEASES.labels(reason=reason).inc(len(self._held))
        for held, window in list(self._held.items()):
            window.settle(held, warm_up=True)


class StageSelector:
    """One stage of one stream: its fraction, given thresholds and warm-up over a stage's
    windows (the stream's own or shared)."""

    def __init__(
        self,
        fraction: float,
        windows: StageWindows,
        thresholds: Mapping[str, float],
        min_window: int,
        holds: Holds,
    ) -> None:
        self._fraction = fraction
        self._windows = windows
        self._thresholds = thresholds
        self._min_window = min_window
        self._holds = holds

    def check_task(self, task: str) -> None:
        """InvalidArgument naming ``sample.task`` when ``task`` would need a window and
        none fits any more."""
        if task not in self._thresholds:
            self._windows.check_room([task], "sample.task")

    def growth(self, task: str) -> int:
        """Scores a sample of ``task`` adds to the server's stored scores at this stage."""
        return 0 if task in self._thresholds else self._windows.growth(task)

    @property
    def stored(self) -> StoredScores:
        """The server's stored scores, which this stage's windows count into."""
        return self._windows.stored

    def take_window(self, task: str) -> None:
        """The window ``task`` will need, taken now (after :meth:`check_task`): the limit
        on task types then holds in the order samples arrive, before any is scored, not in
        the order their scores come back. :meth:`give_back_window` when the sample is done."""
        if task not in self._thresholds:
            self._windows.take(task)

    def give_back_window(self, task: str) -> None:
        if task not in self._thresholds:
            self._windows.give_back(task)

    async def select(self, task: str, score: float) -> Selection:
        """The decision on ``score`` of ``task`` (see the module docstring); waits while
        the window warms up."""
        score = as_float32(score)
        given = self._thresholds.get(task)
        if given is not None:
            return Selection(score >= given, given)
        window = self._windows[task]
        window.add(score)  # counts now, for this and every other stream's decisions
        if len(window) >= self._min_window:
            return window.scores.select(score, self._fraction)
        held = _Held(score, self._fraction, self._min_window, self._holds)
        self._holds.hold(held, window)
        try:
            return await held.future
        finally:  # settled, or the sample's work was cancelled
            window.forget(held)
            self._holds.forget(held)
