"""Curate calibration: thresholds with the offline cut (the last kept record's score), from
lists and from files; the selection options the clients and the CLI send with them."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest
from client_fakes import FAST_RETRY, FakeCuration
from hypothesis import given
from hypothesis import strategies as st

from align2.client import AsyncCurationClient, CurationClient, Sample, Turn, cli
from align2.client.calibration import Calibration, calibrate, calibrate_files, float32_at_most
from align2.client.calibration import main as calibration_main
from align2.client.curate import CurateStream
from align2.client.selection import question_stage

float32s = st.floats(-100, 100, allow_nan=False, width=32)


@given(st.lists(float32s, min_size=1, max_size=60, unique=True), st.floats(0.05, 1.0))
def test_a_threshold_keeps_exactly_what_the_offline_cut_keeps(
    scores: list[float], fraction: float
) -> None:
    calibration = calibrate({"t": scores}, question_keep=fraction)
    offline = set(question_stage(scores, fraction))
    threshold = calibration.question_thresholds.get("t")
    if not offline:  # int(fraction * N) == 0: no threshold, the server's window decides
        assert threshold is None
        return
    assert threshold is not None
    assert {i for i, s in enumerate(scores) if s >= threshold} == offline


def test_the_answer_stage_ranks_the_question_kept_in_input_order() -> None:
    questions = {"detail": [5.0, 1.0, 4.0, 3.0, 2.0, 6.0], "other": [1.0]}
    answers = {"detail": [0.5, None, 0.7, 0.1, None, 0.2]}  # only the question-kept matter
    calibration = calibrate(questions, answers, question_keep=0.5, answer_keep=0.5)
    # Question: top int(0.5 x 6) = 3 of 6 are 6, 5, 4 (threshold 4); answer: their means
    # in input order 0.5, 0.7, 0.2, top int(0.5 x 3) = 1 (threshold 0.7).
    assert calibration.question_thresholds == {"detail": 4.0}  # "other": int(0.5) keeps none
    assert calibration.answer_thresholds == {"detail": float32_at_most(0.7)}
    assert calibration.question_seed_scores["detail"] == questions["detail"]
    assert calibration.answer_seed_scores == {"detail": [0.5, 0.7, 0.2]}
    assert (calibration.tasks["detail"].question_kept, calibration.tasks["detail"].answer_kept) == (
        3,
        1,
    )
    with pytest.raises(ValueError, match=r"answer_scores\['detail'\]\[2\]: missing"):
        calibrate(questions, {"detail": [0.5, None, None]}, question_keep=0.5)


@pytest.mark.parametrize("value", [0.7, -0.7, 1e-46, -1e-46, 3.0])
def test_thresholds_are_rounded_down_to_float32(value: float) -> None:
    rounded = float32_at_most(value)
    assert rounded <= value
    assert struct.unpack("<f", struct.pack("<f", rounded))[0] == rounded  # a float32
    assert value - rounded < 1e-6 * max(1.0, abs(value)) or abs(value) < 1e-40


def test_files_of_score_results_with_tasks_by_file_or_record(tmp_path: pathlib.Path) -> None:
    scores = tmp_path / "scores.jsonl"
    lines = [
        {"id": "a", "question_score": 3.0, "answer_scores": [1.0, 2.0], "error": None},
        {"id": "b", "question_score": 2.0, "answer_score": 0.5, "error": None},
        {"id": "c", "question_score": None, "error": {"code": "INVALID_ARGUMENT"}},  # skipped
        {"id": "d", "question_score": 1.0, "answer_score": None, "task": "other"},
    ]
    scores.write_text("".join(json.dumps(line) + "\n" for line in lines))
    calibration = calibrate_files([scores], tasks={str(scores): "detail"}, question_keep=0.5)
    assert calibration.question_thresholds == {"detail": 3.0}
    assert calibration.answer_seed_scores == {"detail": [1.5]}  # "other" has no answers
    assert calibration.tasks["detail"].records == 2 and "other" in calibration.tasks
    with pytest.raises(ValueError, match=r"scores.jsonl:1: no task"):
        calibrate_files([scores])


def test_an_offline_report_gives_its_thresholds(tmp_path: pathlib.Path) -> None:
    report = tmp_path / "report.json"
    stage = {"candidates": 10, "kept": 3, "scores": {"threshold": 1.25}}
    tasks = {"detail": {"records": 10, "question": stage, "answer": {**stage, "kept": 1}}}
    procedure = {"question_keep": 0.3, "answer_keep": 0.3}
    report.write_text(json.dumps({"procedure": procedure, "tasks": tasks}))
    calibration = calibrate_files([report])
    assert calibration.thresholds() == {
        "question_thresholds": {"detail": 1.25},
        "answer_thresholds": {"detail": 1.25},
    }
    assert calibration.seeds() == {"question_seed_scores": {}, "answer_seed_scores": {}}


def test_the_command_writes_a_file_that_loads_back(tmp_path: pathlib.Path) -> None:
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"question_score": float(i)}) + "\n" for i in range(10)))
    out = tmp_path / "cal.json"
    assert calibration_main([f"detail={scores}", "--out", str(out)]) == 0
    loaded = Calibration.load(out)
    assert loaded.question_thresholds == {"detail": 7.0}  # top int(0.3 x 10) = 3: 9, 8, 7
    assert loaded == calibrate({"detail": [float(i) for i in range(10)]})
    assert calibration_main([str(scores), "--out", str(out)]) == 2  # no task anywhere
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a calibration file"):
        Calibration.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------
# The options the clients send


def test_plan_puts_the_selection_options_in_the_first_message() -> None:
    stream = CurateStream.plan(
        selection_key="pipeline-7",
        question_thresholds={"detail": 1.5},
        answer_thresholds={"detail": -0.25},
        min_window=32,
        question_seed_scores={"detail": [1.0, 2.0]},
        answer_seed_scores={"conversation": [0.5]},
    )
    options = stream.options
    assert options.selection_key == "pipeline-7"
    assert dict(options.question_thresholds) == {"detail": 1.5}
    assert dict(options.answer_thresholds) == {"detail": -0.25}
    assert options.HasField("min_window") and options.min_window == 32
    assert list(options.question_seed_scores["detail"].scores) == [1.0, 2.0]
    assert list(options.answer_seed_scores["conversation"].scores) == [0.5]
    assert not CurateStream.plan().options.HasField("min_window")  # the server's default


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_window": 0}, r"min_window: 0 is not at least 1"),
        ({"question_thresholds": {"d": float("inf")}}, r"question_thresholds: task 'd'"),
        ({"answer_seed_scores": {"d": [float("nan")]}}, r"answer_seed_scores: task 'd'"),
        ({"selection_key": "k" * 257}, r"selection_key: 257 characters"),
    ],
)
def test_bad_selection_options_are_refused_before_any_io(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CurateStream.plan(**settings)  # type: ignore[arg-type]


def sample(i: int) -> Sample:
    return Sample(id=f"s{i}", image=b"png", turns=[Turn("What?", "x")])


def test_both_clients_pass_the_selection_options_through(fake: FakeCuration) -> None:
    calibration = calibrate({"detail": [1.0, 2.0, 3.0, 4.0]})
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        list(client.curate([sample(0)], selection_key="k", min_window=5, **calibration.seeds()))

    async def run() -> None:
        async with AsyncCurationClient(fake.target, retry=FAST_RETRY) as client:
            results = client.curate([sample(1)], selection_key="k", **calibration.thresholds())
            _ = [r async for r in results]

    import asyncio

    asyncio.run(run())
    sync_options, async_options = fake.curate_options
    assert (sync_options.selection_key, sync_options.min_window) == ("k", 5)
    assert list(sync_options.question_seed_scores["detail"].scores) == [1.0, 2.0, 3.0, 4.0]
    assert dict(async_options.question_thresholds) == {"detail": 4.0}
    assert not async_options.HasField("min_window")


def test_the_cli_sends_the_online_selection_flags_with_stream_only(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    data = tmp_path / "detail_23k.json"
    image = tmp_path / "0.jpg"
    image.write_bytes(b"jpeg")
    conversation = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]
    data.write_text(json.dumps([{"id": "0", "image": "0.jpg", "conversations": conversation}]))
    cal = tmp_path / "cal.json"
    calibrate({"detail": [1.0, 2.0, 3.0, 4.0]}).save(cal)
    args = ["curate", str(data), "--image-folder", str(tmp_path), "--out", str(tmp_path / "o")]
    args += ["--target", fake.target, "--no-progress", "--selection-key", "run-1"]
    args += ["--thresholds", str(cal), "--seed-scores", str(cal), "--min-window", "7"]
    assert cli.main([*args, "--stream"]) == 0
    [options] = fake.curate_options
    assert (options.selection_key, options.min_window) == ("run-1", 7)
    assert dict(options.question_thresholds) == {"detail": 4.0}
    assert list(options.question_seed_scores["detail"].scores) == [1.0, 2.0, 3.0, 4.0]
    assert cli.main(args) == 2  # the exact selection has no windows to share or seed
