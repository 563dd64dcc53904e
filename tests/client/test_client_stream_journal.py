"""The journal of ``curate --stream`` (decisions reused by a rerun only on the same record,
content and options; damaged lines; the lock; when the file goes), and the command using
it against the fake server."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from client_fakes import FakeCuration, slow_reading

from align2.client import Sample, Turn, stream_cli
from align2.client.cli import main as cli_main
from align2.client.jsonl_log import JsonlLog, LogInUse
from align2.client.llava import record_from_sample, sample_from_record
from align2.client.stream_journal import DecisionJournal, journal_path

OPTIONS = {"question_keep": None, "align": True, "parts": "both"}
KEPT_RECORD = {
    "id": "r0",
    "image": "a.jpg",
    "conversations": [
        {"from": "human", "value": "Q?\n<image>"},  # the marker at the end, as read
        {"from": "gpt", "value": "A rewritten answer."},
    ],
    "source": "gen-7",
}


def sample(i: int, answer: str = "A.") -> Sample:
    return Sample(f"r{i}", b"", (Turn("Q?", answer),), task="detail", image_file="a.jpg")


def report(i: int, decision: str = "kept") -> dict[str, Any]:
    return {"id": f"r{i}", "decision": decision, "file": "d.jsonl", "record": i}


@pytest.fixture
def two(tmp_path: pathlib.Path) -> pathlib.Path:
    """A journal holding two decisions on d.jsonl: record 0 kept, record 1 dropped."""
    path = tmp_path / "kept.journal.jsonl"
    journal = DecisionJournal(path, OPTIONS)
    kept = sample_from_record(KEPT_RECORD, 0)
    journal.add("d.jsonl", 0, sample(0), report(0), kept)
    journal.add("d.jsonl", 1, sample(1), report(1, "dropped_question"), None)
    journal.close(finished=False)
    return path


def test_a_decision_is_taken_back_for_the_same_record_with_its_kept_sample(
    two: pathlib.Path,
) -> None:
    path = two
    journal = DecisionJournal(path, OPTIONS)
    assert (journal.loaded, journal.stale, journal.ignored) == (2, 0, 0)
    first = journal.take("d.jsonl", 0, sample(0))
    assert first is not None and first.report == report(0)
    assert first.kept is not None and record_from_sample(first.kept) == KEPT_RECORD
    second = journal.take(str(pathlib.Path("d.jsonl").absolute()), 1, sample(1))
    assert second is not None and second.kept is None  # the same file, named another way
    assert journal.take("d.jsonl", 1, sample(1)) is None  # taken once
    assert journal.take("d.jsonl", 2, sample(2)) is None  # never decided
    journal.close(finished=True)
    assert not path.exists()


@pytest.mark.parametrize(
    ("file", "record", "changed", "options"),
    [
        ("other.jsonl", 0, sample(0), OPTIONS),  # another input file
        ("d.jsonl", 0, sample(0, answer="Edited."), OPTIONS),  # the record was edited
        (
            "d.jsonl",
            0,
            Sample("r0", b"", sample(0).turns, "conversation", image_file="a.jpg"),
            OPTIONS,
        ),
        ("d.jsonl", 0, sample(0), {**OPTIONS, "question_keep": 0.5}),  # other flags
        # what a kept copy writes to --out, not what is sent: the id, an extra key
        ("d.jsonl", 0, dataclasses.replace(sample(0), id="r0-renamed"), OPTIONS),
        ("d.jsonl", 0, dataclasses.replace(sample(0), extra={"source": "gen-8"}), OPTIONS),
    ],
)
def test_a_decision_on_other_content_or_options_is_not_taken(
    file: str, record: int, changed: Sample, options: dict[str, Any], two: pathlib.Path
) -> None:
    path = two
    journal = DecisionJournal(path, options)
    assert journal.take(file, record, changed) is None
    journal.close(finished=False)


def test_the_decision_on_a_record_as_it_is_now_is_taken_after_an_edit(
    two: pathlib.Path,
) -> None:
    """Record 0 was decided, then edited and decided again (a run killed after each): the
    journal holds both decisions, and a rerun takes the one on the record as it is now
    instead of sending it again on every rerun."""
    path = two
    edited = sample(0, answer="Edited.")
    journal = DecisionJournal(path, OPTIONS)
    assert journal.take("d.jsonl", 0, edited) is None  # only the first decision so far
    journal.add("d.jsonl", 0, edited, report(0, "dropped_answer"), None)
    journal.close(finished=False)
    journal = DecisionJournal(path, OPTIONS)
    taken = journal.take("d.jsonl", 0, edited)
    assert taken is not None and taken.report == report(0, "dropped_answer")
    journal.close(finished=False)


def test_a_decision_on_another_image_of_the_same_name_is_not_taken(
    tmp_path: pathlib.Path,
) -> None:
    """Images count by file name and size: another image under the record's name (another
    --image-folder, a file written again) is sent afresh; the same bytes moved are not."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "a.jpg").write_bytes(b"jpeg" * 10)
    (second / "a.jpg").write_bytes(b"other jpeg" * 10)

    def in_folder(folder: pathlib.Path) -> Sample:
        return dataclasses.replace(sample(0), image=folder / "a.jpg")

    path = tmp_path / "kept.journal.jsonl"
    journal = DecisionJournal(path, OPTIONS)
    journal.add("d.jsonl", 0, in_folder(first), report(0), None)
    journal.close(finished=False)
    journal = DecisionJournal(path, OPTIONS)
    assert journal.take("d.jsonl", 0, in_folder(second)) is None
    (second / "a.jpg").write_bytes(b"jpeg" * 10)  # the same image, copied: taken
    assert journal.take("d.jsonl", 0, in_folder(second)) is not None
    journal.close(finished=False)


