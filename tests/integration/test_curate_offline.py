"""``align2 curate FILE...`` (the exact selection) end to end: a real server on 127.0.0.1:0
(tiny LLaVA reward models, a tiny random Llama as the inner LLM) and three LLaVA files.

The kept ids are checked against the reference's selection (tests/reference_selection.py)
applied to the scores the server returns to direct Score calls. The server batches one
item at a time, so a sample's score does not depend on its batch-mates (which padding
changes at the 1e-6 level) and scores are comparable across calls bit for bit.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from reference_selection import reference_curate, reference_curate_examples
from support import ServerThread, full_config, png

from align2.client import CurationClient, read_llava
from align2.client.cli import main as cli_main

TASKS = ("complex_reasoning", "conversation", "detail")
PER_TASK = 20  # int(0.3 * 20) = 6 survive the question stage, int(0.3 * 6) = 1 the answer


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path, tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = full_config(tiny_llava, tiny_llm, max_new_tokens=4)
    config.limits.max_image_bytes = 200_000
    config.batching.max_batch_size = 1
    server = ServerThread(config).start()
    yield server
    server.stop()


def write_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """One file per task type, named after it; records 3 and 4 of each are the same
    conversation about the same image under two ids (a tie in both stages)."""
    paths = {}
    for t, task in enumerate(TASKS):
        records = []
        for i in range(PER_TASK):
            n = 3 if i == 4 else i
            image = f"{task}-{n}.png"
            (folder / image).write_bytes(png(16 + n, 20 + t, (n * 12 % 255, 40 * t, 90)))
            turns = 1 if task != "conversation" else 1 + n % 3
            conversations = []
            for k in range(turns):
                question = f"What is thing {n} number {k}?"
                conversations += [
                    {"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                    {"from": "gpt", "value": f"It is {'a big ' * (n % 4)}thing {n + k}."},
                ]
            records.append({"id": f"{task[:4]}{i}", "image": image, "conversations": conversations})
        paths[task] = folder / f"{task}_test.json"
        paths[task].write_text(json.dumps(records))
    return paths


def reference_ids(
    client: CurationClient, paths: dict[str, pathlib.Path], folder: pathlib.Path
) -> list[str]:
    """The reference's selection on the scores of direct Score calls."""
    data: dict[str, dict[str, Any]] = {}
    for task, path in paths.items():
        samples = read_llava(path, image_folder=folder)
        question = client.score(samples, heads=["question"])
        answers = client.score(samples, heads=["answer"])
        records = json.loads(path.read_text())
        data[task] = {
            # The reference keys records by image: make each record's image its own.
            "records": [{**r, "image": f"{task}/{n}.jpg"} for n, r in enumerate(records)],
            "question": [r.question_score for r in question],
            "answers": [list(r.answer_scores) for r in answers],
        }
    kept = []
    for name in reference_curate(data, 0.3, 0.3):
        task, n = name.split("/")
        kept.append(data[task]["records"][int(n)]["id"])
    return kept


def curate(server: ServerThread, *args: Any) -> int:
    return cli_main(["curate", *map(str, args), "--target", server.target, "--no-progress"])


