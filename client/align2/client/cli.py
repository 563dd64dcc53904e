"""The ``align2`` command.

Client subcommands (``info``, ``health``, ``score``, ``align``, ``curate``) need only the
light client.
Server subcommands (``serve``, ``build-models``, ``train-heads``, ``train-lora``) are forwarded to
``align2.server.cli.main``, which is imported only when one of them runs: the client
command never imports server code.

Exit status: 0 done (per-item errors are data, written to the output), 1 an RPC failed,
2 bad usage or input, 130 interrupted (Ctrl-C or SIGTERM). A command that stops early says
what it kept: ``score`` leaves its lines so far in ``OUT.partial`` (``OUT`` itself is
replaced only by a finished run); ``align`` and ``curate --stream`` write the samples kept
so far to ``--out`` and name what was not done; ``curate --stream`` journals each decision
as it comes, so that the same command goes on after any stop, ``kill -9`` included
(:mod:`align2.client.stream_journal`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import itertools
import json
import os
import pathlib
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import grpc
from google.protobuf import json_format

from align2.client.aio import DEFAULT_MAX_CONCURRENCY
from align2.client.balancing import POLICIES
from align2.client.calibration import Calibration
from align2.client.calls import (
    DEFAULT_CHUNK_SIZE,
    HEADS,
    PARTS,
    PRIORITIES,
    parse_heads,
    split_chunks,
)
from align2.client.llava import MalformedRecord, iter_llava, read_llava, write_llava
from align2.client.offline_cli import EXIT_INTERRUPTED, run_offline
from align2.client.results import (
    DECISIONS,
    CurateResult,
    ItemError,
    ProtocolError,
    ScoreResult,
)
from align2.client.stream_journal import DecisionJournal, journal_path
from align2.client.sync import CurationClient
from align2.client.types import Sample

SERVER_COMMANDS: dict[str, str] = {
    "serve": "run the align2 server (server extras)",
    "build-models": "build the embedded default models (server extras)",
    "train-heads": "train the reward-model heads (server extras)",
    "train-lora": "train the LoRA reward adapters the method's way (server extras)",
    "convert-reward": "convert the paper's LoRA reward adapters to a checkpoint (server extras)",
}
DEFAULT_TARGET = "localhost:50051"
TOKEN_ENV = "ALIGN2_TOKEN"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SERVER_COMMANDS:
        return run_server_command(args)
    parser = build_parser()
    namespace = parser.parse_args(args)
    if namespace.command is None:
        parser.print_help(sys.stderr)
        return 2
    if namespace.token is None:
        namespace.token = os.environ.get(TOKEN_ENV)
    try:
        with _sigterm_interrupts():
            if getattr(namespace, "wait_ready", 0) > 0:
                with client_from_arguments(namespace) as client:
                    client.wait_until_serving(namespace.wait_ready)
            status: int = namespace.run(namespace)
    except (grpc.RpcError, OSError, ValueError, KeyboardInterrupt) as error:
        why, status = _why_stopped(error)
        print(f"align2 {namespace.command}: {why}", file=sys.stderr)
    return status


def _why_stopped(error: BaseException) -> tuple[str, int]:
    """What stopped a command, in words, and its exit status: 130 interrupted, 1 an RPC
    (or the server's answer) failed, 2 bad usage or input."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, grpc.RpcError):
        return _describe_rpc_error(error), 1
    if isinstance(error, TimeoutError):  # the server, not the input
        return str(error), 1
    return str(error), 1 if isinstance(error, ProtocolError) else 2


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a pod stopping, ``timeout``, ``kill``) stops a command as Ctrl-C does, so
    that it writes what it has; the previous handler is back afterwards. Main thread only
    (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:  # None: a handler not installed from Python; the default is the nearest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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


def run_server_command(argv: list[str]) -> int:
    """Forward ``argv`` (subcommand first) to ``align2.server.cli.main``, imported only now."""
    try:
        server_cli = importlib.import_module("align2.server.cli")
    except ModuleNotFoundError as error:
        print(
            f"align2 {argv[0]}: needs the align2 server and its extras "
            f"(pip install 'align2[server]'); missing module {error.name!r}",
            file=sys.stderr,
        )
        return 2
    return int(server_cli.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align2",
        description="Score and restyle LLaVA-format instruction data (Align2LLaVA).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    connection = _connection_arguments()
    info = commands.add_parser("info", parents=[connection], help="show what a server runs")
    info.set_defaults(run=run_info)
    health = commands.add_parser(
        "health", parents=[connection], help="gRPC health check; exit 0 when SERVING"
    )
    health.add_argument("--service", default="", help="service name ('' = the server)")
    health.set_defaults(run=run_health)
    score = commands.add_parser(
        "score", parents=[connection], help="score a LLaVA file; results as JSONL"
    )
    _score_arguments(score)
    score.set_defaults(run=run_score)
    align = commands.add_parser(
        "align",
        parents=[connection],
        help="restyle a LLaVA file with the server's inner LLM; write the kept samples",
    )
    _align_arguments(align)
    align.set_defaults(run=run_align)
    curate = commands.add_parser(
        "curate",
        parents=[connection],
        help="keep the best samples of LLaVA files as the method does (per task type: top "
        "30%% by question score, then top 30%% by answer score); write them (restyled with "
        "--align)",
    )
    _curate_arguments(curate)
    curate.set_defaults(run=run_curate)
    for name, summary in SERVER_COMMANDS.items():
        # Listed for --help only: main() forwards these before parsing.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def _connection_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        action=_TargetAction,
        default=DEFAULT_TARGET,
        help="server host:port or gRPC target, e.g. dns:///NAME:PORT for every address of a "
        "name (%(default)s); repeat it, or separate IP:PORT with commas, for several "
        "replicas (their calls are balanced round_robin)",
    )
    group.add_argument(
        "--load-balancing",
        choices=POLICIES,
        default=None,
        help="gRPC's policy (default: round_robin for several replicas, else pick_first)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline per RPC, seconds (curate --stream: for the whole stream, resumes included)",
    )
    group.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV} if set)")
    group.add_argument("--tls", action="store_true", help="TLS with the system roots")
    group.add_argument("--root-cert", default=None, help="PEM file of the roots to trust")
    group.add_argument("--client-cert", default=None, help="PEM certificate chain (mTLS)")
    group.add_argument("--client-key", default=None, help="PEM private key (mTLS)")
    group.add_argument(
        "--no-retry",
        action="store_true",
        help="don't retry UNAVAILABLE etc., nor resume a Curate stream after a failure",
    )
    group.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait until the server reports SERVING (reachable, models loaded), at "
        "most SECONDS (exit 1 after); for a sidecar that starts with its server",
    )
    return parser


