"""The cost of ``curate --stream``'s decision journal (align2.client.stream_journal).

Journals N decisions shaped like the CLI's (a report line as ``CurateResult.to_dict()``
gives it, with file and record; one in ``--kept`` kept, its LLaVA record included), then
opens the journal again as a rerun does and takes every decision back. Prints the time per
journaled decision, the file's bytes per decision, the time to open it again, and the
memory the opened journal holds (RSS growth over the process before opening, one run).

    python bench/stream_journal.py --decisions 100000
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import resource
import sys
import tempfile
import time

from align2.client import Sample, Turn
from align2.client.stream_journal import DecisionJournal


def sample(i: int) -> Sample:
    question = f"What is the man on the left doing with the object number {i} in his hand?"
    answer = f"He is holding object {i} up to the light, looking at it closely. " * 3
    return Sample(f"{i:012d}", b"", (Turn(question, answer),), task="detail", image_file=f"{i}.jpg")


def report(i: int, kept: bool) -> dict[str, object]:
    return {
        "id": f"{i:012d}",
        "index": i,
        "decision": "kept" if kept else "dropped_question",
        "scores": {
            "question_score": 0.123456789 * i,
            "answer_scores": [1.23456789] if kept else [],
            "answer_score": 1.23456789 if kept else None,
            "question_truncated": False,
            "answer_truncated": [False] if kept else [],
            "answer_candidates": [],
        },
        "question_threshold": 0.5,
        "answer_threshold": 1.0 if kept else None,
        "question_window_size": 1000,
        "answer_window_size": 300 if kept else 0,
        "warm_up": False,
        "aligned": None,
        "error": None,
        "file": "/data/detail_23k.jsonl",
        "record": i,
    }


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--kept", type=float, default=0.09, help="share kept (paper: ~9%%)")
    args = parser.parse_args()
    options = {"question_keep": None, "answer_keep": None, "align": True}
    every = max(1, round(1 / args.kept))
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "kept.journal.jsonl"
        samples = [sample(i) for i in range(args.decisions)]
        journal = DecisionJournal(path, options)
        started = time.perf_counter()
        for i, s in enumerate(samples):
            kept = i % every == 0
            journal.add("/data/detail_23k.jsonl", i, s, report(i, kept), s if kept else None)
        added = time.perf_counter() - started
        journal.close(finished=False)
        size = path.stat().st_size
        gc.collect()
        before = rss_mib()
        started = time.perf_counter()
        again = DecisionJournal(path, options)
        opened = time.perf_counter() - started
        held = rss_mib() - before
        started = time.perf_counter()
        taken = sum(
            again.take("/data/detail_23k.jsonl", i, s) is not None for i, s in enumerate(samples)
        )
        took = time.perf_counter() - started
        again.close(finished=True)
    n = args.decisions
    print(f"decisions {n}, kept 1 in {every}; taken back {taken}")
    print(f"journal: {added / n * 1e6:.1f} us per decision (write, flush; fsync <= 1/s)")
    print(f"file: {size / n:.0f} bytes per decision ({size / 2**20:.1f} MiB)")
    print(f"open again: {opened:.2f} s; take all back: {took:.2f} s")
    print(f"memory held by the opened journal: {held:.0f} MiB ({held * 2**20 / size:.1f}x file)")
    return 0 if taken == n else 1


if __name__ == "__main__":
    sys.exit(main())