def computed_items() -> float:
    """Forward passes of the reward models so far (every server of this process)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "align2_batch_size"
        for sample in metric.samples
        if sample.name == "align2_batch_size_sum"
    )


def test_the_kept_ids_are_the_reference_selection_of_the_server_scores(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    paths = write_files(tmp_path)
    out, report, plot = tmp_path / "kept.json", tmp_path / "report.json", tmp_path / "s.png"
    files = [paths["detail"], paths["complex_reasoning"], paths["conversation"]]
    args = [*files, "--image-folder", tmp_path, "--out", out, "--report", report]
    assert curate(server, *args, "--plot", plot) == 0
    kept = [r["id"] for r in json.loads(out.read_text())]
    with CurationClient(server.target, timeout=120) as client:
        assert kept == reference_ids(client, paths, tmp_path)
    assert len(kept) == 3
    summary = json.loads(report.read_text())
    assert summary["total"] == {"records": 60, "invalid": 0, "question_kept": 18, "kept": 3}
    for task in TASKS:
        assert summary["tasks"][task]["question"]["candidates"] == PER_TASK
        assert summary["tasks"][task]["answer"]["candidates"] == 6
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_candidate_answers_are_chosen_and_ranked_as_the_reference_on_the_server_scores(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    """Best-of-n files (a gpt value lists 3 candidates; rank_answers.py --repeat-times 3):
    the output is the reference's on the scores of direct Score calls, each turn's answer
    its best candidate."""
    records = []
    for i in range(10):
        image = f"cand-{i}.png"
        (tmp_path / image).write_bytes(png(18 + i, 22, (i * 25 % 255, 120, 60)))
        conversations = []
        for k in range(1 + i % 2):
            question = f"What is thing {i} number {k}?"
            candidates = [f"It is {'a big ' * ((i + j + k) % 4)}thing {j}." for j in range(3)]
            conversations += [
                {"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                {"from": "gpt", "value": candidates},
            ]
        records.append({"id": f"cand{i}", "image": image, "conversations": conversations})
    path = tmp_path / "conversation_cands.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "kept.json"
    args = [path, "--image-folder", tmp_path, "--out", out]
    assert curate(server, *args, "--question-keep", "0.5", "--answer-keep", "0.5") == 0
    written = json.loads(out.read_text())

    samples = read_llava(path, image_folder=tmp_path)
    with CurationClient(server.target, timeout=120) as client:
        question = client.score(samples, heads=["question"])
        answers = client.score(samples, heads=["answer"])
    data = {
        "conversation": {
            "records": [{**r, "image": f"conversation/{n}.jpg"} for n, r in enumerate(records)],
            "question": [r.question_score for r in question],
            "answers": [[list(c.scores) for c in r.answer_candidates] for r in answers],
        }
    }
    expected = []
    for example in reference_curate_examples(data, 0.5, 0.5, repeat_times=3):
        n = int(example["id"].split("/")[1])
        expected.append({**records[n], "conversations": example["conversations"]})
    assert written == expected and len(written) == 2


def test_a_rerun_from_a_partial_scores_file_computes_only_the_rest(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    paths = write_files(tmp_path)
    files = [paths[task] for task in TASKS]
    common = [*files, "--image-folder", tmp_path, "--chunk-size", "8"]
    whole = tmp_path / "whole.json"
    before = computed_items()
    assert curate(server, *common, "--out", whole) == 0
    turns = sum(
        len(r["conversations"]) // 2 for p in files for r in json.loads(p.read_text())
    )  # an upper bound of the answer items: survivors only are scored
    whole_items = computed_items() - before
    assert 60 < whole_items < 60 + turns
    # As a crash would leave it: the first 20 scores, then half a line.
    lines = pathlib.Path(f"{whole}.scores.jsonl").read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.scores.jsonl"
    partial.write_text("".join(lines[:20]) + lines[20][: len(lines[20]) // 2])

    out, report = tmp_path / "resumed.json", tmp_path / "r.json"
    before = computed_items()
    assert curate(server, *common, "--out", out, "--scores", partial, "--report", report) == 0
    assert computed_items() - before == whole_items - 20  # the 20 stored are not recomputed
    assert out.read_text() == whole.read_text()
    scoring = json.loads(report.read_text())["scoring"]
    assert scoring["question"] == {"sent": 40, "stored": 20}
    # The half line was cut before appending: every line is whole.
    entries = [json.loads(line) for line in partial.read_text().splitlines()]
    assert sum(e["head"] == "question" for e in entries) == 60


def test_align_restyles_the_kept_after_the_selection(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    paths = write_files(tmp_path)
    files = [paths[task] for task in TASKS]
    common = [*files, "--image-folder", tmp_path, "--scores", tmp_path / "scores.jsonl"]
    assert curate(server, *common, "--out", tmp_path / "plain.json") == 0
    report = tmp_path / "r.json"
    args = ["--out", tmp_path / "aligned.json", "--report", report]
    assert curate(server, *common, *args, "--align", "--max-new-tokens", "4") == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    aligned = json.loads((tmp_path / "aligned.json").read_text())
    assert [r["id"] for r in aligned] == [r["id"] for r in plain]
    summary = json.loads(report.read_text())
    assert summary["align"]["samples"] == 3 and summary["align"]["failed"] == []
    assert summary["scoring"]["question"]["sent"] == 0  # the scores of the first run


def test_a_merged_file_needs_a_task_type(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_files(tmp_path)
    merged = tmp_path / "llava_instruct_158k.json"
    merged.write_text(json.dumps([r for p in paths.values() for r in json.loads(p.read_text())]))
    args = [merged, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(server, *args) == 2
    assert "60 of 60 records have no task type" in capsys.readouterr().err
    assert curate(server, *args, "--one-task") == 0
    assert len(json.loads((tmp_path / "k.json").read_text())) == 5  # int(.3 * int(.3 * 60))
