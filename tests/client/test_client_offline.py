"""``align2 curate FILE...`` (exact selection) against the fake server: what it keeps, task
types, invalid records, resume after an interruption, the report and the plot.

The fake scores a question by its sample id (digits; other ids score 0.0) and an answer
turn by its length, so the test knows every score."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest
from client_fakes import FakeCuration, serving
from reference_selection import reference_curate, reference_curate_examples

from align2.client import cli, offline
from align2.client.records import Invalid, InvalidRecords, load_inputs
from align2.client.scorestore import Scorer, ScoreStore
from align2.v1 import curation_pb2 as pb


def record(image_dir: pathlib.Path, rid: str, answers: list[str], **extra: Any) -> dict[str, Any]:
    image = f"{rid}-{len(answers)}.png"
    (image_dir / image).write_bytes(b"png")
    conversations = []
    for t, answer in enumerate(answers):
        question = f"<image>\nQuestion {t} about {rid}?" if t == 0 else f"Question {t}?"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conversations, **extra}


def write(path: pathlib.Path, records: list[dict[str, Any]]) -> pathlib.Path:
    path.write_text(json.dumps(records))
    return path


def task_files(tmp_path: pathlib.Path) -> dict[str, list[dict[str, Any]]]:
    """Three task files, ties everywhere: repeated ids (equal question scores), answers of
    equal lengths; two turns in conversation."""
    data = {
        "complex_reasoning": [
            record(tmp_path, str(i % 9), ["a" * (1 + i * 7 % 5)]) for i in range(14)
        ],
        "conversation": [
            record(tmp_path, f"{i % 6:0{1 + i % 2}d}", ["a" * (i % 4 + 1), "b" * (5 - i % 3)])
            for i in range(20)
        ],
        "detail": [record(tmp_path, str(30 - i), ["d" * (2 + i % 2)]) for i in range(10)],
    }
    for task, records in data.items():
        write(tmp_path / f"{task}_test.json", records)
    return data


def expected_ids(data: dict[str, list[dict[str, Any]]], a: float, b: float) -> list[str]:
    """The reference's selection on the scores the fake gives. The reference keys records
    by image (and names its output by it): one image per record here."""
    scores = {
        task: {
            "records": [{**r, "image": f"{task}/{n}.jpg"} for n, r in enumerate(records)],
            "question": [float(r["id"]) if r["id"].isdigit() else 0.0 for r in records],
            "answers": [
                [float(len(m["value"])) for m in r["conversations"][1::2]] for r in records
            ],
        }
        for task, records in data.items()
    }
    kept = []
    for image in reference_curate(scores, a, b):
        task, n = image.split("/")
        kept.append(data[task][int(n)]["id"])
    return kept


def curate(fake: FakeCuration, *args: str | pathlib.Path) -> int:
    return cli.main(["curate", *map(str, args), "--target", fake.target, "--no-progress"])


def sent(fake: FakeCuration, head: int) -> int:
    return sum(len(r.samples) for r in fake.requests if list(r.heads) == [head])


def test_the_files_are_curated_as_the_reference_does(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = task_files(tmp_path)
    out, report = tmp_path / "kept.json", tmp_path / "report.json"
    files = [
        tmp_path / f"{task}_test.json" for task in ("detail", "conversation", "complex_reasoning")
    ]
    args = [*files, "--image-folder", tmp_path, "--out", out, "--report", report]
    assert curate(fake, *args, "--question-keep", "0.5", "--answer-keep", "0.5") == 0
    written = json.loads(out.read_text())
    assert [r["id"] for r in written] == expected_ids(data, 0.5, 0.5)
    by_position = [r for task in sorted(data) for r in data[task]]
    assert all(r in by_position for r in written)  # records as read, nothing added
    summary = json.loads(report.read_text())
    assert summary["total"] == {
        "records": 44,
        "invalid": 0,
        "question_kept": 22,
        "kept": len(written),
    }
    assert summary["tasks"]["conversation"]["question"]["candidates"] == 20
    assert summary["tasks"]["conversation"]["answer"] == {
        "candidates": 10,
        "kept": 5,
        "scores": summary["tasks"]["conversation"]["answer"]["scores"],
    }
    assert summary["tasks"]["detail"]["question"]["scores"]["threshold"] == 26.0
    assert summary["models"]["question"] == {
        "revision": "r1",
        "settings": "s1",
        "template_version": "t1",
    }
    assert summary["scoring"] == {
        "question": {"sent": 44, "stored": 0},
        "answer": {"sent": 22, "stored": 0},
    }
    assert f"kept {len(written)} " in capsys.readouterr().err
    # One head per request: the question head for all, the answer head for the 22 survivors.
    assert sent(fake, pb.HEAD_QUESTION) == 44 and sent(fake, pb.HEAD_ANSWER) == 22


def candidate_files(tmp_path: pathlib.Path) -> dict[str, list[dict[str, Any]]]:
    """Task files with candidate answers (a list-valued gpt; rank_answers.py's
    --repeat-times: 3 per turn in conversation, 2 in detail) and one without; the fake
    scores a candidate by its length, with ties (equal lengths, different texts)."""
    letters = "pqrstuvw"
    data = {
        "complex_reasoning": [record(tmp_path, str(i), ["a" * (1 + i % 3)]) for i in range(6)],
        "conversation": [
            record(
                tmp_path,
                str(10 + i),
                [
                    [letters[j] * (1 + (i * 5 + j * 3 + t) % 4) for j in range(3)]
                    for t in range(1 + i % 2)
                ],
            )
            for i in range(8)
        ],
        "detail": [
            record(tmp_path, str(20 + i), [[c * (2 + i % 3) for c in "xy"]]) for i in range(5)
        ],
    }
    for task, records in data.items():
        write(tmp_path / f"{task}_cands.json", records)
    return data


def test_candidate_answers_are_chosen_and_ranked_as_the_reference_does(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = candidate_files(tmp_path)
    out, report = tmp_path / "kept.json", tmp_path / "report.json"
    files = [tmp_path / f"{task}_cands.json" for task in data]
    args = [*files, "--image-folder", tmp_path, "--out", out, "--report", report]
    assert curate(fake, *args, "--question-keep", "1", "--answer-keep", "0.5") == 0
    written = json.loads(out.read_text())

    # The reference, per task type with its --repeat-times, on the scores the fake gives.
    expected = []
    for task, repeat in (("complex_reasoning", 1), ("conversation", 3), ("detail", 2)):
        records = data[task]
        scores = {
            task: {
                "records": [{**r, "image": f"{task}/{n}.jpg"} for n, r in enumerate(records)],
                "question": [float(r["id"]) for r in records],
                "answers": [
                    [
                        [float(len(a)) for a in m["value"]]
                        if isinstance(m["value"], list)
                        else float(len(m["value"]))
                        for m in r["conversations"][1::2]
                    ]
                    for r in records
                ],
            }
        }
        for example in reference_curate_examples(scores, 1.0, 0.5, repeat):
            n = int(example["id"].split("/")[1])
            expected.append({**records[n], "conversations": example["conversations"]})
    assert written == expected
    assert all(isinstance(m["value"], str) for r in written for m in r["conversations"])

    # How often each position won: every turn with candidates was answer-scored here.
    summary = json.loads(report.read_text())
    for task, repeat in (("conversation", 3), ("detail", 2)):
        wins, kept_wins = [0] * repeat, [0] * repeat
        kept_ids = {r["id"] for r in written}
        for r in data[task]:
            for m in r["conversations"][1::2]:
                lengths = [len(a) for a in m["value"]]
                best = lengths.index(max(lengths))
                wins[best] += 1
                kept_wins[best] += r["id"] in kept_ids
        assert summary["tasks"][task]["answer_candidates"] == {
            "turns": sum(wins),
            "wins": wins,
            "kept_turns": sum(kept_wins),
            "kept_wins": kept_wins,
        }
    assert summary["tasks"]["detail"]["answer_candidates"]["wins"] == [5, 0]  # ties: the first
    assert summary["tasks"]["complex_reasoning"]["answer_candidates"] == {
        "turns": 0,
        "wins": [],
        "kept_turns": 0,
        "kept_wins": [],
    }
    assert "best_candidate" in summary["procedure"]
    err = capsys.readouterr().err
    assert "best candidate answer" in err and "complex_reasoning    0 turns" not in err

    # A rerun takes every score, candidates included, from the scores file.
    fake.requests.clear()
    assert curate(fake, *args, "--question-keep", "1", "--answer-keep", "0.5") == 0
    assert fake.requests == [] and json.loads(out.read_text()) == written


def test_default_fractions(fake: FakeCuration, tmp_path: pathlib.Path) -> None:
    data = task_files(tmp_path)
    out = tmp_path / "kept.jsonl"
    files = sorted(tmp_path.glob("*_test.json"))
    assert curate(fake, *files, "--image-folder", tmp_path, "--out", out) == 0
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == expected_ids(data, 0.3, 0.3)
    assert len(kept) == 2  # int(.3 * int(.3 N)): 1 + 1 + 0 for N = 14, 20, 10


def stored_questions(files: list[pathlib.Path], scores: str) -> int:
    """How many records of ``files`` have a question score in ``scores``."""
    inputs = load_inputs(files, image_folder=files[0].parent)
    scorer = Scorer("question", "r1", "t1", "s1")  # the fake server's question model
    with ScoreStore(scores) as store:
        return sum(
            store.get(scorer.key(r.sample.id, r.digest)) is not None
            for records in inputs.tasks.values()
            for r in records
        )


def test_a_rerun_after_a_server_failure_rescores_nothing_and_gives_the_same_output(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    common = [*files, "--image-folder", tmp_path, "--chunk-size", "4", "--concurrency", "1"]
    assert curate(fake, *common, "--out", tmp_path / "whole.json") == 0
    fake.requests.clear()

    fake.fail_scores_after = 3  # the server goes away after 3 chunks
    out = tmp_path / "resumed.json"
    assert curate(fake, *common, "--out", out, "--no-retry") == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert not out.exists()
    with ScoreStore(f"{out}.scores.jsonl") as store:
        assert store.loaded == 12
    stored = stored_questions(files, f"{out}.scores.jsonl")
    fake.fail_scores_after = None
    fake.requests.clear()
    assert curate(fake, *common, "--out", out, "--report", tmp_path / "r.json") == 0
    assert sent(fake, pb.HEAD_QUESTION) == 44 - stored  # only what was not stored
    assert out.read_text() == (tmp_path / "whole.json").read_text()
    scoring = json.loads((tmp_path / "r.json").read_text())["scoring"]
    assert scoring["question"] == {"sent": 44 - stored, "stored": stored}

    fake.requests.clear()  # a third run: everything stored, nothing sent
    assert curate(fake, *common, "--out", out) == 0
    assert fake.requests == []
    assert out.read_text() == (tmp_path / "whole.json").read_text()


def test_a_rerun_with_another_image_under_a_records_name_scores_that_record_again(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    """Stored scores are kept for an image file of the same name and size: a rerun on
    another --image-folder whose images differ scores them all again; on a copy of the
    same images, none; after one image is written again, that record only."""
    data = [record(tmp_path, str(i), ["a" * i]) for i in range(1, 6)]
    source = write(tmp_path / "detail_x.json", data)
    copy = tmp_path / "copy"
    copy.mkdir()
    for r in data:
        (copy / r["image"]).write_bytes((tmp_path / r["image"]).read_bytes())
    args = [source, "--out", tmp_path / "k.json", "--scores", tmp_path / "s.jsonl"]
    assert curate(fake, *args, "--image-folder", tmp_path) == 0
    assert sent(fake, pb.HEAD_QUESTION) == 5
    fake.requests.clear()
    assert curate(fake, *args, "--image-folder", copy) == 0
    assert fake.requests == []  # the same images, elsewhere
    (copy / data[2]["image"]).write_bytes(b"another image")
    assert curate(fake, *args, "--image-folder", copy) == 0
    assert [s.id for r in fake.requests for s in r.samples if list(r.heads) == [
        pb.HEAD_QUESTION]] == ["3"]  # fmt: skip
    for r in data:
        (copy / r["image"]).write_bytes(b"other images")
    fake.requests.clear()
    assert curate(fake, *args, "--image-folder", copy) == 0
    assert sent(fake, pb.HEAD_QUESTION) == 5


def test_ctrl_c_keeps_the_scores_of_finished_chunks(
    fake: FakeCuration, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    common = [*files, "--image-folder", tmp_path, "--chunk-size", "5", "--concurrency", "2"]
    assert curate(fake, *common, "--out", tmp_path / "whole.json") == 0
    add = ScoreStore.add
    calls = []

    def interrupted_add(self: ScoreStore, entries: Any) -> None:
        add(self, entries)
        calls.append(len(entries))
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ScoreStore, "add", interrupted_add)
    out = tmp_path / "resumed.json"
    assert curate(fake, *common, "--out", out) == 130
    monkeypatch.undo()
    stored = stored_questions(files, f"{out}.scores.jsonl")
    assert sum(calls) == 15 and stored >= 15  # identical records share their stored score
    # The rerun talks to a server of its own: the other chunk in flight at the interrupt
    # may reach the first one's handler only now (a fresh-clone CI run once counted its 5
    # samples as the rerun's).
    with serving() as rerun:
        assert curate(rerun, *common, "--out", out) == 0
        assert sent(rerun, pb.HEAD_QUESTION) == 44 - stored
    assert out.read_text() == (tmp_path / "whole.json").read_text()


CTRL_C_WORKS = (
    "import runpy, signal, sys; "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'align2.client'; "
    "runpy.run_module('align2.client', run_name='__main__', alter_sys=True)"
)
"""``python -c`` this, then the command's arguments: the client's CLI with SIGINT delivered
and handled as Python does by default. Both the mask and SIG_IGN are inherited (they
survive exec), and some library of this test session left one of them set: in a full run
the child ignored the signal and finished normally. Not a ``preexec_fn``: forking a
process whose gRPC threads are running made the child fail now and then before it sent
anything."""


def test_a_real_ctrl_c_stops_the_command_and_the_rerun_resumes(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    common = [*files, "--image-folder", tmp_path, "--chunk-size", "4", "--concurrency", "1"]
    assert curate(fake, *common, "--out", tmp_path / "whole.json") == 0
    fake.requests.clear()
    fake.gate, fake.hold_scores_after = threading.Event(), 3  # the 4th chunk hangs
    out = tmp_path / "resumed.json"
    command = [sys.executable, "-c", CTRL_C_WORKS, "curate", *map(str, common)]
    command += ["--out", str(out), "--target", fake.target]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # stderr to a file, not a pipe: a process forked meanwhile by another thread of this
    # test session could hold a pipe open and make reading it to the end hang.
    log = tmp_path / "stderr.txt"
    with (
        log.open("w") as sink,
        subprocess.Popen(command, env=env, stderr=sink) as process,
    ):
        deadline = time.monotonic() + 30
        while len(fake.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a subprocess: no event to wait on
        assert len(fake.requests) == 4, log.read_text()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    err = log.read_text()
    assert process.returncode == 130, err
    assert "interrupted; every score so far is in" in err
    fake.gate.set()
    fake.hold_scores_after = None
    stored = stored_questions(files, f"{out}.scores.jsonl")
    assert stored == 12
    fake.requests.clear()
    assert curate(fake, *common, "--out", out) == 0
    assert sent(fake, pb.HEAD_QUESTION) == 44 - stored
    assert out.read_text() == (tmp_path / "whole.json").read_text()


@pytest.mark.parametrize("changed", ["revisions", "settings"])
def test_a_changed_model_revision_or_setting_is_scored_again(
    fake: FakeCuration, tmp_path: pathlib.Path, changed: str
) -> None:
    """A rerun after the server's question model changed its files (revision) or a setting
    that changes scores (ModelRef.settings: dtype, image_mode, ...) scores that head again.
    Fails on: a stored score keyed without ModelRef.settings (a researcher who changes
    dtype and reruns would get the old selection)."""
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    args = [*files, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(fake, *args) == 0
    fake.requests.clear()
    getattr(fake, changed)["q"] = "x9"
    assert curate(fake, *args, "--report", tmp_path / "r.json") == 0
    scoring = json.loads((tmp_path / "r.json").read_text())["scoring"]
    survivors = 4 + 6 + 3  # int(0.3 N) for N = 14, 20, 10: the same, their answers stored
    assert scoring == {
        "question": {"sent": 44, "stored": 0},
        "answer": {"sent": 0, "stored": survivors},
    }


def test_duplicate_ids_are_ranked_apart_and_stored_apart(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    # Same id, different answers: two candidates with their own answer scores.
    records = [record(tmp_path, "5", ["a" * n]) for n in (1, 9, 4, 6)]
    source = write(tmp_path / "detail.json", records)
    args = [source, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(fake, *args, "--question-keep", "1", "--answer-keep", "0.5") == 0
    first = json.loads((tmp_path / "k.json").read_text())
    assert first == [records[1], records[3]]
    fake.requests.clear()
    assert curate(fake, *args, "--question-keep", "1", "--answer-keep", "0.5") == 0
    assert fake.requests == [] and json.loads((tmp_path / "k.json").read_text()) == first


def test_records_without_a_task_type_stop_the_run_unless_one_task(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merged = write(
        tmp_path / "llava_instruct_158k.json",
        [record(tmp_path, str(i), ["x" * i]) for i in range(1, 11)],
    )
    args = [merged, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(fake, *args) == 2
    err = capsys.readouterr().err
    assert "llava_instruct_158k.json: 10 of 10 records have no task type" in err
    assert "--task NAME" in err and "--one-task" in err and "'task' key" in err
    assert fake.requests == []  # nothing scored

    assert curate(fake, *args, "--one-task", "--report", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["tasks"]) == ["all"] and report["total"]["kept"] == 0  # int(.3*3)
    assert curate(fake, *args, "--task", "detail") == 0

    mixed = [record(tmp_path, "1", ["a"], task="detail"), record(tmp_path, "2", ["a"])]
    args = [write(tmp_path / "mixed.json", mixed), "--out", tmp_path / "k.json"]
    assert curate(fake, *args, "--image-folder", tmp_path) == 2
    assert "mixed.json: 1 of 2 records have no task type (first: record 1, id '2')" in (
        capsys.readouterr().err
    )


def invalid_data(tmp_path: pathlib.Path) -> pathlib.Path:
    records = [record(tmp_path, str(i), ["a" * i]) for i in range(1, 11)]
    records[2]["conversations"][0]["from"] = "gpt"  # malformed
    records[4]["image"] = "missing.png"  # no such file
    records[6]["id"] = "bad7"  # the server refuses it (INVALID_ARGUMENT)
    return write(tmp_path / "detail_x.json", records)


def test_invalid_records_stop_the_run_naming_the_record(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = invalid_data(tmp_path)
    args = [source, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(fake, *args) == 2
    err = capsys.readouterr().err
    assert "record 2 (id '3'): conversations[0].from: expected 'human'" in err
    assert "record 4 (id '5'): image: no such file" in err and "--skip-invalid" in err
    assert fake.requests == []
    # Only the one the server refuses: found while scoring, named the same way.
    records = json.loads(source.read_text())
    records[2]["conversations"][0]["from"] = "human"
    records[4]["image"] = records[3]["image"]
    write(source, records)
    assert curate(fake, *args) == 2
    assert "record 6 (id 'bad7'): INVALID_ARGUMENT: image: bad" in capsys.readouterr().err


def test_skip_invalid_leaves_them_out_and_lists_them(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = invalid_data(tmp_path)
    report = tmp_path / "r.json"
    args = [source, "--image-folder", tmp_path, "--out", tmp_path / "k.json", "--report", report]
    assert (
        curate(fake, *args, "--skip-invalid", "--question-keep", "0.5", "--answer-keep", "1") == 0
    )
    summary = json.loads(report.read_text())
    assert [(i["index"], i["id"], i["stage"]) for i in summary["invalid"]] == [
        (2, "3", "read"),
        (4, "5", "read"),
        (6, "bad7", "question"),
    ]
    assert summary["total"] == {"records": 10, "invalid": 3, "question_kept": 3, "kept": 3}
    assert summary["tasks"]["detail"]["question"]["candidates"] == 7  # N without the invalid
    kept = [r["id"] for r in json.loads((tmp_path / "k.json").read_text())]
    assert kept == ["10", "9", "8"]  # the top int(0.5 * 7) question scores
    err = capsys.readouterr().err
    skipped = [line.strip() for line in err.splitlines() if line.strip().startswith("skipped:")]
    assert skipped == [
        f"skipped: {source}: record {i['index']} (id {i['id']!r}): {i['problem']}"
        for i in summary["invalid"]
    ]


def test_records_left_out_beyond_max_errors_exit_3_with_the_outputs_written(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 3 invalid records of 10 are per-item errors: exit 3 past --max-errors, and by
    default only when every record failed (here: an image folder without the images)."""
    source = invalid_data(tmp_path)
    out = tmp_path / "k.json"
    args = [source, "--image-folder", tmp_path, "--out", out, "--skip-invalid"]
    args += ["--question-keep", "0.5", "--answer-keep", "1"]
    assert curate(fake, *args, "--max-errors", "2") == 3
    assert "3 of 10 items failed: more than --max-errors 2" in capsys.readouterr().err
    assert len(json.loads(out.read_text())) == 3  # written all the same
    assert curate(fake, *args, "--max-errors", "3") == 0
    assert curate(fake, *args) == 0
    (tmp_path / "empty").mkdir()
    args[2] = tmp_path / "empty"
    assert curate(fake, *args) == 3
    assert "10 of 10 items failed: every item failed" in capsys.readouterr().err
    assert json.loads(out.read_text()) == []


