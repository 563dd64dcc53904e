"""``align2 curate FILE... --stream``: the files' records streamed through the Curate RPC
as they are read, each decision journaled (:mod:`align2.client.stream_journal`) so that the
same command goes on after any stop; the kept samples to ``--out``, every decision to
``--report``, and after a failure the records not decided to a rest file. Called by
:mod:`align2.client.cli`, which parses the arguments."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import os
import pathlib
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from align2.client.calibration import Calibration
from align2.client.cli_common import (
    OutputNotWritten,
    client_from_arguments,
    item_errors_status,
    output,
    progress,
    rewrite_options,
    why_stopped,
)
from align2.client.jsonl_log import json_line
from align2.client.llava import MalformedRecord, iter_llava, write_llava
from align2.client.results import (
    DECISIONS,
    CurateResult,
    ItemError,
    ProtocolError,
    ScoreResult,
)
from align2.client.resume import ResumePolicy
from align2.client.stream_journal import DecisionJournal, journal_path
from align2.client.sync import CurationClient
from align2.client.types import Sample


@contextlib.contextmanager
def _interrupts_wait() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """A context for steps that must not be cut in two: Ctrl-C or SIGTERM during one is
    raised (KeyboardInterrupt) when it ends; a second one at once. Main thread only (where
    Python runs signal handlers); the previous handlers are back afterwards."""
    state = {"busy": False, "pending": False}

    def handle(signum: int, frame: Any) -> None:
        if state["busy"] and not state["pending"]:
            state["pending"] = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def step() -> Iterator[None]:
        state["busy"] = True
        try:
            yield
        finally:
            state["busy"] = False
        if state["pending"]:
            state["pending"] = False
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield contextlib.nullcontext
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield step
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def run_curate_stream(namespace: argparse.Namespace) -> int:
    """Stream the files' samples to Curate as they are read; write the kept ones to
    ``--out`` (LLaVA) and every decision to ``--report``. Each decision is journaled as it
    comes (``OUT_STEM.journal.jsonl``, :mod:`align2.client.stream_journal`): the same command
    run again after a kill or a failure does not send the records decided, and keeps what
    they kept. When the stream fails, the samples kept so far are still written (none:
    ``--out`` is left as it was), and the records not decided (sent and unanswered, then
    those not sent) go to ``OUT_STEM.rest.jsonl``, for the same command to go on with
    another ``--out`` (exit 1; 2 for an input record that cannot be read, 130 interrupted;
    ``--skip-invalid``: a malformed record is an error decision instead, not sent).
    Each report line names the record decided (``file``, ``record`` from 0): ids may
    repeat."""
    with client_from_arguments(namespace) as client:
        path = journal_path(namespace.out)
        if path is None:
            return _curate_stream(namespace, client, None)
        return _curate_journaled(namespace, client, path)


def _curate_journaled(
    namespace: argparse.Namespace, client: CurationClient, path: pathlib.Path
) -> int:
    options = {**_decision_options(namespace), "server": _server_identity(namespace, client)}
    journal = DecisionJournal(path, options)
    if journal.loaded:
        print(
            f"align2 curate: {path} holds {journal.loaded} decisions of an earlier run with "
            "these flags: the records among them that are read again are not sent again",
            file=sys.stderr,
        )
    status = None
    other_inputs = False  # the journal holds decisions on records this run did not read
    try:
        finished = _curate_stream(namespace, client, journal)
        if finished == 0:  # renamed into place: on disk before the journal of them goes
            _sync_to_disk(namespace.out, namespace.report)
        status = finished
    finally:
        if journal.close(finished=status == 0) and status == 0:
            other_inputs = True
            print(
                f"align2 curate: {path} kept: {journal.left()} of its decisions are on records "
                "this run did not read",
                file=sys.stderr,
            )
    # A run of other inputs with this --out: the rest file is theirs, not decided by this run.
    # Only a run that went on from the journal, and read all it holds, ends what a stopped
    # run of the same input left: a run of other inputs with this --out does not.
    if status == 0 and journal.taken and not other_inputs:
        _remove_stale_rest(namespace)
    return status


def _remove_stale_rest(namespace: argparse.Namespace) -> None:
    """After a finished run that went on from the journal (see the caller), the rest file
    the stopped run of this ``--out`` left: its records are decided now, and a run on it
    would decide them again. Not when it was this run's input."""
    rest = _rest_path(namespace.out)
    inputs = {os.path.abspath(f) for f in namespace.file}
    if rest.is_file() and os.path.abspath(rest) not in inputs:
        rest.unlink()
        print(f"align2 curate: {rest} removed: its records are decided now", file=sys.stderr)