def test_a_line_whose_report_has_no_decision_is_ignored(two: pathlib.Path) -> None:
    """A damaged line that is still JSON with every key: a rerun that took it stopped with
    a KeyError traceback, and so did every rerun after it."""
    path = two
    first, second = path.read_text().splitlines()
    entry = json.loads(first)
    del entry["report"]["decision"]
    path.write_text(json.dumps(entry) + "\n" + second + "\n")
    journal = DecisionJournal(path, OPTIONS)
    assert (journal.loaded, journal.ignored) == (1, 1)
    assert journal.take("d.jsonl", 0, sample(0)) is None  # sent again
    journal.close(finished=False)


def test_a_file_name_that_is_not_utf8_is_journaled(tmp_path: pathlib.Path) -> None:
    """A file name with a byte that is not UTF-8 (read by Python as a lone surrogate):
    before, journaling its first decision raised UnicodeEncodeError, and every run of
    ``curate --stream`` on that file stopped at its first decision."""
    name = str(tmp_path / "d\udce9.jsonl")  # os.fsdecode(b"d\xe9.jsonl")
    path = tmp_path / "kept.journal.jsonl"
    journal = DecisionJournal(path, OPTIONS)
    journal.add(name, 0, sample(0), {**report(0, "dropped_question"), "file": name}, None)
    journal.close(finished=False)
    journal = DecisionJournal(path, OPTIONS)
    taken = journal.take(name, 0, sample(0))
    assert taken is not None and taken.report["file"] == name
    journal.close(finished=False)


def test_damaged_lines_are_ignored_and_a_cut_last_line_is_dropped(
    two: pathlib.Path,
) -> None:
    path = two
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"\xff\xfe not utf-8\n" + first + b"[1, 2]\n{}\n" + second[:40])
    journal = DecisionJournal(path, OPTIONS)
    assert (journal.loaded, journal.ignored) == (1, 3)
    assert journal.take("d.jsonl", 1, sample(1)) is None  # its line was cut by the crash
    journal.add("d.jsonl", 1, sample(1), report(1), None)  # appended on a line of its own
    journal.close(finished=False)
    assert DecisionJournal(path, OPTIONS).loaded == 2