def test_plot_draws_one_histogram_per_task_and_stage(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    from PIL import Image

    task_files(tmp_path)
    plot = tmp_path / "scores.png"
    files = sorted(tmp_path.glob("*_test.json"))
    assert (
        curate(
            fake, *files, "--image-folder", tmp_path, "--out", tmp_path / "k.json", "--plot", plot
        )
        == 0
    )
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (840, 660)


def test_plot_without_pillow_is_a_clear_usage_error(
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    args = [*files, "--image-folder", tmp_path, "--out", tmp_path / "k.json", "--plot", "p.png"]
    assert curate(fake, *args) == 2
    assert "pip install pillow" in capsys.readouterr().err
    assert fake.requests == []


def test_stream_refuses_the_exact_selection_flags(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert curate(fake, "x.json", "--out", tmp_path / "k.json", "--stream", "--one-task") == 2
    assert "--one-task: not with --stream" in capsys.readouterr().err


def test_a_server_without_score_stops_the_run(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_files(tmp_path)
    fake.services = ["Align"]
    files = sorted(tmp_path.glob("*_test.json"))
    args = [*files, "--image-folder", tmp_path, "--out", tmp_path / "k.json"]
    assert curate(fake, *args) == 1
    assert "does not serve Score" in capsys.readouterr().err


def test_a_progress_bar_per_head_on_a_terminal_only(
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    args = ["curate", *map(str, files), "--image-folder", str(tmp_path), "--target", fake.target]
    assert cli.main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert "sample/s" not in capsys.readouterr().err  # not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main([*args, "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "question head: 100%" in err and "answer head: 100%" in err
    assert "44/44" in err and "sample/s" in err  # count, then the rate (and the ETA)


def test_read_problems_name_the_record_once(tmp_path: pathlib.Path) -> None:
    good = record(tmp_path, "1", ["a"])
    no_id = {k: v for k, v in good.items() if k != "id"}
    colon = {**good, "id": "a: b", "conversations": []}
    source = write(tmp_path / "detail.json", [good, "text", no_id, colon])
    inputs = load_inputs([source], image_folder=tmp_path, skip_invalid=True)
    assert [str(i) for i in inputs.invalid] == [
        f"{source}: record 1: record: expected an object, got str",
        f"{source}: record 2: id: missing",
        f"{source}: record 3 (id 'a: b'): conversations: expected a non-empty list of messages",
    ]
    assert [r.sample.id for r in inputs.tasks["detail"]] == ["1"]
    assert inputs.files == {str(source): 4}


def test_a_busy_server_paces_the_run_instead_of_stopping_it(
    fake: FakeCuration, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More refusals than gRPC's 5 attempts: the chunk waits and is sent again (Score
    changes nothing), and the run ends as an unrefused one does."""
    monkeypatch.setattr(offline, "PACING_FIRST_PAUSE", 0.01)
    task_files(tmp_path)
    files = sorted(tmp_path.glob("*_test.json"))
    common = [*files, "--image-folder", tmp_path, "--chunk-size", "4", "--concurrency", "1"]
    assert curate(fake, *common, "--out", tmp_path / "calm.json") == 0
    fake.requests.clear()
    fake.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 7  # gRPC's own retries off:
    out = tmp_path / "busy.json"  # each refusal is one pacing round
    assert curate(fake, *common, "--out", out, "--no-retry") == 0
    assert out.read_bytes() == (tmp_path / "calm.json").read_bytes()
    # A refusal that says not to retry (pushback -1) stands at once.
    fake.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    fake.pushback_ms = "-1"
    assert curate(fake, *common, "--out", tmp_path / "never.json", "--no-retry") == 1
    assert fake.fail_next == []  # GetServerInfo took one, the first Score call the other
    fake.pushback_ms = "10"
    # Past the pacing rounds the refusal stands: the run stops, and resumes when rerun.
    # (the fake's GetServerInfo takes one of them and answers anyway)
    fake.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED] * (offline.PACING_ROUNDS + 2)
    assert curate(fake, *common, "--out", tmp_path / "refused.json", "--no-retry") == 1


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("samples[12].turns[0].answer: empty", "turns[0].answer: empty"),
        ("samples[3]: too many turns", ": too many turns"),
        ("image: cannot read x.png", "image: cannot read x.png"),  # failed here: no place
        ("turns: samples[3] is not a prefix", "turns: samples[3] is not a prefix"),
    ],
)
def test_a_record_named_by_the_run_loses_its_place_in_a_call(message: str, named: str) -> None:
    from align2.client.calls import without_place

    assert without_place(message) == named


def detail_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """Ten one-turn records, ids "1".."10" (question scores 1..10), answers 1..10 long."""
    records = [record(tmp_path, str(i), ["a" * i]) for i in range(1, 11)]
    return write(tmp_path / "detail_x.json", records)


class NaNScores(FakeCuration):
    """The question head scores sample "7" NaN."""

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        response = super().Score(request, context)
        for result in response.results:
            if result.id == "7" and result.HasField("question_score"):
                result.question_score = math.nan
        return response


def test_a_nan_score_leaves_its_record_out_as_invalid(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails on: offline._value not checking NaN (the whole run then fails in top_fraction)."""
    source = detail_file(tmp_path)
    report = tmp_path / "r.json"
    with serving(NaNScores()) as fake:
        code = curate(fake, source, "--image-folder", tmp_path, "--out", tmp_path / "k.json",
                      "--skip-invalid", "--report", report)  # fmt: skip
    assert code == 0, capsys.readouterr().err
    [invalid] = json.loads(report.read_text())["invalid"]
    assert (invalid["id"], invalid["stage"], invalid["problem"]) == (
        "7",
        "question",
        "question score is NaN",
    )


class UnavailableItem(FakeCuration):
    """Sample "7" fails with an item error of a busy server (UNAVAILABLE)."""

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        response = super().Score(request, context)
        for result in response.results:
            if result.id == "7":
                result.Clear()
                result.id = "7"
                result.error.code = grpc.StatusCode.UNAVAILABLE.value[0]
                result.error.message = "samples[0]: the model is reloading"
        return response


def test_an_item_error_of_the_server_stops_the_run_even_with_skip_invalid(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only INVALID_ARGUMENT-like item errors make a record invalid; UNAVAILABLE stops the
    run (a rerun resumes) instead of silently dropping the record. Fails on: treating every
    item error as an invalid record."""
    source = detail_file(tmp_path)
    with serving(UnavailableItem()) as fake:
        code = curate(fake, source, "--image-folder", tmp_path, "--out", tmp_path / "k.json",
                      "--skip-invalid")  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "stopped:" in err and "record 6 (id '7'): question head: UNAVAILABLE" in err


class ReloadedModel(FakeCuration):
    """GetServerInfo reports revision r1 of the question model; Score answers with r9."""

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        response = super().Score(request, context)
        response.question_model.revision = "r9"
        return response


def test_a_head_that_changes_during_the_run_stops_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scores of two model revisions must never be ranked together. Fails on: removing the
    ``answered != scorer`` check."""
    source = detail_file(tmp_path)
    with serving(ReloadedModel()) as fake:
        code = curate(fake, source, "--image-folder", tmp_path, "--out", tmp_path / "k.json")
    assert code == 1
    assert "the server's question head changed during the run" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


class Refusal(grpc.RpcError):
    def __init__(self, pushback: str) -> None:
        self._pushback = pushback

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("grpc-retry-pushback-ms", self._pushback),)


def test_a_refusal_with_a_zero_pushback_is_sent_again() -> None:
    """grpc-retry-pushback-ms >= 0 asks for a retry (0: at once); only -1 says not to.
    Fails on: ``millis <= 0`` for ``millis < 0``."""
    calls = []

    async def call() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Refusal("0")
        return "scored"

    assert asyncio.run(offline.when_room(call)) == "scored"
    assert len(calls) == 2


def test_a_refusal_is_sent_again_no_sooner_than_the_servers_delay() -> None:
    """The pause is never shorter than grpc-retry-pushback-ms. Fails on: pacing on the
    client's own backoff alone (0.25-0.5 s here)."""
    calls = []

    async def call() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise Refusal("1000")
        return "scored"

    assert asyncio.run(offline.when_room(call)) == "scored"
    assert calls[1] - calls[0] >= 1.0


def test_one_task_ranks_records_that_have_a_task_together(tmp_path: pathlib.Path) -> None:
    """--one-task: a single stratum "all", whatever task keys records carry.
    Fails on: typed records keeping their own stratum under one_task."""
    tagged = [record(tmp_path, "1", ["A cat."], task=t) for t in ("detail", "conversation")]
    path = write(tmp_path / "mixed.json", tagged)
    inputs = load_inputs([path], image_folder=tmp_path, one_task=True)
    assert list(inputs.tasks) == ["all"] and len(inputs.tasks["all"]) == 2


def test_a_given_task_wins_over_the_file_name(tmp_path: pathlib.Path) -> None:
    """Record key, else --task, else the file name. Fails on: file name before --task."""
    path = write(tmp_path / "detail_23k.json", [record(tmp_path, "1", ["A cat."])])
    inputs = load_inputs([path], image_folder=tmp_path, task="conversation")
    assert list(inputs.tasks) == ["conversation"]


def test_invalid_records_beyond_five_are_counted_in_the_message() -> None:
    """Fails on: dropping the "(and N more)" part."""
    error = InvalidRecords([Invalid("f.json", i, str(i), "read", "bad") for i in range(7)])
    assert str(error).startswith("7 invalid records: ") and str(error).endswith("(and 2 more)")
