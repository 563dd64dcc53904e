"""``align2 curate FILE...`` without ``--stream``: the method's exact selection on finite
files (:mod:`align2.client.offline`), then optionally Align of the kept, the output, the
report and the plot. Called by :mod:`align2.client.cli`, which parses the arguments.

Exit status: 0 done; 1 the run stopped (an RPC failed, the server was busy or stopping, a
model changed, Ctrl-C: 130), with every score so far saved so that the same command
resumes; 2 bad usage or input (unknown task types, invalid records); 3 done, but more
records failed (left out with ``--skip-invalid``, or their Align failed) than
``--max-errors`` allows, by default all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc

from align2.client.aio import AsyncCurationClient
from align2.client.calls import without_place
from align2.client.cli_common import EXIT_INTERRUPTED, item_errors_status
from align2.client.llava import write_llava
from align2.client.offline import (
    OfflineCuration,
    OfflineSettings,
    Outcome,
    Progress,
    RunStopped,
    align_kept,
)
from align2.client.offline_report import (
    build_report,
    plot_histograms,
    report_text,
    require_pillow,
)
from align2.client.records import InvalidRecords, UnknownTask, load_inputs
from align2.client.results import AlignResult, ProtocolError
from align2.client.scorestore import ScoreStore
from align2.client.selection import DEFAULT_KEEP
from align2.client.types import Sample

SCORES_SUFFIX = ".scores.jsonl"


def run_offline(
    namespace: argparse.Namespace,
    *,
    client_options: dict[str, Any],
    align_options: dict[str, Any] | None,
    progress: Progress,
    describe_error: Any,
) -> int:
    """Run the command; ``client_options`` for :class:`AsyncCurationClient`, ``align_options``
    for its ``align`` (None: no Align), ``describe_error`` turns a grpc.RpcError into text."""
    settings = OfflineSettings(
        question_keep=_or_default(namespace.question_keep),
        answer_keep=_or_default(namespace.answer_keep),
        skip_invalid=namespace.skip_invalid,
        concurrency=namespace.concurrency,
        priority=namespace.priority,
        question_model=namespace.question_model,
        answer_model=namespace.answer_model,
    )
    if namespace.plot:
        try:
            require_pillow()  # before hours of scoring, not after
        except ImportError as error:
            _say(str(error))
            return 2
    try:
        inputs = load_inputs(
            namespace.file,
            image_folder=namespace.image_folder,
            task=namespace.task,
            one_task=namespace.one_task,
            skip_invalid=namespace.skip_invalid,
        )
    except InvalidRecords as error:
        _say(f"{error}; fix them, or pass --skip-invalid to leave them out (listed in the report)")
        return 2
    except UnknownTask as error:
        _say(str(error))
        return 2
    scores_path = namespace.scores or namespace.out + SCORES_SUFFIX
    resume = f"every score so far is in {scores_path}: the same command resumes"
    with ScoreStore(scores_path) as store:
        if store.ignored_lines:
            _say(f"{scores_path}: {store.ignored_lines} unreadable lines ignored (rescored)")
        run = _run(namespace.target, client_options, store, settings, inputs, align_options,
                   progress)  # fmt: skip
        try:
            outcome, aligned = asyncio.run(run)
        except KeyboardInterrupt:
            _say(f"interrupted; {resume}")
            return EXIT_INTERRUPTED
        except InvalidRecords as error:
            _say(f"{error}; fix them, or pass --skip-invalid to leave them out; {resume}")
            return 2
        except (RunStopped, ProtocolError) as error:
            _say(f"stopped: {error}; {resume}")
            return 1
        except grpc.RpcError as error:
            _say(f"{describe_error(error)}; {resume}")
            return 1
    samples = [record.sample for record in outcome.kept]
    report = build_report(outcome, settings.question_keep, settings.answer_keep, namespace.one_task)
    if aligned is not None:
        samples, report["align"] = _aligned_samples(samples, aligned)
    write_llava(samples, namespace.out)
    report.update(output=namespace.out, scores_file=scores_path)
    _say(report_text(report))
    if namespace.report:
        with open(namespace.report, "w", encoding="utf-8") as out:
            json.dump(report, out, ensure_ascii=False, indent=2)
            out.write("\n")
    if namespace.plot:
        plot_histograms(outcome, namespace.plot)
    # per-item errors: the records left out as invalid, and the kept whose Align failed
    failed = report["total"]["invalid"] + len(report.get("align", {}).get("failed", ()))
    return item_errors_status("curate", report["total"]["records"], failed, namespace.max_errors)


async def _run(
    target: str,
    client_options: dict[str, Any],
    store: ScoreStore,
    settings: OfflineSettings,
    inputs: Any,
    align_options: dict[str, Any] | None,
    progress: Progress,
) -> tuple[Outcome, list[AlignResult] | None]:
    async with AsyncCurationClient(target, **client_options) as client:
        outcome = await OfflineCuration(client, store, settings, progress).run(inputs)
        if align_options is None:
            return outcome, None
        samples = [record.sample for record in outcome.kept]
        aligned = await align_kept(
            client, samples, align_options, concurrency=settings.concurrency, progress=progress
        )
        return outcome, aligned


def _aligned_samples(
    samples: list[Sample], aligned: list[AlignResult]
) -> tuple[list[Sample], dict[str, Any]]:
    """The kept samples as restyled; one whose Align failed stays kept as it was (as
    Curate does), and is listed."""
    out = [
        result.sample if result.sample is not None else sample
        for sample, result in zip(samples, aligned, strict=True)
    ]
    failed = [r for r in aligned if r.error is not None]
    rewrites = sum(t.kept == "rewrite" for r in aligned for t in r.turns)
    report = {
        "samples": len(aligned),
        "failed": [_failure(r) for r in failed],
        "turns_rewritten": rewrites,
    }
    return out, report


def _failure(result: AlignResult) -> dict[str, Any]:
    error = result.to_dict()["error"]
    return {"id": result.id, **error, "message": without_place(error["message"])}


def _or_default(fraction: float | None) -> float:
    return DEFAULT_KEEP if fraction is None else fraction


def _say(text: str) -> None:
    print(f"align2 curate: {text}", file=sys.stderr)