def _sync_to_disk(*paths: str | None) -> None:
    """fsync the regular files among ``paths``, then their folders (where they were renamed
    into place), so that they outlive the machine."""
    folders = set()
    for path in paths:
        if path is None or path == "-" or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        folders.add(os.path.dirname(os.path.abspath(path)))
    for folder in folders:
        with contextlib.suppress(OSError):  # a folder that cannot be opened (Windows)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _server_identity(namespace: argparse.Namespace, client: CurationClient) -> dict[str, Any]:
    """What on the server shapes the decisions: its reward models (and inner LLM with
    ``--align``), template version and option defaults, so that a journal's decisions are
    taken again only from the same set-up. A server not up yet is waited for, as a stream
    would be (not with ``--no-retry``)."""
    try:
        info = client.server_info()
    except grpc.RpcError as error:
        if namespace.no_retry or error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        client.wait_until_serving(ResumePolicy().max_wait_seconds)
        info = client.server_info()
    roles = ("reward", "inner_llm") if namespace.align else ("reward",)
    models = sorted(
        [m.role, m.ref.name, m.ref.model_id, m.ref.revision, m.ref.settings]
        for m in info.models
        if any(role in m.role for role in roles)
    )
    defaults = json_format.MessageToDict(info.defaults, preserving_proto_field_name=True)
    return {"models": models, "template_version": info.template_version, "defaults": defaults}


def _curate_stream(
    namespace: argparse.Namespace, client: CurationClient, journal: DecisionJournal | None
) -> int:
    # The records drawn and not yet decided, by the result's index.
    undecided: dict[int, tuple[str, int, Sample]] = {}
    # Decisions not the server's, found as the input is read (on gRPC's thread), to be
    # recorded by this one: an earlier run's, from the journal; malformed records skipped.
    settled: collections.deque[tuple[dict[str, Any], Sample | None]] = collections.deque()
    resuming = [journal is not None]

    def read() -> Iterator[Sample]:
        drawn = itertools.count()
        for path in namespace.file:
            place = itertools.count()  # the record's place in the file, skipped ones included

            def skipped(
                index: int, error: MalformedRecord, path: str = path, place: Any = place
            ) -> None:
                next(place)
                settled.append((_malformed_decision(path, index, error), None))

            records = iter_llava(
                path,
                image_folder=namespace.image_folder,
                task=namespace.task,
                invalid=skipped if namespace.skip_invalid else None,
            )
            for sample in records:
                record = next(place)
                if journal is not None and resuming[0]:
                    decided = journal.take(path, record, sample)
                    if decided is not None:
                        report = {**decided.report, "from_journal": True}
                        settled.append((report, decided.kept))
                        continue
                undecided[next(drawn)] = (path, record, sample)
                yield sample

    samples = read()
    counts: Counter[str] = Counter()
    kept: list[Sample] = []
    failure: BaseException | None = None
    report_to = output(namespace.report) if namespace.report else contextlib.nullcontext(None)
    unwritten: dict[str, OSError] = {}  # after a failure: outputs not written either
    rest = None
    try:
        with (
            report_to as report,
            progress(None, enabled=not namespace.no_progress) as advance,
            _interrupts_wait() as recording,
        ):

            def record(line: dict[str, Any], sample: Sample | None) -> None:
                # kept first: a report that can't be written (a full disk) stops the run with
                # this decision's sample still written to --out
                if sample is not None:
                    kept.append(sample)
                counts[line["decision"]] += 1
                advance(1)
                if report is not None:
                    try:
                        report.write(json_line(line))  # a file name's lone surrogate escaped
                    except OSError as error:
                        raise OutputNotWritten(
                            error.errno, f"{namespace.report}: a report line: {error.strerror}"
                        ) from error

            def record_settled() -> None:
                while settled:
                    line, sample = settled.popleft()
                    counts["from_journal"] += bool(line.get("from_journal"))
                    record(line, sample)

            results = client.curate(
                samples,
                question_keep_fraction=namespace.question_keep,
                answer_keep_fraction=namespace.answer_keep,
                align=namespace.align,
                priority=namespace.priority,
                **_selection_options(namespace),
                resume=not namespace.no_retry,
                **rewrite_options(namespace),
            )
            try:
                for result in results:
                    # Taken off the records not decided, journaled and added to the kept as one
                    # step: a Ctrl-C or SIGTERM meanwhile waits until the decision is recorded.
                    with recording():
                        record_settled()
                        drawn = undecided.get(result.index)
                        line = {**result.to_dict(), "file": None, "record": None}
                        if drawn is not None:
                            path, index, sent = drawn
                            line.update(file=path, record=index)
                            if journal is not None and result.decision != "error":
                                # a journal that can't be written stops the run with the
                                # record still undecided: in the rest file, not lost
                                journal.add(path, index, sent, line, result.sample)
                            del undecided[result.index]
                        record(line, result.sample)
                with recording():
                    record_settled()
            # An RPC failure, an input record that cannot be read, Ctrl-C or SIGTERM: the
            # kept samples so far are still written below.
            except (grpc.RpcError, ProtocolError, OSError, ValueError, KeyboardInterrupt) as error:
                failure = error
                results.stop_drawing()  # gRPC's thread may be reading the input: it is ours now
                resuming[0] = False  # the rest file gets every record this run did not decide
                record_settled()
            if failure is None:
                write_llava(kept, namespace.out)
            elif kept:
                _after_failure(unwritten, namespace.out, lambda: write_llava(kept, namespace.out))
            # An unreadable record ended the input (exit 2): nothing after it is read.
            if failure is not None and why_stopped(failure)[1] != 2:
                undone = [undecided[i][2] for i in sorted(undecided)]
                rest = _after_failure(
                    unwritten,
                    str(_rest_path(namespace.out)),
                    lambda: _write_rest(namespace.out, undone, samples),
                )
                record_settled()  # --skip-invalid: the malformed records read on the way
    except OSError as error:  # the report's last lines, as it is closed (a full disk)
        if failure is None:
            raise
        unwritten[namespace.report] = error
    summary = ", ".join(f"{counts[d]} {d}" for d in DECISIONS)
    if counts["from_journal"]:
        summary += f" ({counts.pop('from_journal')} decided by an earlier run)"
    decided = counts.total()
    print(f"align2 curate: {decided} samples: {summary}", file=sys.stderr)
    if failure is not None:
        unanswered = results.unanswered
        why, status = why_stopped(failure)
        written = f"{len(kept)} kept samples written" if kept else "no sample kept"
        if kept and namespace.out in unwritten:
            written = f"{len(kept)} kept samples not written"
        listed = f": {', '.join(unanswered)}" if len(unanswered) <= 10 else ""
        print(
            f"align2 curate: {why}; {written}; {len(unanswered)} sent and unanswered{listed}",
            file=sys.stderr,
        )
        if rest is not None:
            print(rest, file=sys.stderr)
        for path, problem in unwritten.items():
            print(f"align2 curate: {path} not written either: {problem}", file=sys.stderr)
        if journal is not None:
            print(
                f"align2 curate: or run the same command again: the decisions so far are in "
                f"{journal.path}, and their records are not sent again",
                file=sys.stderr,
            )
        return status
    return item_errors_status("curate", decided, counts["error"], namespace.max_errors)


