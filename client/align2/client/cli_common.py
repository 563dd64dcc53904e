"""What the ``align2`` client subcommands share: the client their connection flags make,
outputs that replace their file only when the run finishes, the progress bar, and why a
command stopped, with its exit status (0 done, 1 an RPC failed, 2 bad usage or input, 3 done
but more items failed than ``--max-errors`` allows, 130 interrupted)."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import grpc

from align2.client.calls import DEFAULT_CHUNK_SIZE
from align2.client.llava import written_in_place
from align2.client.results import ProtocolError
from align2.client.stream_journal import JournalWriteError
from align2.client.sync import CurationClient

EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM
EXIT_ITEM_ERRORS = 3  # done, but more items failed than --max-errors allows


class OutputNotWritten(OSError):
    """An output that can't be written as the run goes (a full disk): the run stops as when
    the server fails (exit 1, what was done kept), not as for bad input."""


def why_stopped(error: BaseException) -> tuple[str, int]:
    """What stopped a command, in words, and its exit status: 130 interrupted, 1 an RPC
    (or the server's answer) failed, 2 bad usage or input."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, grpc.RpcError):
        return describe_rpc_error(error), 1
    if isinstance(error, TimeoutError | JournalWriteError | OutputNotWritten):  # not the input
        return str(error), 1
    return str(error), 1 if isinstance(error, ProtocolError) else 2


def item_errors_status(command: str, items: int, failed: int, max_errors: int | None) -> int:
    """A finished run's exit status: 0, or 3 (said on stderr) when more of its ``items``
    failed than ``max_errors`` allows; without ``--max-errors``, when every one of them
    failed (a wrong image folder, the wrong server: nothing was done). Per-item errors
    stay data either way: every output is written first."""
    if max_errors is None:
        over = items > 0 and failed == items
        limit = "every item failed"
    else:
        over = failed > max_errors
        limit = f"more than --max-errors {max_errors}"
    if not over:
        return 0
    print(f"align2 {command}: {failed} of {items} items failed: {limit} (exit 3)", file=sys.stderr)
    return EXIT_ITEM_ERRORS


def max_errors_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--max-errors",
        type=_count,
        default=None,
        metavar="N",
        help="exit 3 (outputs written all the same) when more than N items fail "
        "(default: when every item fails)",
    )


def _count(text: str) -> int:
    """A whole number >= 0, refused by argparse naming the flag (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is below 0")
    return value


def rewrite_options(namespace: argparse.Namespace) -> dict[str, Any]:
    return {
        "parts": namespace.parts,
        "review": not namespace.no_review,
        "max_new_tokens": namespace.max_new_tokens,
        "temperature": namespace.temperature,
        "top_p": namespace.top_p,
        "seed": namespace.seed,
        "template": namespace.template,
    }


def client_from_arguments(namespace: argparse.Namespace) -> CurationClient:
    return CurationClient(namespace.target, **client_options(namespace))


def client_options(namespace: argparse.Namespace) -> dict[str, Any]:
    return {
        "timeout": namespace.timeout,
        "chunk_size": getattr(namespace, "chunk_size", DEFAULT_CHUNK_SIZE),
        "token": namespace.token,
        "root_certificates": namespace.root_cert,
        "private_key": namespace.client_key,
        "certificate_chain": namespace.client_cert,
        "tls": True if namespace.tls else None,
        "retry": not namespace.no_retry,
        "load_balancing": namespace.load_balancing,
    }


def check_writable(*paths: str | None) -> None:
    """ValueError now, before any work, for an output whose folder is missing or not
    writable (a run must not end in an error after hours of work)."""
    for path in paths:
        if path is None or path == "-":
            continue
        if written_in_place(path):  # /dev/null, a FIFO: as it is
            if not os.access(path, os.W_OK):
                raise ValueError(f"{path!r} is not writable")
            continue
        folder = pathlib.Path(path).parent
        if not folder.is_dir():
            raise ValueError(f"{path}: no such folder {str(folder)!r}")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{path}: folder {str(folder)!r} is not writable")


@contextlib.contextmanager
def output(path: str) -> Iterator[IO[str]]:
    """A text output: stdout for ``-``; else ``PATH.partial``, which replaces ``PATH`` when
    the run finishes. A run that stops leaves ``PATH`` as it was and says where its lines
    so far are."""
    if path == "-":
        yield sys.stdout
        return
    if written_in_place(path):  # /dev/null, a FIFO: as it is
        with open(path, "w", encoding="utf-8") as out:
            yield out
        return
    partial = pathlib.Path(path + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            yield out
    except BaseException:
        print(f"align2: the lines written so far are in {partial}", file=sys.stderr)
        raise
    os.replace(partial, path)


@contextlib.contextmanager
def progress(
    total: int | None, *, enabled: bool, what: str | None = None
) -> Iterator[Callable[[int], Any]]:
    """A progress bar's ``update`` when tqdm is installed (optional) and stderr is a
    terminal, else a no-op (a pipeline's log gets no bar frames)."""
    bar_class = _tqdm() if enabled and sys.stderr.isatty() else None
    if bar_class is None:
        yield lambda _: None
        return
    with bar_class(total=total, unit="sample", file=sys.stderr, desc=what) as bar:
        yield bar.update


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def describe_rpc_error(error: grpc.RpcError) -> str:
    # Both the sync and the aio errors carry code() and details() (grpc.Call's interface).
    if not (hasattr(error, "code") and hasattr(error, "details")):
        return str(error)
    return f"{error.code().name}: {error.details()}"
