"""Domain types shared by the client and the server: a LLaVA sample and its turns.

Pure Python (no grpc, no torch), so that the server core can use them too.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pathlib
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ImageMarker(enum.StrEnum):
    """Where ``<image>`` stood in the first question of the LLaVA record."""

    START = "start"  # "<image>\n" + question
    END = "end"  # question + "\n<image>"
    NONE = "none"  # no marker


@dataclass(frozen=True)
class Turn:
    """One question/answer turn. An empty ``answer`` is scored as the method's reference
    scores it: the answer head reads the question alone, ``<image>\n{question}``.

    ``candidates``: several candidate answers to ``question`` (best-of-n), of which the
    answer head picks the best; ``answer`` is then empty. Empty: the turn's one answer is
    ``answer``. A list is stored as a tuple.
    """

    question: str
    answer: str = ""
    candidates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.candidates, str):
            raise TypeError("Turn.candidates: a sequence of answers, not one string")
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))

    @property
    def answers(self) -> tuple[str, ...]:
        """What the answer head scores, each alone: the candidates, or the one answer."""
        return self.candidates or (self.answer,)

    def choose(self, index: int) -> Turn:
        """This turn with its candidate ``index`` as its one answer; a turn without
        candidates is returned as it is (its answer is candidate 0)."""
        if not self.candidates:
            if index != 0:
                raise IndexError(f"candidate {index} of a turn with one answer")
            return self
        return Turn(self.question, self.candidates[index])


@dataclass
class Sample:
    """One LLaVA record: an image and a conversation about it.

    ``image`` is the encoded image (JPEG, PNG or WebP) or a path to read it from when the
    sample is sent. ``task`` is the selection stratum. ``image_file`` and ``extra`` keep the
    record's image name and other keys so that writing it back restores the record.
    """

    id: str
    image: bytes | os.PathLike[str]
    turns: list[Turn]
    task: str = ""
    image_marker: ImageMarker = ImageMarker.START
    image_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def image_bytes(self) -> bytes:
        if isinstance(self.image, bytes | bytearray | memoryview):
            return bytes(self.image)
        return pathlib.Path(self.image).read_bytes()

    def image_file_size(self) -> int | None:
        """The size of the image file ``image`` names (one stat: its bytes are not read);
        None for an image in memory, or a path that is not a regular file. Stored scores
        and journaled decisions are kept for a file of the same name and size: another
        image under the same name (another folder, a file written again) as good as
        always has another size, and a copy of the same one, moved or timed anew, has
        the same."""
        if isinstance(self.image, bytes | bytearray | memoryview):
            return None
        try:
            found = os.stat(self.image)
        except (OSError, ValueError):  # missing, or a name the OS refuses
            return None
        return found.st_size if stat.S_ISREG(found.st_mode) else None

    @property
    def has_candidates(self) -> bool:
        """Whether some turn carries candidate answers (Turn.candidates)."""
        return any(turn.candidates for turn in self.turns)


def choose_candidates(sample: Sample, best: Sequence[int]) -> Sample:
    """``sample`` with each turn's candidate ``best[i]`` as its one answer (the sample as
    curation keeps it); a sample without candidates is returned as it is, whatever ``best``."""
    if not sample.has_candidates:
        return sample
    if len(best) != len(sample.turns):
        raise ValueError(
            f"sample {sample.id!r}: {len(best)} best candidates for {len(sample.turns)} turns"
        )
    turns = [turn.choose(index) for turn, index in zip(sample.turns, best, strict=True)]
    return dataclasses.replace(sample, turns=turns)
