"""Calibration for Curate: absolute thresholds (and seed scores) per task type, computed from
a scored sample with the method's exact selection, so that every stream and every replica
decides against the same numbers.

The cut is the offline one (:mod:`align2.client.selection`): per task type, stage 1 keeps
the first ``int(question_keep * N)`` records by question score, stage 2 the first
``int(answer_keep * N1)`` of those by mean answer score; a stage's threshold is the score
of its **last kept** record. A server deciding ``score >= threshold`` then keeps, on the
calibration sample itself, exactly what the offline selection keeps (plus records tied
with the last kept one). Thresholds are rounded down to the nearest float32 (the proto's
type), so that rounding never drops the last kept record. A task type whose cut keeps
nothing (``int(fraction * N) == 0``) gets no threshold: the server then uses its window
for it.

Seed scores are the same sample's scores: every question score of a task type, and the
mean answer scores of its question-kept records (stage 2's candidates), in input order.

From lists of scores (:func:`calibrate`), or from a scores file (:func:`calibrate_files`):
JSON list or JSONL of objects with ``question_score`` and ``answer_score`` (or the turns'
``answer_scores``), as ``align2 score`` writes them, plus ``task`` (or the task given for
the file); records with an ``error`` or no question score are skipped. The offline run's
``--report`` JSON (``align2 curate`` without ``--stream``) is read too: its thresholds,
without seeds.

Command line: ``python -m align2.client.calibration [TASK=]SCORES... --out cal.json``;
then ``align2 curate --stream --thresholds cal.json`` (or ``--seed-scores cal.json``), or
in Python ``client.curate(samples, **Calibration.load("cal.json").thresholds())``.

Pure Python (no grpc).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from align2.client.selection import DEFAULT_KEEP, conversation_score, top_fraction

FORMAT = "align2-calibration-v1"
CUT = "int(fraction * N) per task type; a threshold is the score of the last kept record"


@dataclass(frozen=True)
class TaskCounts:
    """What one task type's calibration rests on."""

    records: int
    question_kept: int
    answer_kept: int | None = None  # None: no answer scores were given


