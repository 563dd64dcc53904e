"""What an offline curation run reports: counts per stage and task type, the score
distributions with their thresholds, which candidate answers won (as a dict for JSON, as
text), and histograms as a PNG.

The PNG needs Pillow, an optional dependency of the client (``pip install pillow``): it is
imported only when a plot is asked for.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from align2.client.offline import Outcome, Stage
from align2.client.records import Invalid, Record
from align2.client.scorestore import HEAD_ANSWER, HEAD_QUESTION
from align2.client.selection import describe, merge_order

REFERENCE = (
    "DCDmllm/Align2LLaVA reward_model/post_process/rank_questions.py, rank_answers.py, "
    "merge_final.py"
)
TIES = (
    "stable: equal question scores keep their input order (files in the order given, then "
    "records); equal answer scores keep the order of the question stage's ranking"
)
BEST_CANDIDATE = (
    "per turn with candidate answers (a list-valued gpt): the highest answer score, and "
    "among equal highest the first candidate (rank_answers.py's stable sort); the "
    "conversation's answer score is the mean of its turns' best, and the output keeps the "
    "best as the turn's answer"
)
STAGES = ((HEAD_QUESTION, "question score"), (HEAD_ANSWER, "mean answer score"))


def build_report(
    outcome: Outcome, question_keep: float, answer_keep: float, one_task: bool
) -> dict[str, Any]:
    """The run's report as JSON-ready data."""
    inputs = outcome.inputs
    tasks = {}
    for task in merge_order(inputs.tasks):
        entry: dict[str, Any] = {"records": len(inputs.tasks[task])}
        for head, stage in ((HEAD_QUESTION, outcome.question), (HEAD_ANSWER, outcome.answer)):
            entry[head] = _stage_report(stage.get(task, Stage()))
        entry["answer_candidates"] = _candidates_report(
            inputs.tasks[task], outcome.answer.get(task, Stage())
        )
        entry["duplicate_ids"] = _duplicates([r.sample.id for r in inputs.tasks[task]])
        tasks[task] = entry
    return {
        "procedure": {
            "reference": REFERENCE,
            "question_keep": question_keep,
            "answer_keep": answer_keep,
            "cut": "int(fraction * candidates) per task type",
            "ties": TIES,
            "best_candidate": BEST_CANDIDATE,
            "merge": "task types in name order, each best first",
            "one_task": one_task,
        },
        "models": {
            head: {
                "revision": s.revision,
                "settings": s.settings,
                "template_version": s.template_version,
            }
            for head, s in outcome.scorers.items()
        },
        "files": dict(inputs.files),
        "tasks": tasks,
        "total": {
            "records": sum(inputs.files.values()),
            "invalid": len(inputs.invalid),
            "question_kept": sum(len(s.kept) for s in outcome.question.values()),
            "kept": len(outcome.kept),
        },
        "scoring": {
            head: {"sent": outcome.sent.get(head, 0), "stored": outcome.cached.get(head, 0)}
            for head in (HEAD_QUESTION, HEAD_ANSWER)
        },
        "invalid": [i.to_dict() for i in inputs.invalid],
    }


def _stage_report(stage: Stage) -> dict[str, Any]:
    return {
        "candidates": len(stage.candidates),
        "kept": len(stage.kept),
        "scores": describe(stage.scores, stage.kept_scores).to_dict(),
    }


def _candidates_report(records: list[Record], stage: Stage) -> dict[str, Any]:
    """How often each candidate answer position was the best, over the turns with
    candidates of the conversations the answer head scored (``wins``, ``turns``) and of
    those kept (``kept_wins``, ``kept_turns``); ``wins[j]``: turns whose best is candidate j,
    for every position j a turn had."""
    wins: Counter[int] = Counter()
    kept_wins: Counter[int] = Counter()
    kept = set(stage.kept)
    most = 0  # the most candidates of a turn: the positions reported
    for index, best in stage.best.items():
        for turn, winner in zip(records[index].sample.turns, best, strict=True):
            if turn.candidates:
                wins[winner] += 1
                kept_wins[winner] += index in kept
                most = max(most, len(turn.candidates))
    positions = range(most)
    return {
        "turns": wins.total(),
        "wins": [wins[j] for j in positions],
        "kept_turns": kept_wins.total(),
        "kept_wins": [kept_wins[j] for j in positions],
    }


def _duplicates(ids: list[str]) -> int:
    """Records whose id an earlier record of the same task type has."""
    return len(ids) - len(set(ids))


def report_text(report: dict[str, Any]) -> str:
    """A few lines for a terminal: counts per task type and stage, score summaries."""
    procedure, total = report["procedure"], report["total"]
    lines = [
        f"{len(report['files'])} files, {total['records']} records, {total['invalid']} "
        f"invalid; kept {total['kept']} (per task type: top {procedure['question_keep']:g} "
        f"by question score, then top {procedure['answer_keep']:g} by mean answer score)",
        f"  {'task':<20} {'records':>8} {'question kept':>16} {'answer kept':>14}",
    ]
    for task, entry in report["tasks"].items():
        question, answer = entry[HEAD_QUESTION], entry[HEAD_ANSWER]
        lines.append(
            f"  {task:<20} {entry['records']:>8} "
            f"{_of(question):>16} {_of(answer):>14}"
            + (f"  ({entry['duplicate_ids']} duplicate ids)" if entry["duplicate_ids"] else "")
        )
    for head, title in STAGES:
        header = "".join(f"{k:>10}" for k in ("min", "q1", "median", "q3", "max", "threshold"))
        lines.append(f"  {title + 's':<20} {header}")
        for task, entry in report["tasks"].items():
            scores = entry[head]["scores"]
            values = "".join(
                f"{_number(scores[k]):>10}" for k in ("min", "q1", "median", "q3", "max")
            )
            lines.append(f"  {task:<20} {values}{_number(scores['threshold']):>10}")
    lines.extend(_candidates_text(report["tasks"]))
    scoring = report["scoring"]
    lines.append(
        "  scored now: "
        + ", ".join(f"{head} head {scoring[head]['sent']}" for head in scoring)
        + "; taken from the scores file: "
        + ", ".join(f"{head} head {scoring[head]['stored']}" for head in scoring)
    )
    lines.extend(f"  skipped: {Invalid(**i)}" for i in report["invalid"][:10])
    if len(report["invalid"]) > 10:
        lines.append(f"  ... and {len(report['invalid']) - 10} more skipped (see the report)")
    return "\n".join(lines)


