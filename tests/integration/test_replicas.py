"""Past one machine: ``align2 curate FILE...`` (the exact selection) against two replicas,
real servers as child processes on 127.0.0.1 with the same tiny models, gives what it gives
against one, and both replicas serve its calls.

Each replica batches one item at a time, so a score does not depend on its batch-mates and
two replicas of the same model folder score a sample bit for bit alike.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator

import pytest
from support import ServerProcess, png

from align2.client.cli import main as cli_main

TASKS = ("conversation", "detail")
PER_TASK = 20


def serve(config: pathlib.Path, log: pathlib.Path) -> ServerProcess:
    args = ["--config", str(config), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
    return ServerProcess(args, log).start()


def write_config(path: pathlib.Path, model: pathlib.Path, question_revision: str = "") -> None:
    """Both heads on ``model``, batches of one; ``question_revision`` overrides the
    question model's reported revision (a replica mid-rollout)."""
    revision = f'revision = "{question_revision}"\n' if question_revision else ""
    path.write_text(
        "[batching]\nmax_batch_size = 1\n"
        f'[models.question]\npath = "{model}"\n{revision}'
        f'[models.answer]\npath = "{model}"\n'
    )


@pytest.fixture(scope="module")
def replicas(
    tiny_llava: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    folder = tmp_path_factory.mktemp("replicas")
    config = folder / "align2.toml"
    write_config(config, tiny_llava)
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            started.append(serve(config, folder / f"{name}.log"))
        yield started
    finally:
        for server in started:
            server.stop()


def score_calls(server: ServerProcess) -> int:
    """Score RPCs the replica finished, from its request log (one JSON line per RPC)."""
    count = 0
    for line in server.log.read_text().splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        count += record.get("rpc") == "Score" and record.get("code") == "OK"
    return count


def served_since(replicas: list[ServerProcess], before: list[int], calls: int) -> list[int]:
    """Score RPCs each replica logged since ``before``, once ``calls`` are logged in all
    (a replica writes its line as the RPC ends, which may be just after the client read
    the reply), or what is logged after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        served = [score_calls(r) - b for r, b in zip(replicas, before, strict=True)]
        if sum(served) >= calls or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


def write_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """One file per task type; conversations of one to three turns."""
    paths = []
    for t, task in enumerate(TASKS):
        records = []
        for i in range(PER_TASK):
            image = f"{task}-{i}.png"
            (folder / image).write_bytes(png(16 + i, 20 + t, (i * 12 % 255, 90 * t, 90)))
            conversations = []
            for k in range(1 + i % 3):
                question = f"What is thing {i} number {k}?"
                conversations += [
                    {"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                    {"from": "gpt", "value": f"It is {'a big ' * (i % 4)}thing {i + k}."},
                ]
            records.append({"id": f"{task[:4]}{i}", "image": image, "conversations": conversations})
        path = folder / f"{task}_test.json"
        path.write_text(json.dumps(records))
        paths.append(path)
    return paths


def curate(folder: pathlib.Path, name: str, targets: list[str]) -> dict[str, object]:
    """Run the command into ``folder/name.*``; the output, scores and report it wrote."""
    folder.mkdir()
    out, report = folder / f"{name}.json", folder / f"{name}.report.json"
    args = [*write_files(folder), "--image-folder", folder, "--out", out, "--report", report]
    for target in targets:
        args += ["--target", target]
    assert cli_main(["curate", *map(str, args), "--chunk-size", "4", "--no-progress"]) == 0
    summary = json.loads(report.read_text())
    del summary["output"], summary["scores_file"]  # paths in ``folder``
    summary["files"] = {pathlib.Path(path).name: n for path, n in summary["files"].items()}
    scores = sorted(pathlib.Path(f"{out}.scores.jsonl").read_text().splitlines())
    return {"kept": out.read_bytes(), "scores": scores, "report": summary}


def test_offline_curation_over_two_replicas_equals_one(
    replicas: list[ServerProcess], tmp_path: pathlib.Path
) -> None:
    one, two = replicas
    alone = curate(tmp_path / "one", "out", [one.target])
    before = [score_calls(server) for server in replicas]
    both = curate(tmp_path / "two", "out", [one.target, two.target])
    # Chunks of 4 across task types: the 40 records' questions, then the answers of the 12
    # question-kept (int(0.3 * 20) per task type).
    calls = 40 // 4 + 12 // 4
    served = served_since(replicas, before, calls)
    assert both == alone  # the kept records, every stored score, the report
    assert json.loads(alone["kept"])  # type: ignore[arg-type]
    assert sum(served) == calls and min(served) > 0, served


def test_a_replica_with_another_model_revision_stops_the_run(
    replicas: list[ServerProcess],
    tiny_llava: pathlib.Path,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Mid-rollout, replicas serve two revisions: the exact selection must not mix their
    scores. Every Score reply names its revision, and the run stops at the first that is
    not the one GetServerInfo reported (the scores so far are kept for a rerun)."""
    config = tmp_path / "rolled.toml"
    write_config(config, tiny_llava, question_revision="next")
    rolled = serve(config, tmp_path / "rolled.log")
    try:
        folder = tmp_path / "run"
        folder.mkdir()
        args = [*write_files(folder), "--image-folder", folder, "--out", folder / "out.json"]
        targets = ["--target", replicas[0].target, "--target", rolled.target]
        status = cli_main(
            ["curate", *map(str, args), *targets, "--chunk-size", "4", "--no-progress"]
        )
    finally:
        rolled.stop()
    assert status == 1
    assert "question head changed during the run" in capsys.readouterr().err
    assert not (folder / "out.json").exists()
