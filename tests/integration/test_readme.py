"""The README's client examples work as written (against a real server on port 0)."""

from __future__ import annotations

import ast
import os
import pathlib
import re
from collections.abc import Iterator

import pytest
from support import ServerThread

from align2.server.config import Config, ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def example(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def run_in(folder: pathlib.Path, name: str, server: ServerThread) -> None:
    """Run the example ``name`` against ``server`` in ``folder`` (examples write their output
    files to the working directory), with the repository's examples/ linked in."""
    code = example(name).replace("localhost:50051", server.target)
    (folder / "examples").symlink_to(ROOT / "examples")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path, tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = Config()
    config.models = {name: ModelConfig(path=str(tiny_llava)) for name in ("question", "answer")}
    config.models["llm"] = ModelConfig(path=str(tiny_llm))
    # One Curate sample at a time: the stream's first sample is the first one selected,
    # which the curate example's test relies on (with 64, either could be scored first).
    config.limits.max_stream_inflight = 1
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_score_example_runs_as_written(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_in(tmp_path, "score", server)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # one line for the sample, one per record of examples/
    assert lines[1].startswith("000000000001 ") and lines[1].endswith(" None")


def test_candidates_example_runs_as_written(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_in(tmp_path, "candidates", server)
    scores, best = capsys.readouterr().out.splitlines()
    answers = ("A cat.", "A grey cat on a brown sofa.", "A sofa.")
    candidates, index, mean = scores.rsplit(" ", 2)  # "(s0, s1, s2) best mean"
    assert best == answers[int(index)]
    assert float(mean) == pytest.approx(ast.literal_eval(candidates)[int(index)])


def test_align_example_runs_as_written(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny random LLM writes noise; the code path and the written file are what count."""
    run_in(tmp_path, "align", server)
    out = capsys.readouterr().out.splitlines()
    verdicts = [line for line in out if line.startswith(("original ", "rewrite "))]
    assert len(verdicts) == 3  # one per turn of examples/conversations.json
    from align2.client import read_llava

    written = read_llava(tmp_path / "aligned.json")
    assert [s.id for s in written] == ["000000000001", "000000000002"]


def test_curate_example_runs_as_written(
    server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_in(tmp_path, "curate", server)
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["000000000001", "000000000002"]
    decisions = {line.split()[0]: line.split()[1] for line in lines}
    from align2.client import read_llava

    written = read_llava(tmp_path / "curated.json")
    assert [s.id for s in written] == [i for i, d in decisions.items() if d == "kept"]
    # The first of its task, decided alone: with one slot the warm-up cannot wait (its one
    # in-flight sample waiting releases it), and a window of one score keeps that score.
    assert decisions["000000000001"] == "kept"
