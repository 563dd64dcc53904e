"""A direct transcription of the reference selection, to test ours against:
DCDmllm/Align2LLaVA reward_model/post_process/rank_questions.py, rank_answers.py and
merge_final.py (one process, so the score files are in input order), and the order in which
reward_model/llava/data/eval_data.py's AnswerEvalDataset emits the answers it scores (per
turn, a ``gpt`` value that is a list: one line per candidate, in order). ``repeat_times``
is rank_answers.py's ``--repeat-times``: every turn has that many candidates."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

TASKS = ["complex_reasoning", "conversation", "detail"]


def reference_rank_questions(
    score_lines: list[dict[str, Any]], anns: list[dict[str, Any]], keep_ratio: float
) -> list[dict[str, Any]]:
    scores = [dict(line) for line in score_lines]
    scores.sort(key=lambda x: x["score"], reverse=True)
    keep_images = {
        example["image"]: example["score"] for example in scores[: int(keep_ratio * len(scores))]
    }
    anns_dict = {}
    for example in anns:
        if example["image"] not in anns_dict:
            anns_dict[example["image"]] = example
    keep_anns = []
    for image, score in keep_images.items():
        keep_anns.append(deepcopy(anns_dict[image]))
        keep_anns[-1]["score"] = score
    return keep_anns


def reference_rank_answers(
    score_lines: list[dict[str, Any]],
    anns: list[dict[str, Any]],
    keep_ratio: float,
    repeat_times: int = 1,
) -> list[dict[str, Any]]:
    scores = score_lines
    conv_dict = {ann["image"]: ann["conversations"] for ann in anns}
    keep_anns = []
    start = 0
    while start < len(scores):
        image = scores[start]["image"]
        conv = conv_dict[image]
        best_example = {
            "id": image.replace(".jpg", ""),
            "image": image,
            "conversations": deepcopy(conv),
            "score": 0.0,
        }
        turn_num = len(conv) // 2
        for i in range(turn_num):
            turn_scores = []
            for j in range(repeat_times):
                scored_qa = scores[start + i * repeat_times + j]
                assert scored_qa["image"] == image
                assert scored_qa["question"] == conv[i * 2]["value"]
                turn_scores.append(scored_qa)
            turn_scores.sort(key=lambda x: x["score"], reverse=True)
            best_example["conversations"][i * 2 + 1]["value"] = turn_scores[0]["answer"]
            best_example["score"] += turn_scores[0]["score"]
        best_example["score"] /= turn_num
        keep_anns.append(best_example)
        start += turn_num * repeat_times
    keep_anns.sort(key=lambda x: x["score"], reverse=True)
    return keep_anns[: int(len(keep_anns) * keep_ratio)]


def reference_merge(stage_2: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged = []
    for task in TASKS:
        merged += stage_2.get(task, [])  # (here: a task type not curated has none)
    for example in merged:
        example.pop("score", None)
    return merged


def reference_curate(
    data: dict[str, dict[str, Any]], a: float, b: float, repeat_times: int = 1
) -> list[str]:
    """The ids the reference keeps. ``data``: per task type, ``records`` (LLaVA records with
    unique images, in input order), ``question`` (their question scores) and ``answers``
    (their turn scores: per turn a score, or with candidates a list, one per candidate)."""
    return [example["id"] for example in reference_curate_examples(data, a, b, repeat_times)]


def reference_curate_examples(
    data: dict[str, dict[str, Any]], a: float, b: float, repeat_times: int = 1
) -> list[dict[str, Any]]:
    """The examples the reference writes: ``id`` (the image name without ``.jpg``),
    ``image`` and ``conversations`` with each turn's best candidate as its ``gpt`` value."""
    stage_2 = {}
    for task, d in data.items():
        lines = [
            {"image": r["image"], "score": s}
            for r, s in zip(d["records"], d["question"], strict=True)
        ]
        stage_1 = reference_rank_questions(lines, d["records"], a)
        by_image = {r["image"]: (r, s) for r, s in zip(d["records"], d["answers"], strict=True)}
        answer_lines = []  # the answer scorer walks stage 1's output in order, turn by turn
        for ann in stage_1:
            record, turn_scores = by_image[ann["image"]]
            for t, score in enumerate(turn_scores):
                answers = record["conversations"][2 * t + 1]["value"]
                if not isinstance(answers, list):  # as AnswerEvalDataset reads a gpt value
                    answers, score = [answers], [score]
                for answer, candidate_score in zip(answers, score, strict=True):
                    answer_lines.append(
                        {
                            "image": ann["image"],
                            "score": candidate_score,
                            "question": record["conversations"][2 * t]["value"],
                            "answer": answer,
                        }
                    )
        stage_2[task] = reference_rank_answers(answer_lines, stage_1, b, repeat_times)
    return reference_merge(stage_2)
