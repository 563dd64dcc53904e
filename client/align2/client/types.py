"""Domain types shared by the client and the server: a LLaVA sample and its turns.

Pure Python (no grpc, no torch), so that the server core can use them too.
"""

from __future__ import annotations

import enum
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any


class ImageMarker(enum.StrEnum):
    """Where ``<image>`` stood in the first question of the LLaVA record."""

    START = "start"  # "<image>\n" + question
    END = "end"  # question + "\n<image>"
    NONE = "none"  # no marker


@dataclass(frozen=True)
class Turn:
    """One question/answer turn. ``answer`` may be empty for question-head-only scoring."""

    question: str
    answer: str = ""


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
