"""The align2 command: parsing, server-command forwarding, and info/score end to end."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import threading
import time
import types
from typing import Any

import grpc
import pytest
from client_fakes import FakeCuration, slow_reading

from align2.client import cli, stream_cli
from align2.client.results import AlignResult, ItemError


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    commands = ("info", "score", "align", "curate", "serve", "build-models", "train-heads")
    for command in (*commands, "train-lora", "convert-reward"):
        assert command in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_score_arguments() -> None:
    namespace = cli.build_parser().parse_args(
        [
            "score",
            "data.json",
            "--image-folder",
            "images/",
            "--target",
            "host:1",
            "--heads",
            "question",
            "--out",
            "r.jsonl",
            "--priority",
            "bulk",
            "--timeout",
            "2.5",
        ]
    )
    assert (namespace.file, namespace.image_folder, namespace.target) == (
        "data.json",
        "images/",
        "host:1",
    )
    assert namespace.heads == ["question"]
    assert (namespace.out, namespace.priority, namespace.timeout) == ("r.jsonl", "bulk", 2.5)
    assert namespace.chunk_size == 64


def test_score_defaults() -> None:
    namespace = cli.build_parser().parse_args(["score", "data.json"])
    assert namespace.heads == ["question", "answer"]
    assert (namespace.target, namespace.out, namespace.image_folder) == (
        "localhost:50051",
        "-",
        None,
    )


def test_unknown_head_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["score", "data.json", "--heads", "question,reward"])
    assert raised.value.code == 2
    assert "valid heads are ['answer', 'question']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["serve", "build-models", "train-heads", "train-lora", "convert-reward"]
)
def test_server_commands_are_forwarded(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    received: list[list[str]] = []
    fake_module = types.ModuleType("align2.server.cli")
    fake_module.main = lambda argv: received.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "align2.server.cli", fake_module)
    assert cli.main([command, "--port", "1", "--help"]) == 0
    assert received == [[command, "--port", "1", "--help"]]


def test_server_command_without_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "align2.server.cli", None)  # import fails
    assert cli.main(["serve"]) == 2
    assert "align2[server]" in capsys.readouterr().err


def test_info(fake: FakeCuration, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--target", fake.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "9.9.9"
    assert info["limits"]["max_samples_per_call"] == 64
    # a limit of 0 is printed (Fails on: proto3 JSON leaving zeros out)
    assert info["limits"]["max_stream_inflight"] == 0


def write_dataset(folder: pathlib.Path) -> pathlib.Path:
    (folder / "images").mkdir()
    records = []
    for i in range(3):
        records.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat?"},
                    {"from": "gpt", "value": "x" * (i + 1)},
                ],
            }
        )
        if i != 1:  # the image of record 1 is missing
            (folder / "images" / f"{i}.jpg").write_bytes(b"jpeg")
    path = folder / "conversation_58k.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_score(fake: FakeCuration, folder: pathlib.Path, *extra: str) -> tuple[int, list[Any]]:
    data = write_dataset(folder)
    out = folder / "results.jsonl"
    status = cli.main(
        [
            "score",
            str(data),
            "--image-folder",
            str(folder / "images"),
            "--target",
            fake.target,
            "--out",
            str(out),
            "--chunk-size",
            "2",
            "--no-progress",
            *extra,
        ]
    )
    lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    return status, [json.loads(line) for line in lines]


def test_score_streams_jsonl_results(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, results = run_score(fake, tmp_path, "--heads", "question,answer")
    assert status == 0
    assert [r["id"] for r in results] == ["0", "1", "2"]
    assert results[0]["question_score"] == 0.0 and results[2]["answer_scores"] == [3.0]
    assert results[1]["error"]["code"] == "NOT_FOUND"
    assert results[1]["question_score"] is None
    assert [[s.id for s in r.samples] for r in fake.requests] == [["0"], ["2"]]
    assert fake.requests[0].samples[0].task == "conversation"
    assert "3 samples, 1 item errors" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expected"), [((), 0), (("--max-errors", "1"), 0),
                                                  (("--max-errors", "0"), 3)])  # fmt: skip
def test_score_exits_3_when_more_items_fail_than_max_errors_allows(
    extra: tuple[str, ...],
    expected: int,
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Per-item errors are data (every line written), but a pipeline can say how many it
    takes: 1 of 3 here (record 1's image is missing)."""
    status, results = run_score(fake, tmp_path, *extra)
    assert status == expected and len(results) == 3
    assert (
        "1 of 3 items failed: more than --max-errors 0 (exit 3)" in capsys.readouterr().err
    ) is (expected == 3)


