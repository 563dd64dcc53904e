"""``align2 curate --stream`` killed with SIGKILL mid-run, then run again: a real server on
127.0.0.1:0 (tiny LLaVA reward models, a tiny Llama aligning the kept), the command in
its own process.

The stream decides against fixed thresholds (a calibration file), and the server batches
one item at a time, so a record's decision does not depend on what else is in flight:
the killed and resumed run must keep exactly what one uninterrupted run keeps.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from support import ServerThread, full_config, png

from align2.client import CurationClient, read_llava
from align2.client.calibration import calibrate
from align2.client.cli import main as cli_main

RECORDS = 30


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path, tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = full_config(tiny_llava, tiny_llm, max_new_tokens=4)
    config.batching.max_batch_size = 1
    server = ServerThread(config).start()
    yield server
    server.stop()


def write_data(folder: pathlib.Path) -> pathlib.Path:
    records = []
    for i in range(RECORDS):
        (folder / f"img{i}.png").write_bytes(png(16 + i, 20, (i * 8, 60, 90)))
        conversation = [
            {"from": "human", "value": f"<image>\nWhat is item {i}?"},
            {"from": "gpt", "value": f"Item {i} is a {'big ' * (i % 5)}box."},
        ]
        records.append({"id": f"r{i}", "image": f"img{i}.png", "conversations": conversation})
    data = folder / "detail_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def write_calibration(server: ServerThread, data: pathlib.Path, folder: pathlib.Path) -> str:
    """Thresholds that keep about half of each stage (the method's 30% would keep 2)."""
    with CurationClient(server.target) as client:
        scores = client.score(read_llava(data, image_folder=folder))
    path = folder / "cal.json"
    questions = [s.question_score for s in scores]
    answers = [s.answer_score for s in scores]
    calibrate({"detail": questions}, {"detail": answers}, 0.6, 0.6).save(path)
    return str(path)


def lines(path: pathlib.Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_killed_mid_stream_goes_on_from_its_journal_and_keeps_what_one_run_keeps(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    data = write_data(tmp_path)
    command = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--align"]
    command += ["--target", server.target, "--no-progress"]
    command += ["--thresholds", write_calibration(server, data, tmp_path)]

    whole = tmp_path / "whole"
    whole.mkdir()
    assert cli_main([*command, "--out", str(whole / "kept.json")]) == 0
    expected = json.loads((whole / "kept.json").read_text())
    assert 0 < len(expected) < RECORDS
    assert not (whole / "kept.journal.jsonl").exists()  # a finished run deletes it

    out, report = tmp_path / "kept.json", tmp_path / "decisions.jsonl"
    journal = tmp_path / "kept.journal.jsonl"
    argv = [*command, "--out", str(out), "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.Popen(
        [sys.executable, "-m", "align2.client.cli", *argv],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not journal.exists() or journal.read_text().count("\n") < 6:
        assert run.poll() is None, run.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not out.exists()  # nothing written at the end: only the journal
    journaled = journal.read_text().count("\n")  # a line cut by the kill is not counted
    assert 6 <= journaled < RECORDS

    assert cli_main(argv) == 0
    decisions = lines(report)
    earlier = [d for d in decisions if d.get("from_journal")]
    # Each record decided once; the ones the journal held were not sent again.
    assert sorted(d["record"] for d in decisions) == list(range(RECORDS))
    assert len(earlier) == journaled
    kept = json.loads(out.read_text())
    assert sorted(kept, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    assert not journal.exists()


def test_a_second_run_of_the_same_command_meanwhile_is_refused(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from align2.client.stream_journal import DecisionJournal

    data = write_data(tmp_path)
    out = tmp_path / "kept.json"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--target", server.target, "--no-progress", "--min-window", "1"]
    held = DecisionJournal(tmp_path / "kept.journal.jsonl", {})  # the first run, still going
    try:
        assert cli_main(argv) == 2
    finally:
        held.close(finished=False)
    assert "kept.journal.jsonl: another process is writing it" in capsys.readouterr().err
    assert not out.exists()
