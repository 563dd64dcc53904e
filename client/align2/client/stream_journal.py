"""The decisions of an ``align2 curate --stream`` run, journaled as they come, so that the
same command run again after the run was killed (SIGKILL, the OOM killer, a lost node) or
stopped goes on where it stopped, keeping what was kept, aligned samples included.

The journal is a JSONL file beside ``--out`` (``kept.json``: ``kept.journal.jsonl``), one
line per decision::

    {"options": "9c1e...", "file": "/data/detail_23k.jsonl", "record": 41,
     "digest": "3f2a...", "task": "detail", "report": {...the report line...},
     "kept": {...the kept LLaVA record...} or null}

A rerun does not send a record the journal decided when all of (``file``: the input's
absolute path, ``record``: its place in the file from 0, ``digest``: the whole record as
read, see :func:`record_digest`, ``task``, ``options``: the flags that change decisions)
match: it takes the journaled decision (its report line, its kept sample). An edited
record (its id and extra keys too, which a kept sample carries to ``--out``), or a rerun
with other selection or rewrite flags, is sent afresh; the CLI puts the server's models,
template version and defaults into ``options`` too. Images count by file name and size
(:meth:`~align2.client.types.Sample.image_file_size`), not content. Connection flags
(``--target``, ``--timeout``, ...) may change between runs.

A line is flushed to the OS as its decision comes (it outlives the process) and synced to
the disk with the next decision a second or more later, and on close (it outlives the
machine); a record whose line was lost is sent again, so nothing decided is lost, at worst
decided twice. A line that cannot be written raises :class:`JournalWriteError`. The file
is locked while a run uses it: a second run of the same command meanwhile is refused. A
run that finishes deletes its journal, unless it holds decisions of records that run did
not read (another input: those are kept for the command that reads them).

Pure Python (no grpc).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align2.client.jsonl_log import JsonlLog, text
from align2.client.llava import record_from_sample, sample_from_record, written_in_place
from align2.client.types import Sample

SYNC_SECONDS = 1.0
# The decisions a journal holds (an error is not journaled: it is sent again).
_DECISIONS = frozenset({"kept", "dropped_question", "dropped_answer"})


def journal_path(out: str | os.PathLike[str]) -> pathlib.Path | None:
    """Where the journal of a run writing ``out`` lives; None when ``out`` is not a regular
    file's path (``/dev/null``, a FIFO): such a run keeps no journal."""
    path = pathlib.Path(out)
    if written_in_place(path):
        return None
    return path.with_name(f"{path.stem}.journal.jsonl")


class JournalWriteError(OSError):
    """The journal could not be written: the run stops as when the server fails (the
    decisions so far are kept, the rest listed), naming the journal."""


@dataclass(frozen=True)
class Decided:
    """A decision an earlier run journaled: its report line and the sample it kept."""

    report: dict[str, Any]
    kept: Sample | None


class DecisionJournal:
    """One run's journal (see the module doc). ``options``: the flags that change decisions,
    as JSON values. :class:`~align2.client.jsonl_log.LogInUse` when another run holds it.

    After opening: ``loaded`` decisions that this run may take, ``stale`` ones made with
    other options (superseded), ``ignored`` unreadable lines; ``taken``: those taken back."""

    def __init__(self, path: str | os.PathLike[str], options: Mapping[str, Any]) -> None:
        self.path = pathlib.Path(path)
        self._options = _fingerprint(options)
        self.loaded = self.stale = self.ignored = 0
        self.taken = 0  # decisions taken back by this run
        # (file, record) -> (digest, task, journal line) in journal order
        self._decided: dict[tuple[str, int], list[tuple[str, str, bytes]]] = defaultdict(list)
        self._read: dict[str, int] = {}  # records read per file, to know what a run left
        self._log = JsonlLog(self.path, sync_seconds=SYNC_SECONDS, lock=True)
        try:
            self._load()
        except BaseException:
            self._log.close()
            raise

    def take(self, file: str, record: int, sample: Sample) -> Decided | None:
        """The journaled decision on record ``record`` of ``file`` (read as ``sample``), if an
        earlier run made one with these options on this content; None: send it."""
        key = (os.path.abspath(file), record)
        self._read[key[0]] = max(self._read.get(key[0], 0), record + 1)
        entries = self._decided.get(key)
        if not entries:
            return None
        # The first decision on this content: one on what the record held before an edit
        # does not hide the one made since (the record was sent again on every rerun).
        wanted = (record_digest(sample), sample.task)
        found = next((i for i, (d, t, _) in enumerate(entries) if (d, t) == wanted), None)
        if found is None:
            return None
        _, _, line = entries.pop(found)
        entry = json.loads(line)
        report, kept = entry["report"], entry["kept"]
        if kept is None:
            self.taken += 1
            return Decided(report, None)
        try:
            decided = Decided(report, sample_from_record(kept, record, default_task=sample.task))
        except ValueError:  # a damaged line: the record is sent again
            self.ignored += 1
            return None
        self.taken += 1
        return decided

    def add(
        self,
        file: str,
        record: int,
        sample: Sample,
        report: Mapping[str, Any],
        kept: Sample | None,
    ) -> None:
        """Journal the decision on record ``record`` of ``file`` (sent as ``sample``)."""
        entry = {
            "options": self._options,
            "file": os.path.abspath(file),
            "record": record,
            "digest": record_digest(sample),
            "task": sample.task,
            "report": dict(report),
            "kept": None if kept is None else record_from_sample(kept),
        }
        try:
            self._log.append([entry])
        except OSError as error:  # a full disk, a quota: not the input's fault
            raise JournalWriteError(
                error.errno, f"{self.path}: cannot journal a decision: {error.strerror or error}"
            ) from error

    def left(self) -> int:
        """Journaled decisions with these options on records this run did not read."""
        return sum(
            len(entries)
            for (file, record), entries in self._decided.items()
            if record >= self._read.get(file, 0)
        )

    def close(self, *, finished: bool) -> bool:
        """Close it; for a run that ``finished``, delete it unless :meth:`left` holds some.
        Returns whether the file is still there."""
        remove = finished and not self.left()
        if remove:
            self.path.unlink(missing_ok=True)  # before the lock goes: no run reads it meanwhile
        self._log.close()
        return not remove

    def _load(self) -> None:
        for line, entry in self._log.lines():
            try:
                if not isinstance(entry, dict):
                    raise TypeError(entry)
                options = entry["options"]
                key = (text(entry["file"]), _count(entry["record"]))
                digest, task = text(entry["digest"]), text(entry["task"])
                report, kept = entry["report"], entry["kept"]
                if not isinstance(report, dict) or not (kept is None or isinstance(kept, dict)):
                    raise TypeError(entry)
                if report.get("decision") not in _DECISIONS:  # recorded as it is when taken
                    raise TypeError(entry)
            except (KeyError, TypeError):
                self.ignored += 1
                continue
            if options != self._options:
                self.stale += 1
                continue
            # the line as read (its bytes are a fifth of its parsed dicts' memory): parsed
            # again when taken
            self._decided[key].append((digest, task, line))
            self.loaded += 1


def record_digest(sample: Sample) -> str:
    """A hash of a record as read: what it sends (image file name and size, turns) and what
    else a kept copy of it writes to ``--out`` (id, where ``<image>`` stood, extra keys)."""
    content = {"record": record_from_sample(sample), "image_size": sample.image_file_size()}
    text = json.dumps(content, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _fingerprint(options: Mapping[str, Any]) -> str:
    text = json.dumps(dict(options), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(value)
    return value
