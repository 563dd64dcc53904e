"""The ``align2`` command.

Client subcommands (``info``, ``health``, ``score``, ``align``, ``curate``) need only the
light client.
Server subcommands (``serve``, ``build-models``, ``train-heads``, ``train-lora``) are forwarded to
``align2.server.cli.main``, which is imported only when one of them runs: the client
command never imports server code.

Exit status: 0 done (per-item errors are data, written to the output), 1 an RPC failed,
2 bad usage or input, 3 done but more items failed than ``--max-errors`` allows (by
default: every item failed), 130 interrupted (Ctrl-C or SIGTERM). A command that stops early says
what it kept: ``score`` leaves its lines so far in ``OUT.partial`` (``OUT`` itself is
replaced only by a finished run); ``align`` and ``curate --stream`` write the samples kept
so far to ``--out`` and name what was not done; ``curate --stream`` journals each decision
as it comes, so that the same command goes on after any stop, ``kill -9`` included
(:mod:`align2.client.stream_journal`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from align2.client.aio import DEFAULT_MAX_CONCURRENCY
from align2.client.balancing import POLICIES
from align2.client.calls import (
    DEFAULT_CHUNK_SIZE,
    HEADS,
    PARTS,
    PRIORITIES,
    parse_heads,
    split_chunks,
)
from align2.client.cli_common import (
    check_writable,
    client_from_arguments,
    client_options,
    describe_rpc_error,
    item_errors_status,
    max_errors_argument,
    output,
    progress,
    rewrite_options,
    why_stopped,
)
from align2.client.llava import read_llava, write_llava
from align2.client.offline_cli import run_offline
from align2.client.stream_cli import run_curate_stream
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
        why, status = why_stopped(error)
        print(f"align2 {namespace.command}: {why}", file=sys.stderr)
    return status


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
    max_errors_argument(parser)
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
    max_errors_argument(parser)
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
    max_errors_argument(parser)
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
    options = {**client_options(namespace), "health_check": False}
    with CurationClient(namespace.target, **options) as client:
        status = client.health(namespace.service)
    print(status)
    return 0 if status == "SERVING" else 1


def run_score(namespace: argparse.Namespace) -> int:
    """Stream results as JSONL, one RPC (chunk) at a time, flushed after each."""
    check_writable(namespace.out)
    samples = read_llava(namespace.file, image_folder=namespace.image_folder, task=namespace.task)
    failed = 0
    with (
        client_from_arguments(namespace) as client,
        output(namespace.out) as out,
        progress(len(samples), enabled=not namespace.no_progress) as advance,
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
    return item_errors_status("score", len(samples), failed, namespace.max_errors)


def run_align(namespace: argparse.Namespace) -> int:
    """Write the samples as kept to ``--out`` (LLaVA); samples that failed are left out
    (counted on stderr, and with their errors in ``--report`` when given). When a call
    fails or the run is interrupted, the samples aligned so far are written all the same
    (none: ``--out`` is left as it was), the report holds every result so far, and the
    first record not done is named (exit 1, or 130)."""
    check_writable(namespace.out, namespace.report)
    samples = read_llava(namespace.file, image_folder=namespace.image_folder, task=namespace.task)
    options = {**rewrite_options(namespace), "priority": namespace.priority}
    kept: list[Sample] = []
    done = 0
    stop: grpc.RpcError | KeyboardInterrupt | None = None
    report_to = output(namespace.report) if namespace.report else contextlib.nullcontext(None)
    with (
        client_from_arguments(namespace) as client,
        report_to as report,
        progress(len(samples), enabled=not namespace.no_progress) as advance,
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
        return item_errors_status("align", len(samples), failed, namespace.max_errors)
    if kept:
        write_llava(kept, namespace.out)
    why, status = why_stopped(stop)
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
    check_writable(namespace.out, namespace.report)
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
    options = {**client_options(namespace), "max_concurrency": namespace.concurrency}
    align_options = None
    if namespace.align:
        align_options = {**rewrite_options(namespace), "priority": namespace.priority}
    enabled = not namespace.no_progress
    return run_offline(
        namespace,
        client_options=options,
        align_options=align_options,
        progress=lambda what, total: progress(total, enabled=enabled, what=what),
        describe_error=describe_rpc_error,
    )


def _keep_fraction(text: str) -> float:
    """A share kept, in (0, 1]: refused by argparse naming the flag (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


if __name__ == "__main__":  # python -m align2.client.cli, as the align2 command
    sys.exit(main())
