"""Align: the inner LLM rewrites each turn in its own style, then reviews it against the
original and keeps one (the method's Stage 2).

Order of work for one call, cheapest refusal first:
1. call-level checks (sample count, template set, decoding) -> the whole call fails;
2. per-sample structure checks, shared with Score -> that sample fails;
3. admission: every LLM request the call may need (per turn: one rewrite per part, two
   review choices) at once -> RESOURCE_EXHAUSTED before any work; slots a turn turns out
   not to need (a guard fired, no review) are given back as soon as that is known;
4. per turn, all turns of all samples concurrently (so that they batch together):
   rewrite the question and/or the answer -> guards (see guards.py) -> review.

The review is a constrained choice, never parsed text: the pair is shown in both orders
(original first, then rewrite first) so that position bias cancels; the margin is the
mean over the two orders of P(rewrite) - P(original), in [-1, 1]; the rewrite is kept iff
the margin is positive. The image's pixels are never read: the LLM is text-only and sees
the texts with the ``<image>`` marker removed; a kept rewrite gets the original's marker
back. A sample's image may be empty; one that is sent must pass Score's checks that need
no decoding (format, bytes, pixels from the header), so that a non-image fails its sample.

Same seed and inputs -> same output on the same backend: every request of a call uses the
call's decoding and seed, and the review is deterministic. Caveat: batch-mates change the
shapes of the device's float arithmetic, so logits can differ in their last bits between
batch compositions; the margin then differs by ~1e-7, and an exact tie (of two tokens, or a
margin of 0) could flip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor

from align2.client.types import Sample, Turn
from align2.server.backends.base import (
    ChoiceRequest,
    Decoding,
    Generation,
    GenerationRequest,
    Message,
)
from align2.server.config import AlignConfig, DecodingConfig, LimitsConfig, decoding_problem
from align2.server.core.align_job import Job, ResolvedCall, TurnSlots
from align2.server.core.align_types import (
    REVIEW,
    UNCHANGED,
    UNREVIEWED,
    AlignCall,
    AlignedTurn,
    AlignOutcome,
    DecodingOptions,
    Kept,
    Parts,
    SampleAlignment,
)
from align2.server.core.gather import all_or_first_error
from align2.server.core.guards import check_rewrite, restore_marker
from align2.server.core.images import open_image
from align2.server.core.llm import GenerationRuntime
from align2.server.core.prompts import TemplateLibrary
from align2.server.core.templates import clean
from align2.server.core.validation import (
    check_sample_count,
    check_turns,
    sample_error,
)
from align2.server.errors import InvalidArgument

CANDIDATES_REFUSED = (
    "Align rewrites one answer per turn: keep the best candidate first (Score's "
    "answer_candidates[i].best; Curate keeps it and aligns that)"
)
"""Why Align refuses a turn with candidate answers: choosing one needs the answer head,
which Align does not run (a server may serve Align without reward models)."""


class Aligner:
    """Runs Align calls against the inner LLM ``config.model`` of ``runtimes`` (config name
    -> loaded model) with the prompt template sets of ``templates``."""

    def __init__(
        self,
        runtimes: Mapping[str, GenerationRuntime],
        templates: TemplateLibrary,
        config: AlignConfig,
        limits: LimitsConfig,
        pool: Executor,
    ) -> None:
        self._runtimes = runtimes  # by config name, filled when the models are loaded
        self._templates = templates
        self._config = config
        self._limits = limits
        self._pool = pool

    @property
    def _runtime(self) -> GenerationRuntime:
        return self._runtimes[self._config.model]

    async def align(self, call: AlignCall) -> AlignOutcome:
        started = time.monotonic()
        resolved = self._resolve(call)
        problems = [self._check_sample(s, call.parts) for s in call.samples]
        per_turn = resolved.requests_per_turn
        pairs = zip(call.samples, problems, strict=True)
        needed = sum(len(s.turns) * per_turn for s, problem in pairs if not problem)
        if needed > self._config.max_inflight_items:
            raise InvalidArgument(
                f"samples: the call needs {needed} LLM requests, more than "
                f"limits.max_llm_inflight {self._config.max_inflight_items}; split it"
            )
        job = Job(resolved, self._runtime.reserve(needed, call.deadline) if needed else None)
        try:
            results = await asyncio.gather(
                *(
                    self._align_sample(call.sample_field.format(index=i), s, problem, job)
                    for i, (s, problem) in enumerate(zip(call.samples, problems, strict=True))
                )
            )
        finally:
            job.release()
        compute = job.busy_seconds()
        return AlignOutcome(
            results=list(results),
            model=self._runtime.description,
            template_name=resolved.template.name,
            template_sha256=resolved.template.sha256,
            prompt_tokens=job.prompt_tokens,
            generated_tokens=job.generated_tokens,
            queue_seconds=max(0.0, time.monotonic() - started - compute),
            compute_seconds=compute,
        )

    # -- checks --------------------------------------------------------------------------
    def check(self, call: AlignCall) -> None:
        """The call-level checks of ``call`` (template set, decoding), without running it:
        a Curate stream checks its Align settings once, before its first sample."""
        self._resolve(call)

    def _resolve(self, call: AlignCall) -> ResolvedCall:
        """Call-level checks; the call's settings with the configured defaults filled in."""
        check_sample_count(len(call.samples), self._limits.max_samples_per_call)
        template = self._templates.get(
            call.template or self._config.template, field=f"{call.options_field}.template"
        )
        return ResolvedCall(
            parts=call.parts,
            template=template,
            decoding=self._decoding(call.decoding, f"{call.options_field}.decoding"),
            review=self._config.review if call.review is None else call.review,
            priority=call.priority,
            deadline=call.deadline,
        )

    def _decoding(self, options: DecodingOptions, field: str) -> Decoding:
        default = self._config.decoding
        values = {
            key: getattr(default, key) if getattr(options, key) is None else getattr(options, key)
            for key in ("max_new_tokens", "temperature", "top_p", "seed")
        }
        problem = decoding_problem(
            DecodingConfig(**values),
            self._config.max_new_tokens_limit,
            limit_name="limits.max_new_tokens",  # as GetServerInfo reports it to callers
        )
        if problem:
            raise InvalidArgument(f"{field}.{problem}")
        return Decoding(**values)

    def _check_sample(self, sample: Sample, parts: Parts) -> InvalidArgument | None:
        """Structure, and the image when there is one: the LLM never sees it, but an image
        that is not one (or too large) is refused as Score refuses it, from its header."""
        needed = (
            "answers are rewritten (ask for parts=questions to rewrite questions alone)"
            if parts.answers
            else None
        )
        problem = check_turns(
            sample,
            self._limits.max_turns,
            answers_needed=needed,
            max_candidates=self._limits.max_candidates,
            max_text_bytes=self._limits.max_text_bytes,
            candidates_refused=CANDIDATES_REFUSED,
        )
        image = sample.image_bytes()
        if problem is None and image:
            try:
                open_image(
                    image,
                    max_bytes=self._limits.max_image_bytes,
                    max_pixels=self._limits.max_image_pixels,
                )
            except InvalidArgument as exc:
                return exc
        return problem

    # -- one sample ----------------------------------------------------------------------
    async def _align_sample(
        self, where: str, sample: Sample, problem: InvalidArgument | None, job: Job
    ) -> SampleAlignment:
        result = SampleAlignment(id=sample.id)
        if problem is not None:
            result.error = sample_error(where, problem)
            return result
        try:
            result.turns = await all_or_first_error(
                self._align_turn(i, turn, job) for i, turn in enumerate(sample.turns)
            )
        except Exception as exc:
            result.error = sample_error(where, exc)
        return result

    async def _align_turn(self, index: int, turn: Turn, job: Job) -> AlignedTurn:
        slots = job.turn_slots()
        try:
            rewrite, reason = await self._rewrite(index, turn, job, slots)
            if reason is not None:
                return AlignedTurn(turn, rewrite, Kept.ORIGINAL, reason)
            if _same(turn, rewrite):
                return AlignedTurn(turn, rewrite, Kept.ORIGINAL, UNCHANGED)
            if not job.resolved.review:
                return AlignedTurn(turn, rewrite, Kept.REWRITE, UNREVIEWED)
            margin = await self._review(index, turn, rewrite, job, slots)
            kept = Kept.REWRITE if margin > 0 else Kept.ORIGINAL
            return AlignedTurn(turn, rewrite, kept, REVIEW, margin)
        finally:
            slots.release_unused()

    async def _rewrite(
        self, index: int, turn: Turn, job: Job, slots: TurnSlots
    ) -> tuple[Turn, str | None]:
        """The rewritten turn (marker restored) and the first guard that fired, if any."""
        parts = job.resolved.parts
        asks = job.resolved.template.rewrite_requests(
            turn, questions=parts.questions, answers=parts.answers
        )
        made = await all_or_first_error(
            self._generate(f"turns[{index}].{name}", messages, job, slots)
            for name, messages in asks
        )
        texts = {"question": turn.question, "answer": turn.answer}
        reason = None
        for (name, _), generation in zip(asks, made, strict=True):
            original = texts[name]
            texts[name] = restore_marker(original, generation.text)
            guard = check_rewrite(
                original,
                generation.text,
                finished=generation.finished,
                control_tokens=self._runtime.backend.control_tokens,
            )
            reason = reason or guard
        return Turn(texts["question"], texts["answer"]), reason

    async def _review(
        self, index: int, original: Turn, rewrite: Turn, job: Job, slots: TurnSlots
    ) -> float:
        """The margin: mean over both presentation orders of P(rewrite) - P(original)."""
        template = job.resolved.template
        first, second = _shown(original), _shown(rewrite)
        forward, backward = await all_or_first_error(
            self._choose(f"turns[{index}] (review)", messages, job, slots)
            for messages in (
                template.review_messages(first, second),
                template.review_messages(second, first),
            )
        )
        return ((forward[1] - forward[0]) + (backward[0] - backward[1])) / 2

    # -- LLM requests --------------------------------------------------------------------
    async def _generate(
        self, where: str, messages: list[Message], job: Job, slots: TurnSlots
    ) -> Generation:
        resolved = job.resolved
        new_tokens = resolved.decoding.max_new_tokens
        tokens = await self._prompt_tokens(where, messages, new_tokens, "max_new_tokens")
        request = GenerationRequest(messages, resolved.decoding, priority=resolved.engine_priority)
        outcome = await self._runtime.generate(
            request,
            tokens + new_tokens,
            slots.use(),
            deadline=resolved.deadline,
            priority=resolved.priority,
        )
        job.record(outcome, outcome.value.prompt_tokens, outcome.value.generated_tokens)
        return outcome.value

    async def _choose(
        self, where: str, messages: list[Message], job: Job, slots: TurnSlots
    ) -> list[float]:
        resolved = job.resolved
        tokens = await self._prompt_tokens(where, messages, 1, "the choice token")
        request = ChoiceRequest(
            messages, resolved.template.choices, priority=resolved.engine_priority
        )
        outcome = await self._runtime.choose(
            request, tokens, slots.use(), deadline=resolved.deadline, priority=resolved.priority
        )
        job.record(outcome, tokens, 0)
        return outcome.value

    async def _prompt_tokens(
        self, where: str, messages: list[Message], new_tokens: int, what: str
    ) -> int:
        """Tokens of the rendered prompt (in a worker thread); InvalidArgument naming
        ``where`` when the prompt plus ``new_tokens`` does not fit the model."""
        loop = asyncio.get_running_loop()
        backend = self._runtime.backend
        try:
            tokens = await loop.run_in_executor(self._pool, backend.prompt_tokens, messages)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}") from None
        limit = backend.description.max_length
        if tokens + new_tokens > limit:
            raise InvalidArgument(
                f"{where}: the prompt is {tokens} tokens; with {what} ({new_tokens}) it "
                f"exceeds model {backend.description.name!r} max_length {limit}"
            )
        return tokens


def _shown(turn: Turn) -> Turn:
    """A turn as the LLM sees it: no image marker."""
    return Turn(clean(turn.question), clean(turn.answer))


def _same(original: Turn, rewrite: Turn) -> bool:
    return _shown(original) == _shown(rewrite)