class _TargetAction(argparse.Action):
    """``--target`` given again adds a replica: the targets are joined with commas (the
    clients turn such a list into gRPC's ipv4:/ipv6: target)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, "_targets", [])
        given.append(str(values))
        namespace._targets = given
        setattr(namespace, self.dest, ",".join(given))


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LLaVA JSON list or JSONL")
    parser.add_argument("--image-folder", default=None, help="folder of the records' images")
    parser.add_argument("--task", default=None, help="task type (default: record, file name)")
    parser.add_argument(
        "--heads",
        type=heads_argument,
        default=["question", "answer"],
        help=f"comma-separated, of {','.join(HEADS)} (default: both)",
    )
    parser.add_argument("--out", default="-", help="JSONL results file (default: stdout)")
    _chunk_size_argument(parser)
    _priority_argument(parser)
    _model_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


Arguments = argparse.ArgumentParser | argparse._ArgumentGroup


def _chunk_size_argument(parser: Arguments) -> None:
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="samples per call (default: %(default)s, the server's default max_samples_per_call)",
    )


def _priority_argument(parser: Arguments) -> None:
    parser.add_argument(
        "--priority",
        choices=sorted(PRIORITIES),
        default=None,
        help="queue class: interactive goes first (default: bulk)",
    )


def _model_arguments(parser: Arguments) -> None:
    for head in ("question", "answer"):
        parser.add_argument(
            f"--{head}-model",
            default=None,
            help=f"the {head} reward model's name, of `align2 info` (server default)",
        )


def _llava_in_out_arguments(
    parser: argparse.ArgumentParser, *, file: str, out: str, report: str
) -> None:
    """The input file and its images, the LLaVA output and the JSONL report (help texts)."""
    parser.add_argument("file", help=file)
    parser.add_argument("--image-folder", default=None, help="folder of the records' images")
    parser.add_argument("--task", default=None, help="task type (default: record, file name)")
    parser.add_argument("--out", required=True, help=out)
    parser.add_argument("--report", default=None, help=report)


def _align_arguments(parser: argparse.ArgumentParser) -> None:
    _llava_in_out_arguments(
        parser,
        file="LLaVA JSON list or JSONL",
        out="LLaVA file (.json or .jsonl) of the samples as kept",
        report="JSONL of every turn: original, rewrite, verdict",
    )
    _rewrite_arguments(parser)
    _chunk_size_argument(parser)
    _priority_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rewrite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts", choices=sorted(PARTS), default="both", help="what to rewrite (default: both)"
    )
    parser.add_argument("--no-review", action="store_true", help="keep rewrites unreviewed")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="per generation (server default)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="0: greedy (server default)"
    )
    parser.add_argument("--top-p", type=float, default=None, help="in (0, 1] (server default)")
    parser.add_argument(
        "--seed", type=int, default=None, help="sampling seed, for repeatable sampled rewrites"
    )
    parser.add_argument("--template", default=None, help="template set (server default)")


def _rewrite_options(namespace: argparse.Namespace) -> dict[str, Any]:
    return {
        "parts": namespace.parts,
        "review": not namespace.no_review,
        "max_new_tokens": namespace.max_new_tokens,
        "temperature": namespace.temperature,
        "top_p": namespace.top_p,
        "seed": namespace.seed,
        "template": namespace.template,
    }


def _curate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="+", help="LLaVA JSON lists or JSONL files")
    parser.add_argument("--image-folder", default=None, help="folder of the records' images")
    parser.add_argument(
        "--task",
        default=None,
        help="task type of records without their own 'task'/'type' key (default: the file "
        "name's prefix: complex_reasoning, conversation, detail)",
    )
    parser.add_argument("--out", required=True, help="LLaVA file (.json or .jsonl) of the kept")
    parser.add_argument(
        "--report",
        default=None,
        help="the report as JSON (with --stream: JSONL of every decision)",
    )
    parser.add_argument(
        "--question-keep",
        type=_keep_fraction,
        default=None,
        help="share of each task type kept by question score (default 0.3)",
    )
    parser.add_argument(
        "--answer-keep",
        type=_keep_fraction,
        default=None,
        help="share of those kept by mean answer score (default 0.3)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="stream through the server's Curate RPC (online thresholds from the scores "
        "seen so far) instead of the exact selection on the whole files; each decision is "
        "journaled to OUT_STEM.journal.jsonl, so the same command goes on after any stop",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out malformed records instead of stopping (listed in the report; with "
        "--stream each an error decision); without --stream also records that can't be scored",
    )
    parser.add_argument("--align", action="store_true", help="restyle the kept samples")
    _rewrite_arguments(parser)
    _priority_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    online = parser.add_argument_group("online selection (with --stream)")
    online.add_argument(
        "--selection-key",
        default=None,
        help="share the server's score windows with every stream of this key (workers of "
        "one pipeline select as one; per replica)",
    )
    online.add_argument(
        "--thresholds",
        default=None,
        metavar="FILE",
        help="decide against the thresholds of a calibration file (python -m "
        "align2.client.calibration): the same on every replica",
    )
    online.add_argument(
        "--seed-scores",
        default=None,
        metavar="FILE",
        help="fill the windows with a calibration file's scores before the first sample",
    )
    online.add_argument(
        "--min-window",
        type=int,
        default=None,
        help="decisions wait until their task's window holds this many scores (server "
        "default 100; 1: decide at once)",
    )
    offline = parser.add_argument_group("exact selection (without --stream)")
    offline.add_argument(
        "--scores",
        default=None,
        help="JSONL of every score, read to resume and appended to (default: OUT.scores.jsonl)",
    )
    offline.add_argument(
        "--one-task",
        action="store_true",
        help="rank all records together, whatever their task types",
    )
    offline.add_argument("--plot", default=None, help="PNG of the score histograms (Pillow)")
    _chunk_size_argument(offline)
    offline.add_argument(
        "--concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY, help="RPCs in flight"
    )
    _model_arguments(offline)


# Flags of the exact selection whose defaults are empty (--chunk-size and --concurrency are
# not refused with --stream: they have defaults).
_OFFLINE_ONLY = ("scores", "one_task", "plot", "question_model", "answer_model")
_STREAM_ONLY = ("selection_key", "thresholds", "seed_scores", "min_window")


def heads_argument(text: str) -> list[str]:
    """``"question,answer"`` -> ``["question", "answer"]``, validated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        parse_heads(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def client_from_arguments(namespace: argparse.Namespace) -> CurationClient:
    return CurationClient(namespace.target, **_client_options(namespace))


def _client_options(namespace: argparse.Namespace) -> dict[str, Any]:
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


def run_info(namespace: argparse.Namespace) -> int:
    with client_from_arguments(namespace) as client:
        info = client.server_info()
    # Zeros printed too: a limit of 0 (Curate off, no selection keys) is not "not reported".
    text = json_format.MessageToJson(
        info, preserving_proto_field_name=True, indent=2, always_print_fields_with_no_presence=True
    )
    print(text)
    return 0


def run_health(namespace: argparse.Namespace) -> int:
    """Print the status; exit 0 when SERVING, 1 otherwise (a Docker HEALTHCHECK). Without
    client-side health checking, which would hide a replica that is not SERVING."""
    options = {**_client_options(namespace), "health_check": False}
    with CurationClient(namespace.target, **options) as client:
        status = client.health(namespace.service)
    print(status)
    return 0 if status == "SERVING" else 1


def run_score(namespace: argparse.Namespace) -> int:
    """Stream results as JSONL, one RPC (chunk) at a time, flushed after each."""
    _check_writable(namespace.out)
    samples = read_llava(namespace.file, image_folder=namespace.image_folder, task=namespace.task)
    failed = 0
    with (
        client_from_arguments(namespace) as client,
        _output(namespace.out) as out,
        _progress(len(samples), enabled=not namespace.no_progress) as advance,
    ):
        for chunk in split_chunks(samples, namespace.chunk_size):
            results = client.score(
                chunk,
                namespace.heads,
                priority=namespace.priority,
                question_model=namespace.question_model,
                answer_model=namespace.answer_model,
            )
            for result in results:
                out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
                failed += not result.ok
            out.flush()
            advance(len(chunk))
    print(f"align2 score: {len(samples)} samples, {failed} item errors", file=sys.stderr)
    return 0


def run_align(namespace: argparse.Namespace) -> int:
    """Write the samples as kept to ``--out`` (LLaVA); samples that failed are left out
    (counted on stderr, and with their errors in ``--report`` when given). When a call
    fails or the run is interrupted, the samples aligned so far are written all the same
    (none: ``--out`` is left as it was), the report holds every result so far, and the
    first record not done is named (exit 1, or 130)."""
    _check_writable(namespace.out, namespace.report)
    samples = read_llava(namespace.file, image_folder=namespace.image_folder, task=namespace.task)
    options = {**_rewrite_options(namespace), "priority": namespace.priority}
    kept: list[Sample] = []
    done = 0
    stop: grpc.RpcError | KeyboardInterrupt | None = None
    report_to = _output(namespace.report) if namespace.report else contextlib.nullcontext(None)
    with (
        client_from_arguments(namespace) as client,
        report_to as report,
        _progress(len(samples), enabled=not namespace.no_progress) as advance,
    ):
        try:
            for chunk in split_chunks(samples, namespace.chunk_size):
                for result in client.align(chunk, **options):
                    if result.sample is not None:
                        kept.append(result.sample)
                    if report is not None:
                        report.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
                done += len(chunk)
                advance(len(chunk))
        except (grpc.RpcError, KeyboardInterrupt) as error:
            stop = error
    if stop is None:
        write_llava(kept, namespace.out)
        failed = len(samples) - len(kept)
        print(f"align2 align: {len(samples)} samples, {failed} item errors", file=sys.stderr)
        return 0
    if kept:
        write_llava(kept, namespace.out)
    why, status = _why_stopped(stop)
    written = f"{len(kept)} aligned samples written to {namespace.out}" if kept else (
        f"nothing aligned, {namespace.out} left as it was"
    )  # fmt: skip
    rest = (
        f"{len(samples) - done} not done, from record {done} (id {samples[done].id!r}) on"
        if done < len(samples)
        else "every sample done"
    )
    print(f"align2 align: {why}; {written}; {rest}", file=sys.stderr)
    return status


def run_curate(namespace: argparse.Namespace) -> int:
    """The exact selection on the files (:mod:`align2.client.offline_cli`), or with
    ``--stream`` the Curate RPC."""
    _check_writable(namespace.out, namespace.report)
    if namespace.stream:
        given = [
            f"--{name.replace('_', '-')}" for name in _OFFLINE_ONLY if getattr(namespace, name)
        ]
        if given:
            raise ValueError(f"{', '.join(given)}: not with --stream (exact selection only)")
        return run_curate_stream(namespace)
    given = [
        f"--{name.replace('_', '-')}"
        for name in _STREAM_ONLY
        if getattr(namespace, name) is not None
    ]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --stream (online selection)")
    options = {**_client_options(namespace), "max_concurrency": namespace.concurrency}
    align_options = None
    if namespace.align:
        align_options = {**_rewrite_options(namespace), "priority": namespace.priority}
    enabled = not namespace.no_progress
    return run_offline(
        namespace,
        client_options=options,
        align_options=align_options,
        progress=lambda what, total: _progress(total, enabled=enabled, what=what),
        describe_error=_describe_rpc_error,
    )


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
    path = journal_path(namespace.out)
    if path is None:
        return _curate_stream(namespace, None)
    journal = DecisionJournal(path, _decision_options(namespace))
    if journal.loaded:
        print(
            f"align2 curate: {path} holds {journal.loaded} decisions of an earlier run: "
            "their records are not sent again",
            file=sys.stderr,
        )
    status = None
    try:
        finished = _curate_stream(namespace, journal)
        if finished == 0:  # renamed into place: on disk before the journal of them goes
            _sync_to_disk(namespace.out, namespace.report)
        status = finished
    finally:
        if journal.close(finished=status == 0) and status == 0:
            print(
                f"align2 curate: {path} kept: {journal.left()} of its decisions are on records "
                "this run did not read",
                file=sys.stderr,
            )
    return status


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


def _curate_stream(namespace: argparse.Namespace, journal: DecisionJournal | None) -> int:
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
    report_to = _output(namespace.report) if namespace.report else contextlib.nullcontext(None)
    with (
        client_from_arguments(namespace) as client,
        report_to as report,
        _progress(None, enabled=not namespace.no_progress) as advance,
        _interrupts_wait() as recording,
    ):

        def record(line: dict[str, Any], sample: Sample | None) -> None:
            counts[line["decision"]] += 1
            advance(1)
            if report is not None:
                report.write(json.dumps(line, ensure_ascii=False) + "\n")
            if sample is not None:
                kept.append(sample)

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
            **_rewrite_options(namespace),
        )
        try:
            for result in results:
                # Taken off the records not decided, journaled and added to the kept as one
                # step: a Ctrl-C or SIGTERM meanwhile waits until the decision is recorded.
                with recording():
                    record_settled()
                    drawn = undecided.pop(result.index, None)
                    line = {**result.to_dict(), "file": None, "record": None}
                    if drawn is not None:
                        path, index, sent = drawn
                        line.update(file=path, record=index)
                        if journal is not None and result.decision != "error":
                            journal.add(path, index, sent, line, result.sample)
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
        if failure is None or kept:
            write_llava(kept, namespace.out)
        rest = None
        # An unreadable record ended the input (exit 2): nothing after it is read.
        if failure is not None and _why_stopped(failure)[1] != 2:
            rest = _write_rest(namespace.out, [undecided[i][2] for i in sorted(undecided)], samples)
            record_settled()  # --skip-invalid: the malformed records read on the way
    summary = ", ".join(f"{counts[d]} {d}" for d in DECISIONS)
    if counts["from_journal"]:
        summary += f" ({counts.pop('from_journal')} decided by an earlier run)"
    print(f"align2 curate: {counts.total()} samples: {summary}", file=sys.stderr)
    if failure is not None:
        unanswered = results.unanswered
        why, status = _why_stopped(failure)
        written = f"{len(kept)} kept samples written" if kept else "no sample kept"
        listed = f": {', '.join(unanswered)}" if len(unanswered) <= 10 else ""
        print(
            f"align2 curate: {why}; {written}; {len(unanswered)} sent and unanswered{listed}",
            file=sys.stderr,
        )
        if rest is not None:
            print(rest, file=sys.stderr)
        if journal is not None:
            print(
                f"align2 curate: or run the same command again: the decisions so far are in "
                f"{journal.path}, and their records are not sent again",
                file=sys.stderr,
            )
        return status
    return 0


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
        options.update(_rewrite_options(namespace))
    return options


