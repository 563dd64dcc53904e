"""Structural checks of one sample, shared by every RPC that takes samples (Score, Align).

Cheap and local: they run before admission, and a sample that fails them fails alone with
INVALID_ARGUMENT naming the field (relative to the sample; callers prefix where the sample
stands, ``samples[i].`` by default).
"""

from __future__ import annotations

import logging

from align2.client.types import Sample, Turn
from align2.server import metrics
from align2.server.core.templates import IMAGE_TOKEN, clean
from align2.server.errors import Align2Error, BackendError, InvalidArgument, detached

log = logging.getLogger(__name__)


def check_sample_count(count: int, limit: int) -> None:
    """Raise InvalidArgument when a call carries more than ``limit`` samples."""
    if count > limit:
        raise InvalidArgument(
            f"samples: {count} samples exceeds limits.max_samples_per_call {limit}; split the call"
        )


def check_turns(
    sample: Sample,
    max_turns: int,
    *,
    answers_needed: str | None,
    max_candidates: int,
    max_text_bytes: int,
    candidates_refused: str | None = None,
) -> InvalidArgument | None:
    """The first structural problem of ``sample``, or None.

    A sample needs 1..``max_turns`` turns and a non-empty question in each (the ``<image>``
    marker alone is empty). ``answers_needed``: None when answers may be empty, else why
    they may not (it ends the error message; Align: "answers are rewritten ..."). A turn
    with candidate answers has an empty ``answer`` and 1..``max_candidates`` candidates,
    each held to ``answers_needed`` as an answer is; ``candidates_refused``: None when
    candidates are accepted, else why not (it ends the error message).

    Every question, answer and candidate, and the questions together (the question head's
    one text), hold at most ``max_text_bytes`` UTF-8 bytes: checked here, before anything
    is tokenised, so that a huge text costs its bytes and not a tokeniser's working memory.
    A text that still holds ``<image>`` once its markers are removed (one nested in
    another, ``<ima<image>ge>``) is refused: the model would see a second image marker.
    """
    if not sample.turns:
        return InvalidArgument("turns: empty conversation; a sample needs at least one turn")
    if len(sample.turns) > max_turns:
        return InvalidArgument(
            f"turns: {len(sample.turns)} turns exceeds limits.max_turns {max_turns}"
        )
    texts = [(f"turns[{i}].question", t.question) for i, t in enumerate(sample.turns)]
    texts += [(f"turns[{i}].answer", t.answer) for i, t in enumerate(sample.turns)]
    texts += [
        (f"turns[{i}].answer_candidates[{j}]", c)
        for i, t in enumerate(sample.turns)
        for j, c in enumerate(t.candidates)
    ]
    for where, text in texts:
        problem = _check_text(where, text, max_text_bytes)
        if problem is not None:
            return problem
    questions = sum(_utf8_bytes(t.question) for t in sample.turns) + len(sample.turns) - 1
    if questions > max_text_bytes:
        return InvalidArgument(
            f"turns: the questions together are {questions} bytes (the question head reads "
            f"them as one text), exceeds limits.max_text_bytes {max_text_bytes}"
        )
    for i, turn in enumerate(sample.turns):
        if not clean(turn.question):
            return InvalidArgument(f"turns[{i}].question: empty")
        if turn.candidates:
            problem = _check_candidates(i, turn, answers_needed, max_candidates, candidates_refused)
            if problem is not None:
                return problem
        elif answers_needed is not None and not clean(turn.answer):
            return InvalidArgument(f"turns[{i}].answer: empty, and {answers_needed}")
    return None


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_text(where: str, text: str, max_bytes: int) -> InvalidArgument | None:
    if len(text) > max_bytes:  # a character is at least one byte: no need to encode it
        return InvalidArgument(
            f"{where}: at least {len(text)} bytes (UTF-8; {len(text)} characters) exceeds "
            f"limits.max_text_bytes {max_bytes}"
        )
    size = _utf8_bytes(text)
    if size > max_bytes:
        return InvalidArgument(
            f"{where}: {size} bytes (UTF-8) exceeds limits.max_text_bytes {max_bytes}"
        )
    if IMAGE_TOKEN in text and IMAGE_TOKEN in clean(text):
        return InvalidArgument(
            f"{where}: still holds {IMAGE_TOKEN} once its {IMAGE_TOKEN} markers are removed "
            f"(a marker nested in another); the image is the sample's own, remove the markers"
        )
    return None


def _check_candidates(
    i: int, turn: Turn, answers_needed: str | None, limit: int, refused: str | None
) -> InvalidArgument | None:
    where = f"turns[{i}].answer_candidates"
    count = len(turn.candidates)
    if refused is not None:
        return InvalidArgument(f"{where}: {count} candidate answers, and {refused}")
    if turn.answer:
        return InvalidArgument(
            f"turns[{i}].answer: set together with answer_candidates; send one or the other"
        )
    if count > limit:
        return InvalidArgument(f"{where}: {count} candidates exceeds limits.max_candidates {limit}")
    if answers_needed is not None:
        for j, candidate in enumerate(turn.candidates):
            if not clean(candidate):
                return InvalidArgument(f"{where}[{j}]: empty, and {answers_needed}")
    return None


SAMPLE_FIELD = "samples[{index}]"
"""How a call's error messages name its sample ``index`` by default (``samples[3]``)."""


def prefixed(where: str, exc: Align2Error) -> Align2Error:
    """The same error with its field made absolute: ``where`` + ``.image: ...``."""
    if isinstance(exc, InvalidArgument):
        return InvalidArgument(f"{where}.{exc.message}")
    return exc


def sample_error(where: str, exc: Exception) -> Align2Error:
    """What a sample that failed with ``exc`` reports: core errors with their field made
    absolute (invalid ones counted), anything else as an internal error (logged: a bug
    on one sample must not fail its batch-mates). Kept on the sample's result, it holds
    no traceback (errors.detached)."""
    if isinstance(exc, Align2Error):
        if isinstance(exc, InvalidArgument):
            metrics.REJECTED.labels(reason="invalid").inc()
        return detached(prefixed(where, exc))
    log.error("unexpected error on %s", where, exc_info=exc)
    return BackendError(f"{where}: internal error: {exc}")
