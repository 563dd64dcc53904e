"""The scores of an offline curation run, kept in a JSONL file so that a rerun resumes.

One line per scored sample and head::

    {"id": "000000215677", "digest": "3f2a...", "head": "question", "revision": "a1b2c3d4e5f6",
     "settings": "0c1d2e3f4a5b", "template_version": "align2llava-reward-v1",
     "image_size": 160533, "score": 1.25}
    {"id": "000000215677", "digest": "3f2a...", "head": "answer", "revision": "...",
     "settings": "...", "template_version": "...", "scores": [0.5, -0.25]}

An answer entry has one item per turn: the turn's score, or for a turn with candidate
answers the list of its candidates' scores (``[[0.5, 1.25, 0.5], -0.25]``).

A score is reused only when all of (id, digest, head, revision, settings,
template_version) match: ``digest`` is a hash of what the sample sends (image file name and
texts), so an edited record, or another record under the same id, is scored afresh;
``revision`` and ``settings`` are the server's ModelRef.revision and ModelRef.settings of
the head's model and ``template_version`` the ScoreResponse's, so a changed model, a
changed setting that changes scores (dtype, image_mode, truncation, ...), or a changed
input template is too. ``image_size`` is the image file's size when the score was stored
(:meth:`~align2.client.types.Sample.image_file_size`): a score is not reused for a file of
another size under the same name (another ``--image-folder``, an image written again). A
line written before ``settings`` existed has none, and its score is computed again; one
written before ``image_size`` existed is reused whatever the size. Lines are appended and
flushed per chunk of samples; a crash loses at most the chunks in flight. A truncated last
line (a crash mid-write) is dropped when the file is opened again; any other unreadable
line is ignored (its sample is scored again) and counted.

Pure Python (no grpc).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from align2.client.jsonl_log import JsonlLog, text
from align2.client.types import Sample

HEAD_QUESTION = "question"
HEAD_ANSWER = "answer"
_HEADS = (HEAD_QUESTION, HEAD_ANSWER)


TurnScores = tuple[float | tuple[float, ...], ...]
"""The answer head's scores of one sample: per turn its score, or its candidates' scores."""
Stored = float | TurnScores


def sample_digest(sample: Sample) -> str:
    """A hash of what a Score request carries for ``sample``: its image file name (its
    bytes are not read; its size is kept beside the digest, ``ScoreKey.image_size``) and
    its turns (with their candidate answers, when they have some: a sample without them
    hashes as it always did). Task and extra keys do not change a
    score."""
    if sample.image_file is not None:
        image = sample.image_file
    elif isinstance(sample.image, bytes | bytearray | memoryview):
        image = "sha256:" + hashlib.sha256(bytes(sample.image)).hexdigest()
    else:
        image = os.fspath(sample.image)
    turns = [
        [t.question, t.answer, list(t.candidates)] if t.candidates else [t.question, t.answer]
        for t in sample.turns
    ]
    content = {"image": image, "turns": turns}
    text = json.dumps(content, ensure_ascii=False, sort_keys=True)
    # surrogatepass: a text with a lone surrogate still has a digest (it fails as its own
    # item when encoded for the server, not the whole file's loading)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class ScoreKey:
    """What a stored score is valid for."""

    id: str
    digest: str
    head: str
    revision: str
    template_version: str
    settings: str = ""
    # The image file's size (None: unknown): compared by ScoreStore.get, not part of the
    # lookup, so that a line of an older file (without it) is still found.
    image_size: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Scorer:
    """The identity of a head's model as the server reports it."""

    head: str
    revision: str
    template_version: str
    settings: str = ""

    def key(self, sample_id: str, digest: str, image_size: int | None = None) -> ScoreKey:
        return ScoreKey(
            sample_id,
            digest,
            self.head,
            self.revision,
            self.template_version,
            self.settings,
            image_size,
        )


class ScoreStore:
    """Scores read from, and appended to, one JSONL file (created when missing).

    ``get`` answers from what the file held when opened plus what was added since;
    ``add`` appends one chunk's scores and flushes them to disk. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._log = JsonlLog(path)
        self.path = self._log.path
        self.loaded = 0  # entries read when opened
        self.ignored_lines = 0  # unreadable lines other than a truncated last one
        self._scores: dict[ScoreKey, tuple[int | None, Stored]] = {}
        for entry in self._log.read():
            parsed = _parse(entry)
            if parsed is None:
                self.ignored_lines += 1
                continue
            self._scores[parsed[0]] = (parsed[0].image_size, parsed[1])
            self.loaded += 1

    def get(self, key: ScoreKey) -> Stored | None:
        """A question score, or an answer entry's per-turn scores (see the module doc);
        None for a score stored for an image file of another size."""
        found = self._scores.get(key)
        if found is None:
            return None
        size, stored = found
        if size is not None and key.image_size is not None and size != key.image_size:
            return None
        return stored

    def add(
        self, entries: Sequence[tuple[ScoreKey, float | Sequence[float | Sequence[float]]]]
    ) -> None:
        """Append and flush (to the disk, not only the OS) one chunk's scores."""
        lines = []
        for key, value in entries:
            stored: Stored = (
                float(value) if isinstance(value, int | float) else tuple(map(_turn, value))
            )
            self._scores[key] = (key.image_size, stored)
            lines.append(_entry(key, stored))
        self._log.append(lines)

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> ScoreStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _turn(value: float | Sequence[float]) -> float | tuple[float, ...]:
    return float(value) if isinstance(value, int | float) else tuple(map(float, value))


def _entry(key: ScoreKey, value: Stored) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": key.id,
        "digest": key.digest,
        "head": key.head,
        "revision": key.revision,
        "settings": key.settings,
        "template_version": key.template_version,
    }
    if key.image_size is not None:
        entry["image_size"] = key.image_size
    if isinstance(value, tuple):
        entry["scores"] = [list(s) if isinstance(s, tuple) else s for s in value]
    else:
        entry["score"] = value
    return entry


def _parse(entry: Any) -> tuple[ScoreKey, Stored] | None:
    try:
        key = ScoreKey(
            id=text(entry["id"]),
            digest=text(entry["digest"]),
            head=text(entry["head"]),
            revision=text(entry["revision"]),
            template_version=text(entry["template_version"]),
            settings=text(entry.get("settings", "")),  # older files: none
            image_size=_size(entry.get("image_size")),  # older files: none
        )
        if key.head == HEAD_QUESTION:
            return key, _number(entry["score"])
        if key.head == HEAD_ANSWER:
            scores = entry["scores"]
            if not isinstance(scores, list) or not scores:
                return None
            return key, tuple(_turn_scores(s) for s in scores)
    except (ValueError, KeyError, TypeError):
        pass
    return None


def _turn_scores(value: Any) -> float | tuple[float, ...]:
    """One turn's item: a number, or a non-empty list of candidates' numbers."""
    if isinstance(value, list):
        if not value:
            raise ValueError("a turn without candidate scores")
        return tuple(_number(s) for s in value)
    return _number(value)


def _size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(value)
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(value)
    return float(value)