def test_a_finished_run_keeps_the_journal_while_it_holds_records_that_run_did_not_read(
    two: pathlib.Path,
) -> None:
    path = two
    journal = DecisionJournal(path, OPTIONS)
    assert journal.take("d.jsonl", 0, sample(0)) is not None  # record 1 not read
    assert journal.left() == 1
    assert journal.close(finished=True) and path.exists()


def test_the_log_is_locked_while_open(tmp_path: pathlib.Path) -> None:
    first = JsonlLog(tmp_path / "j.jsonl", lock=True)
    with pytest.raises(LogInUse, match="another process is writing it"):
        JsonlLog(tmp_path / "j.jsonl", lock=True)
    first.close()
    JsonlLog(tmp_path / "j.jsonl", lock=True).close()


def test_no_journal_beside_an_output_that_is_not_a_file(tmp_path: pathlib.Path) -> None:
    assert journal_path("/dev/null") is None
    assert journal_path(tmp_path / "kept.json") == tmp_path / "kept.journal.jsonl"


RECORD = {
    "image": "a.jpg",
    "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}],
}


def test_the_same_command_after_a_failed_stream_sends_only_the_records_not_decided(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream fails after 2 decisions by the server, and record 1 (its image missing)
    failed as its own item; the same command again sends record 1 (an error is not
    journaled: it may pass now) and the 9 others not decided, and writes the 11 kept (the
    fake keeps every sample it gets) to --out, the report naming the 2 taken from the
    journal; a finished run deletes it."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_23k.jsonl"
    records = [{**RECORD, "id": f"r{i}"} for i in range(12)]
    records[1]["image"] = "b.jpg"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    journal = tmp_path / "kept.journal.jsonl"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress", "--no-retry"]
    fake.curate_abort_after = [2]
    assert cli_main(argv) == 1
    assert f"or run the same command again: the decisions so far are in {journal}" in (
        capsys.readouterr().err
    )
    first = [json.loads(line)["id"] for line in report.read_text().splitlines()]
    assert sorted(first) == ["r0", "r1", "r2"]
    journaled = [json.loads(line)["report"]["id"] for line in journal.read_text().splitlines()]
    assert sorted(journaled) == ["r0", "r2"]
    fake.curate_streams.clear()
    (tmp_path / "b.jpg").write_bytes(b"jpeg")  # record 1 can be sent now
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "holds 2 decisions of an earlier run" in err
    assert "12 samples: 12 kept, 0 dropped_question, 0 dropped_answer, 0 error (2 decided" in err
    assert sorted(fake.curate_streams[0], key=lambda i: int(i[1:])) == [
        f"r{i}" for i in range(1, 12) if i != 2
    ]
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(d["record"] for d in decisions) == list(range(12))
    assert sorted(d["id"] for d in decisions if d.get("from_journal")) == ["r0", "r2"]
    kept = json.loads(out.read_text())
    assert sorted(r["id"] for r in kept) == sorted(f"r{i}" for i in range(12))
    assert not journal.exists()
    # The first run's rest file: all of it decided now, so a run on it would decide twice.
    assert not (tmp_path / "kept.rest.jsonl").exists()
    assert "kept.rest.jsonl removed: its records are decided now" in err


def stream_of_twelve(fake: FakeCuration, tmp_path: pathlib.Path) -> list[str]:
    """The argv of curate --stream on 12 records (the fake keeps each), out kept.json."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_23k.jsonl"
    data.write_text("".join(json.dumps({**RECORD, "id": f"r{i}"}) + "\n" for i in range(12)))
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--no-retry"]
    return [*argv, "--out", str(tmp_path / "kept.json"), "--target", fake.target, "--no-progress"]


def test_a_server_with_another_model_revision_decides_every_record_again(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    """The journal's decisions were made by the question model at revision r1; the server
    now runs r9: none is taken, all 12 are sent."""
    argv = stream_of_twelve(fake, tmp_path)
    fake.curate_abort_after = [5]
    assert cli_main(argv) == 1
    fake.curate_streams.clear()
    fake.revisions["q"] = "r9"
    assert cli_main(argv) == 0
    assert len(fake.curate_streams[0]) == 12


@pytest.mark.parametrize("outputs_full", [False, True])
def test_a_journal_that_cannot_be_written_stops_the_run_naming_it(
    outputs_full: bool,
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The journal's disk fills after 3 decisions: exit 1 (not 2, bad input), the message
    names the journal; the 3 kept are written and the other 9 are in the rest file, or,
    when that disk is --out's too (``outputs_full``), those are named as not written
    either (not raised in the journal failure's place). With room again, the same command
    goes on from the 3 journaled."""
    argv = stream_of_twelve(fake, tmp_path)
    real_append, real_write = JsonlLog.append, stream_cli.write_llava
    appended = []

    def fills_up(log: JsonlLog, entries: Any) -> None:
        if len(appended) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(entries)
        real_append(log, entries)

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JsonlLog, "append", fills_up)
    if outputs_full:
        monkeypatch.setattr(stream_cli, "write_llava", full)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "kept.journal.jsonl: cannot journal a decision: No space left on device" in err
    assert "or run the same command again: the decisions so far are in" in err
    if outputs_full:
        assert "kept.json not written either: [Errno 28] No space left on device" in err
    else:
        assert len(json.loads((tmp_path / "kept.json").read_text())) == 3
        assert len((tmp_path / "kept.rest.jsonl").read_text().splitlines()) == 9
    monkeypatch.setattr(JsonlLog, "append", real_append)
    monkeypatch.setattr(stream_cli, "write_llava", real_write)
    fake.curate_streams.clear()
    assert cli_main(argv) == 0
    assert len(fake.curate_streams[0]) == 9
    assert len(json.loads((tmp_path / "kept.json").read_text())) == 12