@pytest.mark.parametrize("command", ["score", "curate --stream", "align"])
def test_a_run_where_every_item_failed_exits_3_with_its_outputs_written(
    command: str,
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong image folder (or server) fails every item: exit 3 by default, not 0, with
    the outputs written as for any finished run."""

    def align(self: object, samples: list[Any], **options: Any) -> list[Any]:
        failed = ItemError(grpc.StatusCode.NOT_FOUND, "image: no such file")
        return [AlignResult(id=s.id, error=failed) for s in samples]

    monkeypatch.setattr(cli.CurationClient, "align", align)
    data = write_dataset(tmp_path)
    out = tmp_path / "out.json"
    argv = [*command.split(), str(data), "--image-folder", str(tmp_path / "no such folder")]
    argv += ["--target", fake.target, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 3
    assert "3 of 3 items failed: every item failed (exit 3)" in capsys.readouterr().err
    assert out.exists()  # written all the same
    if command == "score":
        assert [json.loads(line)["error"]["code"] for line in out.read_text().splitlines()] == [
            "NOT_FOUND"
        ] * 3
    # Told to take them all: 0.
    assert cli.main([*argv, "--max-errors", "3"]) == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "many"])
def test_max_errors_below_0_or_not_whole_is_refused_naming_the_flag(
    value: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", str(data), "--max-errors", value])
    assert exited.value.code == 2
    assert "argument --max-errors:" in capsys.readouterr().err


def test_score_sends_the_token_from_the_environment(
    fake: FakeCuration, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    run_score(fake, tmp_path, "--heads", "question")
    assert {m["authorization"] for m in fake.metadata} == {"Bearer from-env"}
    assert list(fake.requests[0].heads) == [1]


def test_rpc_failure_exits_1(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail_next = [grpc.StatusCode.PERMISSION_DENIED]
    status, _ = run_score(fake, tmp_path)
    assert status == 1
    assert "PERMISSION_DENIED: injected failure" in capsys.readouterr().err


def test_bad_input_file_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "1"}]', encoding="utf-8")
    assert cli.main(["score", str(path), "--target", "127.0.0.1:1"]) == 2
    assert "record 0 (id '1'): conversations" in capsys.readouterr().err


def test_an_output_in_a_missing_folder_is_refused_before_any_call(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path)
    out = str(tmp_path / "nope" / "results.jsonl")
    for command in (
        ["score", "--out", out],
        ["align", "--out", out],
        ["curate", "--stream", "--out", out],
        ["curate", "--out", str(tmp_path / "kept.json"), "--report", out],
    ):
        status = cli.main([*command[:1], str(data), *command[1:], "--target", fake.target])
        assert status == 2, command
        assert "no such folder" in capsys.readouterr().err
    assert fake.requests == [] and fake.curated == []


def test_an_output_that_is_not_a_regular_file_is_checked_itself_not_its_folder(
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--out /dev/null`` as a user other than root: /dev is not writable, /dev/null is
    (as here, a FIFO in a folder the check is told is read-only). Before, the command was
    refused (exit 2), though its outputs write such a path as it is."""
    data = write_dataset(tmp_path)
    folder = tmp_path / "readonly"
    folder.mkdir()
    fifo = folder / "kept.json"
    os.mkfifo(fifo)
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, m: real(p, m) and pathlib.Path(p) != folder)
    drained = []
    reader = threading.Thread(target=lambda: drained.append(fifo.read_text()), daemon=True)
    reader.start()
    argv = ["curate", str(data), "--stream", "--out", str(fifo), "--target", fake.target]
    argv += ["--image-folder", str(tmp_path / "images")]
    assert cli.main([*argv, "--no-progress", "--min-window", "1"]) == 0, capsys.readouterr().err
    reader.join(timeout=10)
    assert len(json.loads(drained[0])) == len(fake.curated)
    monkeypatch.setattr(cli.os, "access", lambda p, m: False)
    assert cli.main([*argv, "--no-progress"]) == 2
    assert "kept.json' is not writable" in capsys.readouterr().err