@dataclass(frozen=True)
class Calibration:
    """Thresholds and seed scores by task type, for :meth:`CurationClient.curate`."""

    question_keep: float = DEFAULT_KEEP
    answer_keep: float = DEFAULT_KEEP
    question_thresholds: dict[str, float] = field(default_factory=dict)
    answer_thresholds: dict[str, float] = field(default_factory=dict)
    question_seed_scores: dict[str, list[float]] = field(default_factory=dict)
    answer_seed_scores: dict[str, list[float]] = field(default_factory=dict)
    tasks: dict[str, TaskCounts] = field(default_factory=dict)

    def thresholds(self) -> dict[str, Any]:
        """Keyword arguments of ``curate()`` that decide against these thresholds."""
        return {
            "question_thresholds": dict(self.question_thresholds),
            "answer_thresholds": dict(self.answer_thresholds),
        }

    def seeds(self) -> dict[str, Any]:
        """Keyword arguments of ``curate()`` that seed the windows with these scores."""
        return {
            "question_seed_scores": {t: list(v) for t, v in self.question_seed_scores.items()},
            "answer_seed_scores": {t: list(v) for t, v in self.answer_seed_scores.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "cut": CUT,
            "question_keep": self.question_keep,
            "answer_keep": self.answer_keep,
            "tasks": {
                task: {k: v for k, v in vars(counts).items() if v is not None}
                for task, counts in sorted(self.tasks.items())
            },
            "question_thresholds": self.question_thresholds,
            "answer_thresholds": self.answer_thresholds,
            "question_seed_scores": self.question_seed_scores,
            "answer_seed_scores": self.answer_seed_scores,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"format: {data.get('format')!r} is not {FORMAT!r}")
        return cls(
            question_keep=float(data["question_keep"]),
            answer_keep=float(data["answer_keep"]),
            question_thresholds=_numbers(data.get("question_thresholds", {})),
            answer_thresholds=_numbers(data.get("answer_thresholds", {})),
            question_seed_scores=_lists(data.get("question_seed_scores", {})),
            answer_seed_scores=_lists(data.get("answer_seed_scores", {})),
            tasks={t: TaskCounts(**c) for t, c in data.get("tasks", {}).items()},
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """A calibration file as :meth:`save` writes it; ValueError naming the file when it
        is not one."""
        try:
            return cls.from_dict(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a calibration file ({error})") from None


def calibrate(
    question_scores: Mapping[str, Sequence[float]],
    answer_scores: Mapping[str, Sequence[float | None]] | None = None,
    question_keep: float = DEFAULT_KEEP,
    answer_keep: float = DEFAULT_KEEP,
) -> Calibration:
    """The calibration of scored records, by task type: ``question_scores[task][i]`` is
    record i's question score, ``answer_scores[task][i]`` its mean answer score (None, or
    the list cut short, where the record was not answer-scored; every question-kept record
    needs one, else ValueError naming it). Without ``answer_scores`` only question
    thresholds are computed."""
    result = Calibration(question_keep, answer_keep)
    for task, scores in question_scores.items():
        kept = top_fraction(scores, question_keep)
        result.question_seed_scores[task] = [float(s) for s in scores]
        if kept:
            result.question_thresholds[task] = float32_at_most(scores[kept[-1]])
        answer_kept = None
        if answer_scores is not None and task in answer_scores:
            candidates = sorted(kept)  # stage 2's candidates, in input order
            means = _candidate_answers(task, candidates, answer_scores[task])
            result.answer_seed_scores[task] = means
            cut = top_fraction(means, answer_keep)
            if cut:
                result.answer_thresholds[task] = float32_at_most(means[cut[-1]])
            answer_kept = len(cut)
        result.tasks[task] = TaskCounts(len(scores), len(kept), answer_kept)
    return result


def _candidate_answers(
    task: str, candidates: Sequence[int], answers: Sequence[float | None]
) -> list[float]:
    means = []
    for index in candidates:
        value = answers[index] if index < len(answers) else None
        if value is None:
            raise ValueError(
                f"answer_scores[{task!r}][{index}]: missing for a record the question stage keeps"
            )
        means.append(float(value))
    return means


def calibrate_files(
    paths: Iterable[str | os.PathLike[str]],
    task: str | None = None,
    question_keep: float = DEFAULT_KEEP,
    answer_keep: float = DEFAULT_KEEP,
    tasks: Mapping[str, str] | None = None,
) -> Calibration:
    """The calibration of scores files (see the module docstring). A record's task: its own
    ``task`` key, else ``tasks[str(path)]``, else ``task``; none: ValueError naming the
    line. A task none of whose records has an answer score gets question thresholds only.
    An offline ``--report`` JSON gives its thresholds (its fractions, not these)."""
    questions: dict[str, list[float]] = {}
    answers: dict[str, list[float | None]] = {}
    paths = list(paths)
    for path in paths:
        data = _read(path)
        if isinstance(data, dict):
            if len(paths) > 1:
                raise ValueError(f"{path}: an offline report is read alone, not with other files")
            return _from_report(data)
        default = (tasks or {}).get(str(path), task)
        for line, record in enumerate(data, 1):
            scored = _scored(record, default, f"{path}:{line}")
            if scored is not None:
                name, question, answer = scored
                questions.setdefault(name, []).append(question)
                answers.setdefault(name, []).append(answer)
    answered = {t: a for t, a in answers.items() if any(v is not None for v in a)}
    return calibrate(questions, answered, question_keep, answer_keep)


def _read(path: str | os.PathLike[str]) -> list[Any] | dict[str, Any]:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and "procedure" in data and "tasks" in data:
        return data
    records = []
    for line, content in enumerate(text.splitlines(), 1):
        if content.strip():
            try:
                records.append(json.loads(content))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line}: not JSON ({error.msg})") from None
    return records


def _scored(record: Any, default: str | None, where: str) -> tuple[str, float, float | None] | None:
    """(task, question score, mean answer score) of one record; None when it has no score."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object")
    if record.get("error") or record.get("question_score") is None:
        return None
    task = record.get("task", default)
    if not isinstance(task, str):
        raise ValueError(f"{where}: no task (give the file as TASK=FILE, or --task)")
    answer = record.get("answer_score")
    if answer is None and record.get("answer_scores"):
        answer = conversation_score([float(s) for s in record["answer_scores"]])
    return task, float(record["question_score"]), None if answer is None else float(answer)


def _from_report(report: Mapping[str, Any]) -> Calibration:
    procedure = report["procedure"]
    result = Calibration(float(procedure["question_keep"]), float(procedure["answer_keep"]))
    for task, entry in report["tasks"].items():
        for head, thresholds in (
            ("question", result.question_thresholds),
            ("answer", result.answer_thresholds),
        ):
            value = entry[head]["scores"]["threshold"]
            if value is not None:
                thresholds[task] = float32_at_most(float(value))
        answer_kept = entry["answer"]["kept"] if entry["answer"]["candidates"] else None
        result.tasks[task] = TaskCounts(entry["records"], entry["question"]["kept"], answer_kept)
    return result


def float32_at_most(value: float) -> float:
    """The largest float32 that is <= ``value`` (the proto's thresholds are float32)."""
    if not math.isfinite(value):
        raise ValueError(f"score {value} is not finite")
    rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    if rounded <= value:
        return rounded
    bits: int = struct.unpack("<I", struct.pack("<f", rounded))[0]
    if rounded > 0:
        bits -= 1  # one float32 step towards zero
    elif rounded == 0:
        bits = 0x80000001  # the negative float32 closest to zero
    else:
        bits += 1  # one float32 step away from zero (more negative)
    lower: float = struct.unpack("<f", struct.pack("<I", bits))[0]
    return lower


def _numbers(data: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in data.items()}


def _lists(data: Mapping[str, Any]) -> dict[str, list[float]]:
    return {str(k): [float(s) for s in v] for k, v in data.items()}


def _file_argument(text: str) -> tuple[str | None, str]:
    """``TASK=FILE`` -> (TASK, FILE); a plain FILE -> (None, FILE)."""
    task, equals, path = text.partition("=")
    if equals and task and os.sep not in task:
        return task, path
    return None, text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m align2.client.calibration",
        description="Curate thresholds and seed scores per task type from scored records, "
        "with the method's exact cut (see align2.client.calibration).",
    )
    parser.add_argument(
        "files",
        nargs="+",
        metavar="[TASK=]SCORES",
        help="JSON/JSONL of scored records (align2 score's output), or an offline report",
    )
    parser.add_argument("--task", default=None, help="task of records without their own")
    parser.add_argument("--question-keep", type=float, default=DEFAULT_KEEP)
    parser.add_argument("--answer-keep", type=float, default=DEFAULT_KEEP)
    parser.add_argument("--out", required=True, help="the calibration JSON to write")
    args = parser.parse_args(argv)
    pairs = [_file_argument(text) for text in args.files]
    tasks = {path: task for task, path in pairs if task is not None}
    try:
        calibration = calibrate_files(
            [path for _, path in pairs], args.task, args.question_keep, args.answer_keep, tasks
        )
        calibration.save(args.out)
    except (OSError, ValueError, KeyError) as error:
        print(f"calibration: {error}", file=sys.stderr)
        return 2
    for task, counts in sorted(calibration.tasks.items()):
        print(
            f"{task}: {counts.records} records, {counts.question_kept} question-kept "
            f"(threshold {calibration.question_thresholds.get(task)}), "
            f"{counts.answer_kept} answer-kept "
            f"(threshold {calibration.answer_thresholds.get(task)})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