def _after_failure(unwritten: dict[str, OSError], path: str, write: Callable[[], Any]) -> Any:
    """``write()``, after the run failed: an output that cannot be written either (the
    same full disk) goes into ``unwritten``, to be said with the failure, not raised in
    its place (exit 2, as bad input, without naming the journal that holds the decisions)."""
    try:
        return write()
    except OSError as error:
        unwritten[path] = error
        return None


def _malformed_decision(path: str, index: int, error: MalformedRecord) -> dict[str, Any]:
    """The report line of a malformed record left out (``--skip-invalid``): an error."""
    record_id = error.record_id or ""
    problem = ItemError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {error}")
    result = CurateResult(record_id, "error", ScoreResult(record_id), error=problem)
    return {**result.to_dict(), "file": path, "record": index}


def _decision_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``curate --stream`` that change its decisions (the journal's options)."""
    folder = namespace.image_folder
    options = {
        "question_keep": namespace.question_keep,
        "answer_keep": namespace.answer_keep,
        "task": namespace.task,
        "image_folder": None if folder is None else os.path.abspath(folder),
        "align": namespace.align,
        **_selection_options(namespace),
    }
    if namespace.align:
        options.update(rewrite_options(namespace))
    return options


def _rest_path(out: str) -> pathlib.Path:
    """kept.json: kept.rest.jsonl"""
    path = pathlib.Path(out)
    return path.with_name(f"{path.stem}.rest.jsonl")


def _write_rest(out: str, undecided: list[Sample], unsent: Iterator[Sample]) -> str:
    """After a failed stream: the records not decided, then those not sent, as one LLaVA
    file beside ``out`` that the same command takes to go on. Returns what to say of it."""
    rest = _rest_path(out)
    problem: list[BaseException] = []

    def readable() -> Iterator[Sample]:
        try:
            yield from unsent
        except (OSError, ValueError) as error:  # a bad record further on: stop before it
            problem.append(error)

    def with_task(sample: Sample) -> Sample:  # a task the file name gave stays with it
        if not sample.task or {"task", "type"} & sample.extra.keys():
            return sample
        return dataclasses.replace(sample, extra={**sample.extra, "task": sample.task})

    count = write_llava(map(with_task, itertools.chain(undecided, readable())), rest)
    note = f" (reading stopped at: {problem[0]})" if problem else ""
    return (
        f"align2 curate: the {count} records not decided ({len(undecided)} drawn, then those "
        f"not sent) are in {rest}: to go on, run the command on it with another --out{note}"
    )


def _selection_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """The online selection flags as ``curate()`` arguments (calibration files read now)."""
    options: dict[str, Any] = {
        "selection_key": namespace.selection_key,
        "min_window": namespace.min_window,
    }
    if namespace.thresholds is not None:
        options.update(Calibration.load(namespace.thresholds).thresholds())
    if namespace.seed_scores is not None:
        options.update(Calibration.load(namespace.seed_scores).seeds())
    return options