def _candidates_text(tasks: dict[str, Any]) -> list[str]:
    """Wins per candidate position, for the task types that had candidate answers."""
    with_candidates = {t: e["answer_candidates"] for t, e in tasks.items()}
    with_candidates = {t: c for t, c in with_candidates.items() if c["turns"]}
    if not with_candidates:
        return []
    lines = ["  best candidate answer (turns it won, by position #0, #1, ...; of the kept)"]
    for task, c in with_candidates.items():
        wins = ", ".join(map(str, c["wins"]))
        kept = ", ".join(map(str, c["kept_wins"]))
        lines.append(f"  {task:<20} {c['turns']} turns: {wins} (kept {c['kept_turns']}: {kept})")
    return lines


def _of(stage: dict[str, Any]) -> str:
    return f"{stage['kept']} of {stage['candidates']}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


# ---------------------------------------------------------------------------------------
# Histograms

_PANEL = (420, 220)  # width, height of one histogram
_MARGIN = 28
_BINS = 30
_KEPT, _DROPPED, _LINE, _INK = (46, 139, 87), (170, 170, 170), (200, 30, 30), (20, 20, 20)


def require_pillow() -> Any:
    """Pillow's Image, ImageDraw and ImageFont modules; ImportError saying how to get them."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError(
            "--plot draws with Pillow, which the align2 client does not install: pip install pillow"
        ) from None
    return Image, ImageDraw, ImageFont


def plot_histograms(outcome: Outcome, path: str | os.PathLike[str]) -> None:
    """A PNG with one histogram per task type (rows) and stage (columns): kept scores in
    green, dropped in grey, the threshold (lowest kept score) as a red line."""
    image_module, draw_module, font_module = require_pillow()
    tasks = merge_order(outcome.inputs.tasks) or [""]
    width, height = _PANEL
    canvas = image_module.new("RGB", (width * 2, height * len(tasks)), "white")
    draw = draw_module.Draw(canvas)
    font = font_module.load_default()
    for row, task in enumerate(tasks):
        for column, (stages, title) in enumerate(
            ((outcome.question, "question score"), (outcome.answer, "mean answer score"))
        ):
            stage = stages.get(task, Stage())
            origin = (column * width, row * height)
            _panel(draw, font, origin, stage, f"{task}: {title}")
    canvas.save(path, format="PNG")


def _panel(draw: Any, font: Any, origin: tuple[int, int], stage: Stage, title: str) -> None:
    left, top = origin[0] + _MARGIN, origin[1] + _MARGIN
    right, bottom = origin[0] + _PANEL[0] - _MARGIN // 2, origin[1] + _PANEL[1] - _MARGIN
    summary = describe(stage.scores, stage.kept_scores)
    draw.text((left, origin[1] + 6), f"{title} (kept {len(stage.kept)} of {summary.count})",
              fill=_INK, font=font)  # fmt: skip
    draw.line([(left, bottom), (right, bottom)], fill=_INK)
    if summary.minimum is None or summary.maximum is None:
        draw.text((left + 10, top + 40), "no scores", fill=_INK, font=font)
        return
    low, high = summary.minimum, summary.maximum
    if high == low:
        low, high = low - 0.5, high + 0.5
    kept = [0] * _BINS
    dropped = [0] * _BINS
    kept_set = set(stage.kept)
    for index, score in zip(stage.candidates, stage.scores, strict=True):
        bin_ = min(int((score - low) / (high - low) * _BINS), _BINS - 1)
        (kept if index in kept_set else dropped)[bin_] += 1
    tallest = max(k + d for k, d in zip(kept, dropped, strict=True))
    step = (right - left) / _BINS
    for b in range(_BINS):
        x0, x1 = left + b * step, left + (b + 1) * step - 1
        h_dropped = (bottom - top) * dropped[b] / tallest
        h_kept = (bottom - top) * kept[b] / tallest
        if dropped[b]:
            draw.rectangle([x0, bottom - h_dropped, x1, bottom], fill=_DROPPED)
        if kept[b]:
            draw.rectangle([x0, bottom - h_dropped - h_kept, x1, bottom - h_dropped], fill=_KEPT)
    draw.text((left, bottom + 4), f"{low:.3g}", fill=_INK, font=font)
    draw.text((right - 40, bottom + 4), f"{high:.3g}", fill=_INK, font=font)
    draw.text((origin[0] + 4, top), str(tallest), fill=_INK, font=font)
    if summary.threshold is not None:
        x = left + (summary.threshold - low) / (high - low) * (right - left)
        draw.line([(x, top), (x, bottom)], fill=_LINE, width=2)
        label = f"threshold {summary.threshold:.3g}"
        # Right of the line, or left of it when the line is in the right half.
        if x > (left + right) / 2:
            x -= draw.textlength(label, font=font) + 6
        draw.text((x + 3, top), label, fill=_LINE, font=font)
