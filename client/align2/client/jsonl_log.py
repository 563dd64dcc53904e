"""An append-only JSONL file that a rerun reads back: the scores of an offline curation
(:mod:`align2.client.scorestore`) and the decisions of ``curate --stream``
(:mod:`align2.client.stream_journal`).

Opening it cuts a last line without its newline (a write cut short by a crash), so that
the next entry is not glued to it. :meth:`JsonlLog.read` gives each line's JSON value, or
None for a line that cannot be read (bytes that are not UTF-8, not JSON), for the caller to
count; blank lines are skipped. :meth:`JsonlLog.append` writes whole lines straight to the
OS (no buffer of ours), where they outlive the process (SIGKILL, the OOM killer); ``fsync``,
so that they outlive the machine too, comes with every append, or at most every
``sync_seconds`` and on close. An append that fails (a full disk) leaves the file as it
was: no part of its lines is written later (on close), and none is left for the next
line to be glued to.

Pure Python (no grpc).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the log is not locked there
    fcntl = None  # type: ignore[assignment]


class LogInUse(ValueError):
    """Another process holds the log's lock."""


class JsonlLog:
    """One JSONL file, created when missing, opened for appending (see the module doc).

    ``lock``: hold an exclusive advisory lock on the file while open (:class:`LogInUse`
    when another process holds it), for a log that two runs must not both go on with."""

    def __init__(
        self, path: str | os.PathLike[str], *, sync_seconds: float = 0.0, lock: bool = False
    ) -> None:
        self.path = pathlib.Path(path)
        self._sync_seconds = sync_seconds
        self._synced = time.monotonic()
        self._out: IO[bytes] = self.path.open("ab", buffering=0)
        try:
            if lock:
                self._lock()
            _drop_truncated_tail(self.path)
        except BaseException:
            self._out.close()
            raise

    def read(self) -> Iterator[Any | None]:
        """The value of each line as the file holds it now; None for an unreadable line."""
        for _, value in self.lines():
            yield value

    def lines(self) -> Iterator[tuple[bytes, Any | None]]:
        """Each line as the file holds it now, and its value (None: unreadable)."""
        with self.path.open("rb") as f:
            for data in f:
                if not data.strip():
                    continue
                try:
                    yield data, json.loads(data.decode("utf-8"))
                except ValueError:  # not UTF-8 (UnicodeDecodeError), not JSON
                    yield data, None

    def append(self, entries: Sequence[Any]) -> None:
        """Write ``entries`` as lines, to the OS at once; to the disk as ``sync_seconds``
        says. OSError (the file then as it was before) when they cannot be written."""
        data = memoryview("".join(map(json_line, entries)).encode("utf-8"))
        fd = self._out.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
        except BaseException:
            with contextlib.suppress(OSError):  # a torn line: the next would be glued to it
                os.ftruncate(fd, end)
            raise
        if time.monotonic() - self._synced >= self._sync_seconds:
            self._sync()

    def close(self) -> None:
        if self._out.closed:
            return
        with contextlib.suppress(OSError):
            self._sync()
        self._out.close()

    def _sync(self) -> None:
        os.fsync(self._out.fileno())
        self._synced = time.monotonic()

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogInUse(f"{self.path}: another process is writing it") from None


def json_line(entry: Any) -> str:
    """``entry`` as a line of JSON, non-ASCII text as it is; a lone surrogate (a file name's
    byte that is not UTF-8, as Python reads it) escaped, since UTF-8 cannot hold it."""
    line = json.dumps(entry, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(entry)
    return line + "\n"


def _drop_truncated_tail(path: pathlib.Path) -> None:
    """Cut a last line without its newline (an interrupted write)."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = min(size, 1 << 20)
        while True:  # find the last newline, reading backwards
            f.seek(size - block)
            data = f.read(block)
            newline = data.rfind(b"\n")
            if newline >= 0 or block == size:
                f.truncate(size - block + newline + 1)
                return
            block = min(size, block * 2)


def text(value: Any) -> str:
    """A string read back from a line: TypeError (a damaged line) for anything else."""
    if not isinstance(value, str):
        raise TypeError(value)
    return value