def test_a_stopped_score_leaves_the_previous_output_and_its_lines_so_far(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "from a finished run"}\n', encoding="utf-8")
    fake.fail_scores_after = 1  # the second chunk's call fails, retries too
    status, results = run_score(fake, tmp_path)
    assert status == 1 and results == [{"id": "from a finished run"}]
    partial = tmp_path / "results.jsonl.partial"
    assert [json.loads(line)["id"] for line in partial.read_text().splitlines()] == ["0", "1"]
    assert "results.jsonl.partial" in capsys.readouterr().err
    fake.fail_scores_after = None
    argv = ["score", str(tmp_path / "conversation_58k.json"), "--out", str(out)]
    argv += ["--image-folder", str(tmp_path / "images"), "--target", fake.target]
    assert cli.main([*argv, "--no-progress"]) == 0  # a finished run replaces the output
    assert len(out.read_text().splitlines()) == 3 and not partial.exists()


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "server gone"


def test_align_writes_the_samples_it_aligned_when_a_call_fails(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []

    def align(self: object, samples: list[Any], **options: Any) -> list[Any]:
        calls.append([s.id for s in samples])
        if len(calls) > 1:
            raise _Unavailable()
        return [AlignResult(id=s.id, sample=s) for s in samples]

    monkeypatch.setattr(cli.CurationClient, "align", align)
    data, out = write_dataset(tmp_path), tmp_path / "aligned.json"
    status = cli.main(["align", str(data), "--out", str(out), "--chunk-size", "2", "--no-progress"])
    assert status == 1 and calls == [["0", "1"], ["2"]]
    assert [r["id"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["0", "1"]
    err = capsys.readouterr().err
    assert "UNAVAILABLE: server gone; 2 aligned samples written" in err
    assert "1 not done, from record 2 (id '2') on" in err
    # A run that aligned nothing leaves a previous output as it was.
    calls.append(["the next call fails at once"])
    status = cli.main(["align", str(data), "--out", str(out), "--chunk-size", "2", "--no-progress"])
    assert status == 1 and len(json.loads(out.read_text(encoding="utf-8"))) == 2
    assert f"nothing aligned, {out} left as it was" in capsys.readouterr().err


def test_a_curate_stream_stopped_by_a_bad_record_writes_what_it_kept(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = {"image": "a.jpg", "conversations": [{"from": "human", "value": "Q?"},
                                                   {"from": "gpt", "value": "A."}]}  # fmt: skip
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    lines = [{**record, "id": "0"}, {**record, "id": "1"}, {"id": "2"}]
    data = tmp_path / "detail_23k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    out = tmp_path / "kept.json"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    status = cli.main([*argv, "--target", fake.target, "--no-progress"])
    assert status == 2
    assert [r["id"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["0", "1"]
    assert "record 2 (id '2')" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), cli._sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_score_to_dev_null_writes_through_it(fake: FakeCuration, tmp_path: pathlib.Path) -> None:
    """An output that is not a regular file (/dev/null, a FIFO) is written as it is: no
    .partial beside it, nothing replaced."""
    data = write_dataset(tmp_path)
    argv = ["score", str(data), "--image-folder", str(tmp_path / "images"), "--out", os.devnull]
    assert cli.main([*argv, "--target", fake.target, "--no-progress"]) == 0
    assert not os.path.isfile(os.devnull) and not os.path.exists(os.devnull + ".partial")


@pytest.mark.parametrize("command", ["score", "curate --stream"])
def test_a_progress_bar_on_a_terminal_only(
    command: str,
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipeline's log (stderr not a terminal) gets no bar frames; a terminal gets the bar."""
    data = write_dataset(tmp_path)
    argv = [*command.split(), str(data), "--image-folder", str(tmp_path / "images")]
    argv += ["--target", fake.target, "--chunk-size", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.out")]) == 0
    assert "sample" not in capsys.readouterr().err.replace("samples", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main([*argv, "--out", str(tmp_path / "b.out")]) == 0
    assert "sample/s" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "nan", "a lot"])
def test_a_keep_share_out_of_range_is_refused_naming_the_flag(
    value: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path)
    argv = ["curate", str(data), "--out", str(tmp_path / "k.json"), "--answer-keep", value]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "argument --answer-keep:" in capsys.readouterr().err


def test_a_failed_curate_stream_leaves_the_records_not_decided_to_go_on_with(
    fake: FakeCuration, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream fails after 2 decisions (2 more read and unanswered): the records not
    decided, then those never sent, go to kept.rest.jsonl in input order; the same command
    on it decides each of them once, and none of the first run's."""
    record = {"image": "a.jpg", "conversations": [{"from": "human", "value": "Q?"},
                                                   {"from": "gpt", "value": "A."}]}  # fmt: skip
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_23k.jsonl"
    data.write_text("".join(json.dumps({**record, "id": f"r{i}"}) + "\n" for i in range(12)))
    out, report, rest = tmp_path / "kept.json", tmp_path / "d.jsonl", tmp_path / "kept.rest.jsonl"
    argv = ["curate", "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress", "--no-retry"]
    fake.curate_abort_after = [2]
    assert cli.main([*argv[:1], str(data), *argv[1:]]) == 1
    assert str(rest) in capsys.readouterr().err
    first = [json.loads(line)["id"] for line in report.read_text().splitlines()]
    left = [json.loads(line)["id"] for line in rest.read_text().splitlines()]
    assert first == ["r0", "r1"]
    assert left == [f"r{i}" for i in range(2, 12)]  # input order: unanswered, then unsent
    # As read, with the task the file's name gave it (the rest file's name gives none).
    assert json.loads(rest.read_text().splitlines()[0]) == {**record, "id": "r2", "task": "detail"}
    assert cli.main([*argv[:1], str(rest), *argv[1:]]) == 0
    second = [json.loads(line)["id"] for line in report.read_text().splitlines()]
    assert sorted(second) == sorted(left)


def test_the_rest_file_holds_what_grpc_was_still_reading_when_the_stream_failed(
    fake: FakeCuration, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading record 4 is slow (a slow disk): the stream fails meanwhile, while gRPC's
    thread is inside the input; the rest file still holds every record not decided."""
    record = {"image": "a.jpg", "conversations": [{"from": "human", "value": "Q?"},
                                                   {"from": "gpt", "value": "A."}]}  # fmt: skip
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_1.jsonl"
    data.write_text("".join(json.dumps({**record, "id": f"r{i}"}) + "\n" for i in range(12)))
    monkeypatch.setattr(stream_cli, "iter_llava", slow_reading(stream_cli.iter_llava, at=4))
    fake.curate_abort_after = [2]
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path)]
    argv += ["--out", str(tmp_path / "kept.json"), "--target", fake.target, "--no-progress"]
    assert cli.main([*argv, "--no-retry"]) == 1
    rest = (tmp_path / "kept.rest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in rest] == [f"r{i}" for i in range(2, 12)]
