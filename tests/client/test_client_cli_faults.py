"""The align2 command under faults a pipeline meets: a signal that lands while a Curate
decision is being recorded, an input file that is not UTF-8, the module run as a script."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import IO, Any

import pytest
from client_fakes import FakeCuration

from align2.client import cli, stream_cli

RECORD = {
    "image": "a.jpg",
    "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}],
}


class _SignalOnWrite:
    """A report whose ``at``-th line brings SIGTERM (a pod stopping while a slow report
    target, a FIFO or a network disk, takes the line)."""

    def __init__(self, out: IO[str], at: int) -> None:
        self._out, self._at, self._lines = out, at, 0

    def write(self, text: str) -> int:
        self._lines += 1
        if self._lines == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self._out.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


@pytest.mark.parametrize("at", [1, 3, 12])
def test_sigterm_while_a_decision_is_recorded_loses_no_record(
    at: int,
    fake: FakeCuration,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every record read is, after the stop, either kept in --out or listed in the rest file
    (the fake keeps every sample it decides), once: Fails on: the decision whose report line
    was being written when SIGTERM came was in neither (taken off the records not decided,
    not yet added to the kept)."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    data = tmp_path / "detail_1.jsonl"
    data.write_text("".join(json.dumps({**RECORD, "id": f"r{i}"}) + "\n" for i in range(12)))
    real_output = stream_cli.output

    @contextlib.contextmanager
    def signalling(path: str) -> Iterator[Any]:
        with real_output(path) as out:
            yield _SignalOnWrite(out, at)

    monkeypatch.setattr(stream_cli, "output", signalling)
    out, report = tmp_path / "kept.json", tmp_path / "d.jsonl"
    argv = ["curate", str(data), "--stream", "--image-folder", str(tmp_path), "--out", str(out)]
    argv += ["--report", str(report), "--target", fake.target, "--no-progress"]
    status = cli.main(argv)
    assert status == 130, capsys.readouterr().err
    kept = [r["id"] for r in json.loads(out.read_text())] if out.exists() else []
    rest_file = tmp_path / "kept.rest.jsonl"
    rest = [json.loads(line)["id"] for line in rest_file.read_text().splitlines()]
    assert sorted(kept + rest, key=lambda i: int(i[1:])) == [f"r{i}" for i in range(12)]
    assert len(kept) >= at  # the decision being recorded was recorded


def test_a_file_that_is_not_utf8_is_named_with_its_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails on: "'utf-8' codec can't decode byte 0xff in position 131: invalid start byte"
    with neither the file nor the line (the position counted in a buffer of the reader)."""
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    lines = [json.dumps({**RECORD, "id": f"r{i}"}).encode() for i in range(5)]
    lines[3] = lines[3].replace(b"Q?", b"Q\xff?")
    data = tmp_path / "detail_1.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    listed = tmp_path / "detail_2.json"
    listed.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    for path, line in ((data, 4), (listed, 5)):
        argv = ["curate", str(path), "--image-folder", str(tmp_path)]
        argv += ["--out", str(tmp_path / "k.json"), "--target", "127.0.0.1:1", "--skip-invalid"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path}: line {line}" in err and "not valid UTF-8" in err and "0xff" in err


def test_the_cli_module_run_as_a_script_runs_the_command() -> None:
    """``python -m align2.client.cli`` is the command too. Fails on: exit 0, nothing done
    (the module had no __main__ block)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "align2.client.cli", "curate", "--stream"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "the following arguments are required" in done.stderr


def test_an_image_file_larger_than_a_message_is_an_item_error_without_reading_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on: the whole file was read first (a 3 GiB image: 6.3 GB of memory, then
    protobuf's EncodeError, which stopped `align2 score` with a traceback and
    `curate --stream` without writing what it had kept)."""
    from align2.client.calls import encode_chunk
    from align2.client.types import Sample, Turn

    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(2 * 1024 * 1024)  # sparse: 2 MiB against a 1 MiB message
    (tmp_path / "small.png").write_bytes(b"png")
    turns = [Turn("Q?", "A.")]
    samples = [Sample("big", big, turns), Sample("small", tmp_path / "small.png", turns)]
    real = Sample.image_bytes

    def read(self: Sample) -> bytes:
        assert self.id != "big", "the oversized image was read"
        return real(self)

    monkeypatch.setattr(Sample, "image_bytes", read)
    encoded = encode_chunk(samples, max_message_bytes=1024 * 1024)
    error = encoded.local_errors[0]
    assert error is not None and "is 2097152 bytes" in error.message and "not read" in error.message
    assert encoded.local_errors[1] is None and [m.id for m in encoded.sent] == ["small"]


def test_a_sync_producer_that_raises_keyboard_interrupt_gets_its_decisions_then_it(
    fake: FakeCuration,
) -> None:
    """Fails on: the producer's KeyboardInterrupt ended gRPC's request thread and the call
    never ended (the caller waited forever after the decisions)."""
    import threading

    from align2.client import CurationClient, Sample, Turn

    def produce() -> Iterator[Sample]:
        yield Sample(id="a", image=b"png", turns=[Turn("Q?", "A.")])
        yield Sample(id="b", image=b"png", turns=[Turn("Q?", "A.")])
        raise KeyboardInterrupt

    seen: list[str] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            with CurationClient(fake.target, retry=False) as client:
                seen.extend(r.id for r in client.curate(produce()))
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "curate() never ended"
    assert seen == ["a", "b"] and len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)


async def test_an_async_producer_whose_await_was_cancelled_gets_its_decisions_then_it(
    fake: FakeCuration,
) -> None:
    """An async producer that awaited a task someone cancelled raises CancelledError: the
    decisions on what it sent, then that error. Fails on: the call never ended."""
    import asyncio

    from align2.client import AsyncCurationClient, Sample, Turn

    async def produce() -> Any:
        for name in ("a", "b"):
            await asyncio.sleep(0)
            yield Sample(id=name, image=b"png", turns=[Turn("Q?", "A.")])
        gone = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        gone.cancel()
        await gone

    seen: list[str] = []

    async def run() -> None:
        async with AsyncCurationClient(fake.target, retry=False) as client:
            async for result in client.curate(produce()):
                seen.append(result.id)

    task = asyncio.ensure_future(run())
    done, _ = await asyncio.wait({task}, timeout=20)
    if not done:
        task.cancel()
    assert done, "curate() never ended"
    with pytest.raises(asyncio.CancelledError):
        task.result()
    assert seen == ["a", "b"]


def test_a_scores_line_that_is_not_utf8_is_ignored_and_counted(tmp_path: pathlib.Path) -> None:
    """As any other unreadable line (module doc). Fails on: UnicodeDecodeError for the whole
    file, which `align2 curate` reported without the file's name, exit 2, on every rerun."""
    from align2.client.scorestore import HEAD_QUESTION, Scorer, ScoreStore

    path = tmp_path / "s.jsonl"
    scorer = Scorer(HEAD_QUESTION, "r", "t", "s")
    with ScoreStore(path) as store:
        store.add([(scorer.key("a", "d1"), 1.5)])
    with path.open("ab") as f:
        f.write(b'{"id": "\xff\xfe torn\n')
    with ScoreStore(path) as store:
        store.add([(scorer.key("b", "d2"), 2.5)])
    with ScoreStore(path) as store:
        assert store.ignored_lines == 1 and store.loaded == 2
        assert store.get(scorer.key("a", "d1")) == 1.5 and store.get(scorer.key("b", "d2")) == 2.5