def test_a_stream_of_a_file_whose_name_is_not_utf8_goes_on_with_its_journal(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input named in Latin-1 (the byte 0xe9): a stream of it ran before the journal
    came; with it, journaling the first decision failed, and so did every rerun (exit 2,
    nothing kept). Now it runs, and a rerun after a failure takes the journal's decisions."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / os.fsdecode(b"detail_\xe9.jsonl")
    data.write_text("".join(json.dumps({**RECORD, "id": f"r{i}"}) + "\n" for i in range(6)))
    out = tmp_path / "kept.json"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--target", fake.target, "--no-progress", "--no-retry"]
    fake.curate_abort_after = [2]
    assert cli_main(argv) == 1
    fake.curate_streams.clear()
    assert cli_main(argv) == 0
    assert "(2 decided by an earlier run)" in capsys.readouterr().err
    assert sorted(fake.curate_streams[0]) == ["r2", "r3", "r4", "r5"]
    assert sorted(r["id"] for r in json.loads(out.read_text())) == [f"r{i}" for i in range(6)]


def test_a_finished_run_puts_its_outputs_on_disk_before_it_deletes_its_journal(
    fake: FakeCuration, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out and --report are written by rename: a node lost right after the journal went
    may lose them (a renamed file's data may not be on disk yet) and with the journal gone
    nothing tells the same command what was decided. Both, and their folder, are synced
    to the disk while the journal still exists."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_23k.jsonl"
    data.write_text("".join(json.dumps({**RECORD, "id": f"r{i}"}) + "\n" for i in range(3)))
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    journal = tmp_path / "kept.journal.jsonl"
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), journal.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress"]
    assert cli_main(argv) == 0
    assert not journal.exists()
    for path in (out, report, tmp_path):
        assert (str(path), True) in synced, synced


def test_skip_invalid_makes_a_malformed_record_its_own_error_decision_in_a_stream(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records 2 (no conversations) and 4 (conversations a string) are malformed: with
    --skip-invalid each is an error decision naming its file, place and key, not sent, and
    the stream goes on with the rest; without it the run stops at record 2 (exit 2)."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_23k.jsonl"
    records: list[dict[str, Any]] = [{**RECORD, "id": f"r{i}"} for i in range(6)]
    del records[2]["conversations"]
    records[4]["conversations"] = "Q? A."
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress"]
    assert cli_main([*argv, "--skip-invalid"]) == 0
    assert "6 samples: 4 kept, 0 dropped_question, 0 dropped_answer, 2 error" in (
        capsys.readouterr().err
    )
    assert sorted(fake.curate_streams[0]) == ["r0", "r1", "r3", "r5"]
    errors = {
        d["record"]: d for d in map(json.loads, report.read_text().splitlines()) if d["error"]
    }
    assert sorted(errors) == [2, 4]
    assert errors[2]["id"] == "r2" and errors[2]["file"] == str(data)
    assert errors[2]["error"]["code"] == "INVALID_ARGUMENT"
    assert "record 2 (id 'r2'): conversations:" in errors[2]["error"]["message"]
    assert "record 4 (id 'r4'): conversations:" in errors[4]["error"]["message"]
    assert sorted(r["id"] for r in json.loads(out.read_text())) == ["r0", "r1", "r3", "r5"]
    assert cli_main(argv) == 2
    assert "record 2 (id 'r2')" in capsys.readouterr().err


def test_skip_invalid_reports_the_malformed_records_met_while_the_rest_file_is_written(
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream fails while gRPC's thread waits on a slow read of record 4; records 8
    and 11 are malformed, read only as the rest file is written: each is still an error
    decision in --report. Before, they were in neither the report nor the rest file, so
    going on with the rest file never named them."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_1.jsonl"
    records: list[dict[str, Any]] = [{**RECORD, "id": f"r{i}"} for i in range(12)]
    del records[8]["conversations"]
    del records[11]["conversations"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(stream_cli, "iter_llava", slow_reading(stream_cli.iter_llava, at=4))
    fake.curate_abort_after = [2]
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress", "--no-retry"]
    assert cli_main([*argv, "--skip-invalid"]) == 1
    assert "4 samples: 2 kept, 0 dropped_question, 0 dropped_answer, 2 error" in (
        capsys.readouterr().err
    )
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(d["record"] for d in decisions if d["error"]) == [8, 11]
    rest = (tmp_path / "kept.rest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in rest] == [
        "r2",
        "r3",
        "r4",
        "r5",
        "r6",
        "r7",
        "r9",
        "r10",
    ]


# A log whose file can grow to 1,500 bytes only (RLIMIT_FSIZE: the disk "fills"); run in a
# child process, where the limit holds for nothing else.
_FILLS_UP = """
import json, os, resource, signal, sys
from align2.client.jsonl_log import JsonlLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
path = sys.argv[1]
log = JsonlLog(path, sync_seconds=1.0)
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))
written = 0
for i in range(10):
    try:
        log.append([{"i": i, "pad": "x" * 400}])
    except OSError:
        break
    written += 1
log.close()  # the disk still full
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log = JsonlLog(path)
log.append([{"i": "after"}])
log.close()
print(json.dumps({"written": written, "lines": [e["i"] for e in log.read()]}))
"""


def test_an_append_that_fails_leaves_the_log_as_it_was(tmp_path: pathlib.Path) -> None:
    """The disk fills at the 4th line: the append raises, closing the log does not (its
    line is not written then either: a line the caller was told failed must not appear),
    and the next line, with room again, is a line of its own. Fails on: the failed line
    kept in a write buffer, flushed again on close (OSError from close: exit 2 after a
    JournalWriteError, as bad input)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", _FILLS_UP, str(tmp_path / "j.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    assert outcome == {"written": 3, "lines": [0, 1, 2, "after"]}


def test_a_report_names_a_file_whose_name_is_not_utf8(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    """With --report too, a stream of a Latin-1-named input runs (its name escaped in the
    report's lines, as in the journal's). Fails on: the report line's lone surrogate
    (UnicodeEncodeError: exit 2 after the first decision was journaled, and on every
    rerun, which takes that decision first)."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / os.fsdecode(b"detail_\xe9.jsonl")
    data.write_text("".join(json.dumps({**RECORD, "id": f"r{i}"}) + "\n" for i in range(3)))
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress", "--no-retry"]
    assert cli_main(argv) == 0
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert [d["file"] for d in decisions] == [str(data)] * 3
    assert len(json.loads(out.read_text())) == 3


@pytest.mark.parametrize("decided", [2, 0])
def test_a_finished_run_of_other_inputs_leaves_the_rest_file_of_a_stopped_one(
    decided: int, fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """detail_A's stream fails after 2 decisions, or before any (the rest file holds the
    others); a run of detail_B with the same --out finishes: A's rest file is not B's to
    remove (its records are not decided), and the journal keeps A's decisions. Fails on:
    the rest file removed as "decided now" (with 0 decided, also after the first fix,
    which looked only at decisions left in the journal)."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    for name in ("detail_A.jsonl", "detail_B.jsonl"):
        rows = [json.dumps({**RECORD, "id": f"{name[7]}{i}"}) + "\n" for i in range(6)]
        (tmp_path / name).write_text("".join(rows))
    common = ["--stream", "--image-folder", str(tmp_path), "--out", str(tmp_path / "kept.json")]
    common += ["--target", fake.target, "--no-progress", "--no-retry"]
    fake.curate_abort_after = [decided]
    assert cli_main(["curate", str(tmp_path / "detail_A.jsonl"), *common]) == 1
    rest = tmp_path / "kept.rest.jsonl"
    assert len(rest.read_text().splitlines()) == 6 - decided
    assert cli_main(["curate", str(tmp_path / "detail_B.jsonl"), *common]) == 0
    if decided:
        assert f"kept: {decided} of its decisions are on records this run did not read" in (
            capsys.readouterr().err
        )
    assert len(rest.read_text().splitlines()) == 6 - decided


def test_a_file_size_limit_stops_the_run_as_a_server_failure_and_the_same_command_goes_on(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    """The command in its own process under RLIMIT_FSIZE (writes past 3000 bytes fail with
    EFBIG, as the OS fails them on a full disk): the journal fails first, after a few
    decisions. Exit 1 naming it, not 2 as bad input; without the limit, the same command
    goes on, and every record is decided once."""
    report = tmp_path / "d.jsonl"
    argv = [*stream_of_twelve(fake, tmp_path), "--report", str(report)]
    limited = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)); "
        "from align2.client.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", limited, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stderr
    assert "kept.journal.jsonl: cannot journal a decision: File too large" in run.stderr
    assert "or run the same command again" in run.stderr
    journaled = len((tmp_path / "kept.journal.jsonl").read_text().splitlines())
    assert 0 < journaled < 12
    fake.curate_streams.clear()
    assert cli_main(argv) == 0
    assert len(fake.curate_streams[0]) == 12 - journaled
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(d["record"] for d in decisions) == list(range(12))
    assert len(json.loads((tmp_path / "kept.json").read_text())) == 12


def test_a_report_that_cannot_be_written_stops_the_run_as_a_server_failure(
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The report's 4th line meets a full disk, and so does its close: exit 1 naming the
    report (not 2, as bad input); the 4th decision, journaled, is kept in --out too; the 8
    others are in the rest file. Fails on: the report's OSError read as bad input (exit 2,
    no rest file), and its close's raised in place of the run's failure."""
    report = tmp_path / "d.jsonl"
    argv = [*stream_of_twelve(fake, tmp_path), "--report", str(report)]

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            if len(self.getvalue().splitlines()) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    @contextlib.contextmanager
    def full_disk(path: str) -> Iterator[Full]:
        yield Full()
        raise OSError(errno.ENOSPC, "No space left on device")  # its close: the rest too

    monkeypatch.setattr(stream_cli, "output", full_disk)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{report}: a report line: No space left on device" in err
    assert f"{report} not written either" in err
    assert len(json.loads((tmp_path / "kept.json").read_text())) == 4
    assert len((tmp_path / "kept.rest.jsonl").read_text().splitlines()) == 8
    assert len((tmp_path / "kept.journal.jsonl").read_text().splitlines()) == 4