def _write_rest(out: str, undecided: list[Sample], unsent: Iterator[Sample]) -> str:
    """After a failed stream: the records not decided, then those not sent, as one LLaVA
    file beside ``out`` that the same command takes to go on. Returns what to say of it."""
    rest = pathlib.Path(out)
    rest = rest.with_name(f"{rest.stem}.rest.jsonl")  # kept.json: kept.rest.jsonl
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


def _check_writable(*paths: str | None) -> None:
    """ValueError now, before any work, for an output whose folder is missing or not
    writable (a run must not end in an error after hours of work)."""
    for path in paths:
        if path is None or path == "-":
            continue
        if os.path.exists(path) and not os.path.isfile(path):  # /dev/null, a FIFO: as it is
            if not os.access(path, os.W_OK):
                raise ValueError(f"{path!r} is not writable")
            continue
        folder = pathlib.Path(path).parent
        if not folder.is_dir():
            raise ValueError(f"{path}: no such folder {str(folder)!r}")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{path}: folder {str(folder)!r} is not writable")


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[str]]:
    """A text output: stdout for ``-``; else ``PATH.partial``, which replaces ``PATH`` when
    the run finishes. A run that stops leaves ``PATH`` as it was and says where its lines
    so far are."""
    if path == "-":
        yield sys.stdout
        return
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/null, a FIFO: as it is
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


def _keep_fraction(text: str) -> float:
    """A share kept, in (0, 1]: refused by argparse naming the flag (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


@contextlib.contextmanager
def _progress(
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


def _describe_rpc_error(error: grpc.RpcError) -> str:
    # Both the sync and the aio errors carry code() and details() (grpc.Call's interface).
    if not (hasattr(error, "code") and hasattr(error, "details")):
        return str(error)
    return f"{error.code().name}: {error.details()}"


if __name__ == "__main__":  # python -m align2.client.cli, as the align2 command
    sys.exit(main())
