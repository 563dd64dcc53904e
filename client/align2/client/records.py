"""LLaVA files read as the inputs of an offline curation: every record checked, each with
its task type (the stratum it is ranked in), before anything is scored.

Pure Python (no grpc).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align2.client.llava import (
    MalformedRecord,
    iter_records,
    sample_from_record,
    task_from_filename,
)
from align2.client.scorestore import sample_digest
from align2.client.types import Sample

ALL_TASKS = "all"  # the one stratum when every record is ranked together


@dataclass(frozen=True)
class Record:
    """One input record as read: where it came from, and its sample."""

    file: str
    index: int
    sample: Sample
    digest: str  # what the scores of this record are stored under, with its id
    image_size: int | None = None  # its image file's size (Sample.image_file_size)


@dataclass(frozen=True)
class Invalid:
    """A record that was left out: where, its id when known, the stage that found the
    problem ("read", "question", "answer") and what is wrong."""

    file: str
    index: int
    id: str | None
    stage: str
    problem: str

    def __str__(self) -> str:
        name = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.file}: record {self.index}{name}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "id": self.id,
            "stage": self.stage,
            "problem": self.problem,
        }


class InvalidRecords(ValueError):
    """Records that cannot be curated, found when ``skip_invalid`` is off."""

    def __init__(self, invalid: Sequence[Invalid]) -> None:
        self.invalid = list(invalid)
        shown = "; ".join(str(i) for i in self.invalid[:5])
        more = f" (and {len(self.invalid) - 5} more)" if len(self.invalid) > 5 else ""
        super().__init__(f"{len(self.invalid)} invalid records: {shown}{more}")


class UnknownTask(ValueError):
    """Records without a task type, while each type is to be ranked on its own."""


@dataclass
class Inputs:
    """Every record to curate, by task type in input order, and those left out."""

    tasks: dict[str, list[Record]]
    invalid: list[Invalid] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # path -> records in it


def load_inputs(
    paths: Sequence[str | os.PathLike[str]],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    task: str | None = None,
    one_task: bool = False,
    skip_invalid: bool = False,
) -> Inputs:
    """Read and check every record of ``paths`` (none is scored yet).

    A record's task type is its own ``task``/``type`` key, else ``task``, else the file name
    prefix (as :func:`~align2.client.llava.read_llava`). Raises :class:`UnknownTask` when a
    record has none, unless ``one_task`` (then all records are ranked as one task type);
    :class:`InvalidRecords` for malformed records and missing image files, unless
    ``skip_invalid`` (then they are listed in ``Inputs.invalid``). ValueError for a file
    that is not JSON, OSError for one that can't be read.
    """
    folder = pathlib.Path(image_folder) if image_folder is not None else None
    inputs = Inputs(tasks={})
    untyped: dict[str, list[Record]] = {}
    for path in paths:
        name = os.fspath(path)
        default_task = task if task is not None else task_from_filename(path)
        count = 0
        for index, raw in enumerate(iter_records(path)):
            count += 1
            record = _read_record(name, index, raw, folder, default_task, inputs.invalid)
            if record is None:
                continue
            stratum = ALL_TASKS if one_task else record.sample.task
            if not stratum:
                untyped.setdefault(name, []).append(record)
            inputs.tasks.setdefault(stratum, []).append(record)
        inputs.files[name] = count
    if inputs.invalid and not skip_invalid:
        raise InvalidRecords(inputs.invalid)
    if untyped:
        raise UnknownTask(_unknown_task_message(untyped, inputs.files))
    return inputs


def _read_record(
    file: str,
    index: int,
    raw: Any,
    folder: pathlib.Path | None,
    default_task: str,
    invalid: list[Invalid],
) -> Record | None:
    try:
        sample = sample_from_record(raw, index, image_folder=folder, default_task=default_task)
    except MalformedRecord as error:  # Invalid says where itself
        invalid.append(Invalid(file, index, error.record_id, "read", error.problem))
        return None
    size = sample.image_file_size()
    if isinstance(sample.image, os.PathLike) and size is None:
        problem = f"image: no such file: {os.fspath(sample.image)}"
        invalid.append(Invalid(file, index, sample.id, "read", problem))
        return None
    return Record(file, index, sample, sample_digest(sample), size)


def _unknown_task_message(untyped: dict[str, list[Record]], files: dict[str, int]) -> str:
    parts = []
    for file, records in untyped.items():
        first = records[0]
        parts.append(
            f"{file}: {len(records)} of {files[file]} records have no task type (first: "
            f"record {first.index}, id {first.sample.id!r})"
        )
    return (
        "; ".join(parts) + ". The method ranks each task type on its own: give each record a "
        "'task' key, or pass --task NAME, or name each file after its type (complex_reasoning*, "
        "conversation*, detail*, one type per file); or pass --one-task to rank all records "
        "together"
    )
