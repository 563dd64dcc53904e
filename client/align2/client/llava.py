"""LLaVA instruction files <-> :class:`Sample`.

A LLaVA record is ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}``
with turns alternating human/gpt and an ``<image>`` marker at the start (``"<image>\\n"``) or
the end (``"\\n<image>"``) of the first question. Reading removes that marker and records
where it stood; writing puts it back, so a read -> write round trip gives back equal records.
Everything else in a record is kept in ``Sample.extra`` and written back verbatim. A ``gpt``
value that is a list of strings (the reference's inference data for best-of-n) is the
turn's candidate answers (``Turn.candidates``) and is written back as that list; a sample
whose best candidates were chosen (``choose_candidates``) writes each best as the value.

Pure Python (no grpc): data-preparation code can use it without a gRPC stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, cast

from align2.client.types import ImageMarker, Sample, Turn

StrPath = str | os.PathLike[str]

IMAGE_TOKEN = "<image>"
_MARKER_START = IMAGE_TOKEN + "\n"
_MARKER_END = "\n" + IMAGE_TOKEN
# Keys the sample's own fields hold; every other key of a record goes to Sample.extra.
_CORE_KEYS = frozenset({"id", "image", "conversations"})
_TASK_KEYS = ("task", "type")
# LLaVA-Instruct-158K ships one file per task type: complex_reasoning_77k.json, ...
_TASK_FILE_PREFIXES = ("complex_reasoning", "conversation", "detail")
_ROLES = ("human", "gpt")


def read_llava(
    path: StrPath, image_folder: StrPath | None = None, task: str | None = None
) -> list[Sample]:
    """All samples of a LLaVA JSON list or JSONL file (detected from the content).

    ``image`` of each sample is a lazy path, ``image_folder / record["image"]`` (the record's
    name as given when ``image_folder`` is None), read when the sample is sent; records
    without an image get empty bytes. ``task`` is the record's own ``task``/``type`` key if
    present, else the ``task`` argument, else inferred from the file name
    (``complex_reasoning*``, ``conversation*``, ``detail*``), else "".

    A ``gpt`` value that is a list of strings is the turn's candidate answers
    (``Turn.candidates``; ``answer`` is then empty). Raises ValueError naming the file, the
    record (index and id) and the key for a malformed record: turns that do not alternate
    human/gpt, a missing id, an empty list of candidates or one that is not all strings, ...
    """
    return list(iter_llava(path, image_folder=image_folder, task=task))


def iter_llava(
    path: StrPath,
    image_folder: StrPath | None = None,
    task: str | None = None,
    invalid: Callable[[int, MalformedRecord], object] | None = None,
) -> Iterator[Sample]:
    """Like :func:`read_llava`, one sample at a time (JSONL is streamed, not loaded whole).

    ``invalid``: called with the index and the error of each malformed record, which is
    then skipped (the default raises, as :func:`read_llava`); a file that is not JSON still
    raises."""
    path = pathlib.Path(path)
    folder = pathlib.Path(image_folder) if image_folder is not None else None
    default_task = task if task is not None else task_from_filename(path)
    for index, record in enumerate(_iter_records(path)):
        try:
            sample = sample_from_record(
                record, index, image_folder=folder, default_task=default_task
            )
        except MalformedRecord as error:
            if invalid is None:
                raise ValueError(f"{path}: {error}") from None
            invalid(index, error)
            continue
        yield sample


def written_in_place(path: StrPath) -> bool:
    """Whether ``path`` exists and is not a regular file (``/dev/null``, a FIFO): an output
    writes such a path as it is, not through a file renamed over it (nor beside it)."""
    return os.path.exists(path) and not os.path.isfile(path)


def write_llava(samples: Iterable[Sample], path: StrPath) -> int:
    """Write samples as LLaVA records: JSONL when ``path`` ends in ``.jsonl``, else a JSON list.

    Restores each record as read (marker, image name, extra keys). ``Sample.task`` is not
    written (LLaVA has no such field); a record's own ``task``/``type`` key lives in
    ``extra`` and is written from there. The file is replaced atomically: a failure leaves
    any previous file untouched; a path that is not a regular file (``/dev/null``, a FIFO)
    is written as it is, not replaced. Returns the number of records written.
    """
    path = pathlib.Path(path)
    if written_in_place(path):
        with path.open("w", encoding="utf-8") as out:
            return _write_records(out, (record_from_sample(s) for s in samples), path)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            count = _write_records(out, (record_from_sample(s) for s in samples), path)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return count


def iter_records(path: StrPath) -> Iterator[Any]:
    """The raw records of a LLaVA JSON list or JSONL file, in order, unchecked (for callers
    that handle a malformed record themselves: :func:`sample_from_record` checks one).
    ValueError when the file is not valid JSON."""
    return _iter_records(pathlib.Path(path))


def task_from_filename(path: StrPath) -> str:
    """The LLaVA-Instruct task type a file name starts with, or ""."""
    name = pathlib.Path(path).name
    return next((task for task in _TASK_FILE_PREFIXES if name.startswith(task)), "")


def split_image_marker(question: str) -> tuple[str, ImageMarker]:
    """Remove a leading ``"<image>\\n"`` or trailing ``"\\n<image>"``; elsewhere: verbatim."""
    if question.startswith(_MARKER_START):
        return question[len(_MARKER_START) :], ImageMarker.START
    if question.endswith(_MARKER_END):
        return question[: -len(_MARKER_END)], ImageMarker.END
    return question, ImageMarker.NONE


def join_image_marker(question: str, marker: ImageMarker) -> str:
    """The inverse of :func:`split_image_marker`."""
    if marker is ImageMarker.START:
        return _MARKER_START + question
    if marker is ImageMarker.END:
        return question + _MARKER_END
    return question


# ---------------------------------------------------------------------------------------
# Records -> samples


def sample_from_record(
    record: Any,
    index: int,
    *,
    image_folder: pathlib.Path | None = None,
    default_task: str = "",
) -> Sample:
    """One LLaVA record as a :class:`Sample`; :class:`MalformedRecord` (a ValueError) naming
    record and key if malformed."""
    if not isinstance(record, dict):
        raise _malformed(index, None, "record", f"expected an object, got {_kind(record)}")
    record_id = _record_id(record, index)
    where = (index, record_id)
    turns, marker = _turns(record.get("conversations"), where)
    image, image_file = _image(record, where, image_folder)
    return Sample(
        id=record_id,
        image=image,
        turns=turns,
        task=_record_task(record, where) or default_task,
        image_marker=marker,
        image_file=image_file,
        extra={k: v for k, v in record.items() if k not in _CORE_KEYS},
    )


def _record_id(record: dict[str, Any], index: int) -> str:
    if "id" not in record:
        raise _malformed(index, None, "id", "missing")
    value = record["id"]
    # Some LLaVA-style files use integer ids; they are read as strings (and written so).
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _malformed(index, None, "id", f"expected a string, got {_kind(value)}")
    return str(value)


def _turns(conversations: Any, where: tuple[int, str]) -> tuple[list[Turn], ImageMarker]:
    if not isinstance(conversations, list) or not conversations:
        raise _malformed(*where, "conversations", "expected a non-empty list of messages")
    if len(conversations) % 2:
        problem = f"{len(conversations)} messages; expected human/gpt pairs"
        raise _malformed(*where, "conversations", problem)
    values = [_message_value(m, i, where) for i, m in enumerate(conversations)]
    questions = [cast(str, v) for v in values[::2]]  # only gpt values may be lists
    questions[0], marker = split_image_marker(questions[0])
    turns = [_turn(q, a) for q, a in zip(questions, values[1::2], strict=True)]
    return turns, marker


def _turn(question: str, answer: str | tuple[str, ...]) -> Turn:
    if isinstance(answer, tuple):
        return Turn(question=question, candidates=answer)
    return Turn(question=question, answer=answer)


def _message_value(message: Any, i: int, where: tuple[int, str]) -> str | tuple[str, ...]:
    key = f"conversations[{i}]"
    if not isinstance(message, dict):
        raise _malformed(*where, key, f"expected an object, got {_kind(message)}")
    if set(message) != {"from", "value"}:
        # Anything else would be silently lost when the sample is written back.
        problem = f"expected exactly the keys 'from' and 'value', got {sorted(message)}"
        raise _malformed(*where, key, problem)
    role = _ROLES[i % 2]
    if message["from"] != role:
        problem = f"expected {role!r} (turns alternate human/gpt), got {message['from']!r}"
        raise _malformed(*where, f"{key}.from", problem)
    value = message["value"]
    if isinstance(value, list) and role == "gpt":
        return _candidates(value, f"{key}.value", where)
    if not isinstance(value, str):
        raise _malformed(*where, f"{key}.value", f"expected a string, got {_kind(value)}")
    return value


def _candidates(value: list[Any], key: str, where: tuple[int, str]) -> tuple[str, ...]:
    """A ``gpt`` value that lists candidate answers."""
    if not value:
        raise _malformed(*where, key, "an empty list; expected candidate answer strings")
    for j, candidate in enumerate(value):
        if not isinstance(candidate, str):
            raise _malformed(*where, f"{key}[{j}]", f"expected a string, got {_kind(candidate)}")
    return tuple(value)


def _image(
    record: dict[str, Any], where: tuple[int, str], folder: pathlib.Path | None
) -> tuple[bytes | pathlib.Path, str | None]:
    if "image" not in record:
        return b"", None  # a text-only record (as in LLaVA-1.5's mixture)
    name = record["image"]
    if not isinstance(name, str) or not name:
        raise _malformed(*where, "image", f"expected a file name, got {_kind(name)}")
    return (folder / name if folder is not None else pathlib.Path(name)), name


def _record_task(record: dict[str, Any], where: tuple[int, str]) -> str:
    for key in _TASK_KEYS:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise _malformed(*where, key, f"expected a string, got {_kind(value)}")
            if value:
                return value
    return ""


class MalformedRecord(ValueError):
    """A record that is not a valid LLaVA record: the message names the record (its index,
    and its id when it has a valid one), the key and the problem; ``record_id`` and
    ``problem`` (key and problem) are those parts, for callers that say where themselves."""

    def __init__(self, index: int, record_id: str | None, problem: str) -> None:
        where = f"record {index}" if record_id is None else f"record {index} (id {record_id!r})"
        super().__init__(f"{where}: {problem}")
        self.record_id = record_id
        self.problem = problem


def _malformed(index: int, record_id: str | None, key: str, problem: str) -> MalformedRecord:
    return MalformedRecord(index, record_id, f"{key}: {problem}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _iter_records(path: pathlib.Path) -> Iterator[Any]:
    try:
        yield from _iter_decoded_records(path)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _not_utf8(path: pathlib.Path, error: UnicodeDecodeError) -> ValueError:
    """ValueError naming the file, the line and the byte that UTF-8 cannot decode (the
    error's own position counts in a buffer of the reader)."""
    with path.open("rb") as f:
        offset = 0
        for line_number, data in enumerate(f, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = data[bad.start]
                return ValueError(
                    f"{path}: line {line_number}: not valid UTF-8: byte {byte:#04x} at "
                    f"byte {offset + bad.start} of the file ({bad.reason})"
                )
            offset += len(data)
    return ValueError(f"{path}: not valid UTF-8: {error}")


def _iter_decoded_records(path: pathlib.Path) -> Iterator[Any]:
    # utf-8-sig: tolerate a byte-order mark, which some editors write.
    with path.open(encoding="utf-8-sig") as f:
        first = _first_non_space(f)
        f.seek(0)
        if first == "[":
            yield from _iter_json_list(f, path)
            return
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON: {error}") from None


_READ_CHARS = 1 << 20
_WHITESPACE = " \t\n\r"
_DELIMITERS = _WHITESPACE + ",]"


def _iter_json_list(f: IO[str], path: pathlib.Path) -> Iterator[Any]:
    """The elements of the JSON list in ``f``, one at a time, reading about 1 MiB at a
    time: a 229 MB LLaVA-Instruct file is not held as one Python list. The same values and
    the same refusals as ``json.load`` (ValueError naming the file and the character)."""
    decoder = json.JSONDecoder()
    buffer, pos, dropped, ended = "", 0, 0, False

    def more() -> bool:  # read on; False at the end of the file
        nonlocal buffer, pos, dropped, ended
        chunk = "" if ended else f.read(_READ_CHARS)
        ended = not chunk
        dropped += pos
        buffer, pos = buffer[pos:] + chunk, 0
        return bool(chunk)

    def skip_space() -> str:  # the next non-space character ("" at the end)
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buffer) or not more():
                return buffer[pos] if pos < len(buffer) else ""

    def invalid(message: str, at: int) -> ValueError:
        return ValueError(f"{path}: not valid JSON: {message} at character {dropped + at}")

    skip_space()
    pos += 1  # the "[" (the caller saw it)
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            while True:  # an element, once what follows it is read (a number may go on)
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as error:
                    if not more():
                        raise invalid(error.msg, error.pos) from None
                    continue
                if ended or (end < len(buffer) and buffer[end] in _DELIMITERS):
                    break
                more()
            pos = end
            yield value
            after = skip_space()
            pos += 1
            if after == "]":
                break
            if after != ",":
                raise invalid("expected ',' or ']' after a list element", pos - 1)
            skip_space()
    if skip_space():
        raise invalid("extra data after the list", pos)


def _first_non_space(f: IO[str]) -> str:
    while chunk := f.read(4096):
        if stripped := chunk.lstrip():
            return stripped[0]
    return ""


# ---------------------------------------------------------------------------------------
# Samples -> records


def record_from_sample(sample: Sample) -> dict[str, Any]:
    """The LLaVA record of a sample: ``id``, ``image`` (when it has one), ``conversations``,
    then ``extra``."""
    clash = _CORE_KEYS & sample.extra.keys()
    if clash:
        raise ValueError(
            f"sample {sample.id!r}: extra: keys {sorted(clash)} clash with the sample's fields"
        )
    record: dict[str, Any] = {"id": sample.id}
    image = _image_name(sample)
    if image is not None:
        record["image"] = image
    record["conversations"] = _conversations(sample.turns, sample.image_marker)
    record.update(sample.extra)
    return record


def _image_name(sample: Sample) -> str | None:
    if sample.image_file is not None:
        return sample.image_file
    if isinstance(sample.image, os.PathLike):
        return os.fspath(sample.image)
    if sample.image:
        raise ValueError(
            f"sample {sample.id!r}: image: bytes without image_file; a LLaVA record names "
            "its image file"
        )
    return None


def _conversations(turns: list[Turn], marker: ImageMarker) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        question = join_image_marker(turn.question, marker) if i == 0 else turn.question
        messages.append({"from": "human", "value": question})
        answer = list(turn.candidates) if turn.candidates else turn.answer
        messages.append({"from": "gpt", "value": answer})
    return messages


def _write_records(out: IO[str], records: Iterable[dict[str, Any]], path: pathlib.Path) -> int:
    jsonl = path.suffix.lower() == ".jsonl"
    count = 0
    if not jsonl:
        out.write("[")
    for record in records:
        line = json.dumps(record, ensure_ascii=False)
        if jsonl:
            out.write(line + "\n")
        else:
            # One record per line keeps big JSON files diffable and greppable.
            out.write(("," if count else "") + "\n" + line)
        count += 1
    if not jsonl:
        out.write("\n]\n")
    return count
