"""Curate end to end: a real server on 127.0.0.1:0 (tiny LLaVA reward models, a tiny random
Llama as the inner LLM), streamed to through align2.client, sync and asyncio."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support import ServerThread, error_details, full_config, metric, png, score_config

from align2.client import AsyncCurationClient, CurateResult, CurationClient, Sample, Turn
from align2.client.cli import main as cli_main
from align2.client.convert import sample_to_proto
from align2.server import errors, memory, metrics
from align2.server.core import curation, scoring
from align2.server.core.selection import TaskSelectors
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

TASKS = ("conversation", "detail")


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path, tiny_llm: pathlib.Path) -> Iterator[ServerThread]:
    config = full_config(tiny_llava, tiny_llm, max_new_tokens=6)
    config.limits.max_image_bytes = 200_000
    # One sample at a time: selection order is input order, so the test can recompute it.
    config.limits.max_stream_inflight = 1
    # And one sample's inputs in one batch, mostly (the batcher waits up to this delay for
    # inputs admitted together): Score and Curate then form the same batches and give the
    # same numbers to the last bit. A turn prepared later than that on a busy machine runs
    # in the next batch, without its conversation's shared prefix (~1e-6 apart): the
    # calibration test allows for it.
    config.batching.max_delay_ms = 50
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[CurationClient]:
    with CurationClient(server.target, timeout=120) as c:
        yield c


def sample(i: int) -> Sample:
    return Sample(
        id=f"s{i}",
        image=png(16 + i, 20, (i * 20 % 255, 90, 30)),
        task=TASKS[i % 2],
        turns=[
            Turn(f"<image>\nWhat is item {i}?", f"Item {i} is a {'red ' * (i % 3)}box."),
            Turn("And its size?", f"About {i + 2} cm."),
        ][: 1 + i % 2],
    )


def test_every_sample_gets_the_decision_its_scores_and_the_method_imply(
    client: CurationClient,
) -> None:
    samples = [sample(i) for i in range(12)]
    results = list(client.curate(iter(samples), question_keep_fraction=0.5))
    assert [r.id for r in results] == [s.id for s in samples]  # one at a time: input order

    # The same selection, recomputed here from the scores the stream reported.
    questions, answers = TaskSelectors(0.5, 10000), TaskSelectors(0.3, 10000)
    for given, result in zip(samples, results, strict=True):
        assert result.error is None
        assert result.scores.question_score is not None
        selected = questions.add(given.task, result.scores.question_score)
        assert result.question_threshold == pytest.approx(selected.threshold)
        if not selected.kept:
            assert result.decision == "dropped_question" and result.sample is None
            assert result.scores.answer_scores == () and result.answer_threshold is None
            continue
        assert len(result.scores.answer_scores) == len(given.turns)
        assert result.scores.answer_score is not None
        selected = answers.add(given.task, result.scores.answer_score)
        assert result.answer_threshold == pytest.approx(selected.threshold)
        assert result.decision == ("kept" if selected.kept else "dropped_answer")
        assert result.kept == selected.kept
        assert result.sample == (given if selected.kept else None)
    assert {r.decision for r in results} >= {"kept", "dropped_question"}


def test_curate_scores_equal_score(client: CurationClient) -> None:
    samples = [sample(i) for i in range(4)]
    curated = {r.id: r for r in client.curate(samples, question_keep_fraction=1.0)}
    scored = client.score(samples)
    for expected in scored:
        got = curated[expected.id].scores
        assert got.question_score == pytest.approx(expected.question_score, abs=1e-5)
        assert got.answer_scores == pytest.approx(expected.answer_scores, abs=1e-5)


def test_a_kept_sample_is_checked_once_and_its_image_held_per_head(
    client: CurationClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Curate scores a sample's two stages on one ScoringSample: its turns are checked once
    (the server runs in this process: its calls are counted). Its image is decoded for each
    head and let go in between (limits.max_decoded_image_bytes: an image held across a
    stage could wait for queue room that other images' samples hold), with or without a
    warm-up wait, and every claim on the decoded-image budget is given back."""
    calls: collections.Counter[str] = collections.Counter()
    for name in ("load_image", "check_turns"):
        original = getattr(scoring, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(scoring, name, counted)
    keep_all = {"question_keep_fraction": 1.0, "answer_keep_fraction": 1.0}
    results = list(client.curate(iter([sample(i) for i in range(4)]), min_window=1, **keep_all))
    assert [r.decision for r in results] == ["kept"] * 4
    assert all(len(r.scores.answer_scores) == len(sample(i).turns) for i, r in enumerate(results))
    assert calls == {"load_image": 8, "check_turns": 4}
    calls.clear()
    results = list(client.curate(iter([sample(i) for i in range(4)]), min_window=10, **keep_all))
    assert [(r.decision, r.warm_up) for r in results] == [("kept", True)] * 4
    assert calls == {"load_image": 8, "check_turns": 4}
    assert metrics.DECODED_IMAGE_BYTES._value.get() == 0


def test_kept_samples_are_aligned_when_asked(client: CurationClient) -> None:
    samples = [sample(i) for i in range(3)]
    results = list(
        client.curate(samples, question_keep_fraction=1.0, answer_keep_fraction=1.0, align=True)
    )
    assert [r.decision for r in results] == ["kept"] * 3
    for given, result in zip(samples, results, strict=True):
        assert result.aligned is not None and result.aligned.error is None
        assert [t.original for t in result.aligned.turns] == given.turns
        assert result.sample == result.aligned.sample
        assert result.sample is not None and result.sample.image == given.image
        assert result.sample.turns[0].question.startswith("<image>\n")


def test_a_sample_with_candidates_is_ranked_and_kept_with_its_best(
    client: CurationClient,
) -> None:
    """Curate scores every candidate, selects on the mean of each turn's best, and keeps
    (and aligns) the sample with the best candidate as each turn's answer."""
    answers = ("Item 9 is a box.", "Item 9 is a red box on a table.", "A thing.")
    given = Sample(
        id="c",
        image=png(25, 20),
        task="detail",
        turns=[Turn("<image>\nWhat is item 9?", candidates=answers), Turn("Size?", "5 cm.")],
    )
    options = {"question_keep_fraction": 1.0, "answer_keep_fraction": 1.0}
    [scored] = client.score([given])
    for align in (False, True):
        [result] = client.curate([given], align=align, **options)
        assert result.decision == "kept" and result.sample is not None
        candidates = result.scores.answer_candidates
        for got, expected in zip(candidates, scored.answer_candidates, strict=True):
            assert got.scores == pytest.approx(expected.scores, abs=1e-5)
        best = result.scores.best_candidates
        assert best[0] == candidates[0].scores.index(max(candidates[0].scores))
        assert result.scores.answer_score == pytest.approx(
            (candidates[0].scores[best[0]] + candidates[1].scores[0]) / 2, abs=1e-6
        )
        chosen = [Turn(given.turns[0].question, answers[best[0]]), given.turns[1]]
        if align:
            assert result.aligned is not None and result.aligned.error is None
            assert [t.original for t in result.aligned.turns] == chosen
            assert result.sample == result.aligned.sample
        else:
            assert result.sample.turns == chosen and not result.sample.has_candidates


def test_a_bad_sample_is_an_error_decision_and_its_stream_mates_go_on(
    client: CurationClient, tmp_path: pathlib.Path
) -> None:
    corrupt = Sample(id="corrupt", image=b"not an image", turns=[Turn("What?", "A box.")])
    empty = Sample(id="empty", image=png(), turns=[])
    unreadable = Sample(id="missing", image=tmp_path / "nope.png", turns=[Turn("What?", "A.")])
    # A blank question: refused before any head runs, even if it would be dropped.
    blank = Sample(id="blank", image=png(), turns=[Turn(" <image> ", "A.")])
    samples = [sample(0), corrupt, empty, unreadable, blank, sample(1)]
    results = {r.id: r for r in client.curate(samples, question_keep_fraction=0.01)}
    assert set(results) == {"s0", "corrupt", "empty", "missing", "blank", "s1"}
    for bad, code, field in [
        ("corrupt", grpc.StatusCode.INVALID_ARGUMENT, "sample.image"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "sample.turns"),
        ("missing", grpc.StatusCode.NOT_FOUND, "image"),
        ("blank", grpc.StatusCode.INVALID_ARGUMENT, "sample.turns[0].question: empty"),
    ]:
        error = results[bad].error
        assert results[bad].decision == "error" and error is not None
        assert error.code == code and error.message.startswith(field), error.message
    assert results["blank"].scores.question_score is None
    assert results["s0"].ok and results["s1"].ok


def test_an_empty_answer_is_scored_as_the_reference_scores_it(client: CurationClient) -> None:
    """The method's data has empty answers (answer-dev.json: a candidate ""); the
    reference's answer model read such a turn as the question head's text, ``<image>\n{q}``
    (templates.answer_text). Both heads are one model here: equal scores."""
    unanswered = Sample(id="unanswered", image=png(), turns=[Turn("What?", "")])
    [result] = client.curate([unanswered], question_keep_fraction=1.0, answer_keep_fraction=1.0)
    assert result.error is None and result.decision == "kept"
    assert result.scores.answer_scores[0] == pytest.approx(result.scores.question_score, abs=1e-5)
    # Kept, then restyled with answers rewritten: Align needs an answer to rewrite.
    [aligned] = client.curate(
        [unanswered], question_keep_fraction=1.0, answer_keep_fraction=1.0, align=True
    )
    assert aligned.decision == "kept" and aligned.aligned is not None  # kept as it was
    assert aligned.aligned.error is not None and aligned.sample == unanswered
    assert aligned.aligned.error.message.startswith("sample.turns[0].answer: empty")


def test_bad_options_fail_at_once_naming_the_argument(client: CurationClient) -> None:
    with pytest.raises(ValueError, match="question_keep_fraction"):
        client.curate([], question_keep_fraction=0)
    with pytest.raises(ValueError, match="parts"):
        client.curate([], align=True, parts="everything")


def test_server_info_reports_curate_and_its_stream_limit(client: CurationClient) -> None:
    info = client.server_info()
    assert "Curate" in info.services
    assert info.limits.max_stream_inflight == 1
    # what unset options mean here: this server's align.decoding.max_new_tokens, 6
    assert (info.defaults.decoding.max_new_tokens, info.defaults.min_window) == (6, 100)
    assert info.defaults.template == "default-v1"


def test_the_asyncio_client_streams_from_an_async_generator(server: ServerThread) -> None:
    async def produce() -> AsyncIterator[Sample]:
        for i in range(5):
            await asyncio.sleep(0.01)  # a generator producing data as it goes
            yield sample(i)

    async def run() -> list[CurateResult]:
        async with AsyncCurationClient(server.target, timeout=120) as client:
            results = client.curate(produce(), question_keep_fraction=1.0)
            collected = [r async for r in results]
            assert results.unanswered == []
            return collected

    results = asyncio.run(run())
    assert [r.id for r in results] == [f"s{i}" for i in range(5)]
    assert all(r.ok and r.scores.question_score is not None for r in results)


def test_a_producer_that_fails_gets_its_accepted_samples_answered_then_its_error(
    server: ServerThread,
) -> None:
    async def produce() -> AsyncIterator[Sample]:
        yield sample(0)
        yield sample(1)
        raise RuntimeError("generator broke")

    seen: list[str] = []

    async def run() -> None:
        async with AsyncCurationClient(server.target, timeout=60) as client:
            async for result in client.curate(produce()):
                seen.append(result.id)

    with pytest.raises(RuntimeError, match="generator broke"):
        asyncio.run(run())
    assert sorted(seen) == ["s0", "s1"]


def test_bad_align_settings_fail_the_stream_once_naming_the_field(
    server: ServerThread, client: CurationClient
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(client.curate([sample(0)], align=True, template="no-such-set"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "template: unknown template set 'no-such-set'" in (info.value.details() or "")
    resource = error_details(info.value)["ResourceInfo"]  # on a stream's status too
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("template", "no-such-set")
    # A bad field of the stream's options is named by its path in CurateRequest.
    options = pb.CurateOptions(
        align=True, align_options=pb.AlignOptions(decoding=pb.DecodingOptions(top_p=2.0))
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CurationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Curate(iter([pb.CurateRequest(options=options)])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field = "options.align_options.decoding.top_p"
    assert (info.value.details() or "").startswith(f"{field}: 2.0 is not in (0, 1]")
    bad = error_details(info.value)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == [field]


def test_a_bad_priority_header_fails_only_a_stream_that_reads_it(server: ServerThread) -> None:
    """x-align2-priority is read only for a stream whose options set no priority: a set
    field wins, and the header is not even parsed."""
    metadata = (("x-align2-priority", "urgent"),)
    first = pb.CurateRequest(sample=sample_to_proto(sample(0)))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CurationServiceStub(channel)
        options = pb.CurateRequest(options=pb.CurateOptions(priority=pb.PRIORITY_BULK))
        [decision] = list(stub.Curate(iter([options, first]), metadata=metadata))
        assert decision.sequence == 0 and not decision.HasField("error")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Curate(iter([first]), metadata=metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("x-align2-priority metadata: unknown value")


def test_async_cancel_raises_cancelled_as_an_rpc_error(server: ServerThread) -> None:
    async def run() -> tuple[list[str], list[str]]:
        async with AsyncCurationClient(server.target, timeout=60) as client:
            results = client.curate(sample(i) for i in range(6))
            first = await anext(results)
            results.cancel()
            with pytest.raises(grpc.RpcError) as info:
                async for _ in results:
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED
            return [first.id], results.unanswered

    answered, unanswered = asyncio.run(run())
    assert not set(answered) & set(unanswered)


def test_curate_is_unimplemented_when_disabled(tiny_llava: pathlib.Path) -> None:
    config = score_config(tiny_llava)
    config.limits.max_stream_inflight = 0
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=30, retry=False) as client:
            assert client.server_info().limits.max_stream_inflight == 0
            assert "Curate" not in client.server_info().services
            with pytest.raises(grpc.RpcError) as info:
                list(client.curate([sample(0)]))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "limits.max_stream_inflight" in (info.value.details() or "")
    finally:
        server.stop()


def test_a_sync_producer_that_fails_gets_its_accepted_samples_answered_then_its_error(
    client: CurationClient,
) -> None:
    def produce() -> Iterator[Sample]:
        yield sample(0)
        yield sample(1)
        raise RuntimeError("generator broke")

    seen: list[str] = []
    with pytest.raises(RuntimeError, match="generator broke"):
        for result in client.curate(produce()):
            seen.append(result.id)
    assert sorted(seen) == ["s0", "s1"]


def test_stopping_early_cancels_the_stream_and_reports_the_unanswered(
    client: CurationClient,
) -> None:
    produced: list[str] = []

    def produce() -> Iterator[Sample]:
        for i in range(6):
            produced.append(f"s{i}")
            yield sample(i)

    results = client.curate(produce())
    answered = [next(results).id]
    results.cancel()
    with pytest.raises(grpc.RpcError) as info:
        answered += [r.id for r in results]
    assert info.value.code() == grpc.StatusCode.CANCELLED
    unanswered = results.unanswered
    assert not set(answered) & set(unanswered)
    # Every sample handed to the stream is either answered or listed (the last one produced
    # may still have been on its way into the stream when it was cancelled).
    assert len(set(produced) - set(answered) - set(unanswered)) <= 1
    assert unanswered  # one at a time on this server: some were still waiting


def test_the_cli_streams_a_jsonl_file_and_writes_the_kept_samples(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    records = []
    for i in range(6):
        (tmp_path / f"img{i}.png").write_bytes(png(16 + i, 20))
        records.append(
            {
                "id": f"r{i}",
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is item {i}?"},
                    {"from": "gpt", "value": f"Item {i} is a box."},
                ],
            }
        )
    source, out, report = tmp_path / "in.jsonl", tmp_path / "kept.json", tmp_path / "r.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["curate", str(source), "--image-folder", str(tmp_path), "--target", server.target]
    args += ["--out", str(out), "--report", str(report), "--task", "detail", "--no-progress"]
    args += ["--stream"]
    assert cli_main(args) == 0
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(d["id"] for d in decisions) == [f"r{i}" for i in range(6)]
    # Each line names its record (ids may repeat in generated data; these do not).
    assert sorted((d["file"], d["record"]) for d in decisions) == [
        (str(source), i) for i in range(6)
    ]
    assert all(d["id"] == records[d["record"]]["id"] == f"r{d['index']}" for d in decisions)
    kept_ids = [d["id"] for d in decisions if d["decision"] == "kept"]
    assert kept_ids and len(kept_ids) < 6  # the method's 30% + 30%, on a fresh stream
    written = json.loads(out.read_text())
    assert [w["id"] for w in written] == kept_ids
    assert written == [r for r in records if r["id"] in kept_ids]  # restored as read


# ---------------------------------------------------------------------------------------
# Selection keys, calibrated thresholds


def test_streams_of_one_key_share_their_windows_and_other_keys_do_not(
    server: ServerThread,
) -> None:
    more = asyncio.Event()

    async def producer_a() -> AsyncIterator[Sample]:
        for i in range(4):
            yield sample(i)
        await more.wait()  # A stays open (its key in use) while B and C run

    async def run() -> tuple[list[CurateResult], dict[str, int]]:
        async with AsyncCurationClient(server.target, timeout=120) as client:
            a = client.curate(producer_a(), selection_key="shared-a", min_window=1)
            first = [await anext(a) for _ in range(4)]
            sizes = {}
            for name, key in (("same", "shared-a"), ("other", "shared-b"), ("none", None)):
                [result] = [r async for r in client.curate([sample(4)], selection_key=key)]
                sizes[name] = result.question_window_size
            more.set()
            return first + [r async for r in a], sizes

    decided, sizes = asyncio.run(run())
    assert [r.question_window_size for r in decided] == [1, 1, 2, 2]  # two tasks alternate
    # sample(4) is a "conversation" sample: A sent two of them (s0, s2) under "shared-a".
    assert sizes == {"same": 3, "other": 1, "none": 1}


def test_thresholds_from_a_calibration_of_the_same_samples_keep_what_the_method_keeps(
    client: CurationClient,
) -> None:
    from align2.client.calibration import calibrate
    from align2.client.selection import select_task

    samples = [sample(i) for i in range(12)]
    # Each sample and head alone, as this server's Curate scores them (one in flight).
    questions: dict[str, list[float]] = {}
    answers: dict[str, list[float | None]] = {}
    scored: dict[str, tuple[float, float | None]] = {}
    for given in samples:
        [question] = client.score([given], heads=["question"])
        [answer] = client.score([given], heads=["answer"])
        assert question.question_score is not None
        questions.setdefault(given.task, []).append(question.question_score)
        answers.setdefault(given.task, []).append(answer.answer_score)
        scored[given.id] = (question.question_score, answer.answer_score)
    calibration = calibrate(questions, answers, question_keep=0.5, answer_keep=0.5)
    offline = set()
    for task in TASKS:
        ids = [s.id for s in samples if s.task == task]
        mine = {i: [a] for i, a in enumerate(answers[task]) if a is not None}
        offline |= {ids[i] for i in select_task(questions[task], mine, 0.5, 0.5).answer_kept}
    assert offline

    results = list(client.curate(samples, question_keep_fraction=0.5, **calibration.thresholds()))
    assert sorted(r.id for r in results) == sorted(scored)
    for result in results:
        task = samples[int(result.id[1:])].task
        assert result.question_threshold == pytest.approx(calibration.question_thresholds[task])
        assert result.question_window_size == 0 and not result.warm_up
        # Every decision follows the scores Curate reports...
        question, answer = result.scores.question_score, result.scores.answer_score
        assert question is not None and result.question_threshold is not None
        if question < result.question_threshold:
            assert result.decision == "dropped_question"
        else:
            assert answer is not None and result.answer_threshold is not None
            assert result.kept == (answer >= result.answer_threshold)
        # ... and, with the same scores as Score gave, is the method's offline decision. A
        # calibrated threshold is one of these very scores, so a sample whose turns Curate
        # batched otherwise (see the fixture; ~1e-6 apart) may land on its other side.
        expected_question, expected_answer = scored[result.id]
        assert question == pytest.approx(expected_question, abs=1e-4)
        if answer is not None:
            assert answer == pytest.approx(expected_answer, abs=1e-4)
        same = question == expected_question and answer in (None, expected_answer)
        # A one-turn sample has no turn to split from: always the same batches.
        assert same or len(samples[int(result.id[1:])].turns) > 1, result
        if same:
            assert result.kept == (result.id in offline), result


def test_the_cli_calibrates_from_score_output_then_streams_against_it(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    from align2.client.calibration import main as calibration_main

    records = []
    for i in range(8):
        (tmp_path / f"img{i}.png").write_bytes(png(16 + i, 20, (i * 30, 60, 90)))
        conversation = [
            {"from": "human", "value": f"<image>\nWhat is item {i}?"},
            {"from": "gpt", "value": f"Item {i} is a {'big ' * i}box."},
        ]
        records.append({"id": f"r{i}", "image": f"img{i}.png", "conversations": conversation})
    source = tmp_path / "in.json"
    source.write_text(json.dumps(records))
    connect = ["--image-folder", str(tmp_path), "--target", server.target, "--no-progress"]
    scores, calibration = tmp_path / "scores.jsonl", tmp_path / "cal.json"
    score = ["score", str(source), *connect, "--out", str(scores), "--heads", "question"]
    score += ["--chunk-size", "1"]  # each alone, as Curate here: the same numbers
    assert cli_main(score) == 0
    assert calibration_main([f"detail={scores}", "--out", str(calibration)]) == 0
    thresholds = json.loads(calibration.read_text())["question_thresholds"]
    out, report = tmp_path / "kept.json", tmp_path / "decisions.jsonl"
    args = ["curate", str(source), *connect, "--task", "detail", "--stream"]
    args += ["--out", str(out), "--report", str(report), "--thresholds", str(calibration)]
    args += ["--selection-key", "cli", "--min-window", "1"]
    assert cli_main(args) == 0
    decisions = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(decisions) == 8
    for decision in decisions:
        assert decision["question_threshold"] == pytest.approx(thresholds["detail"])
        assert decision["question_window_size"] == 0
        passed = decision["scores"]["question_score"] >= decision["question_threshold"]
        assert passed == (decision["decision"] != "dropped_question")
    assert sum(d["decision"] != "dropped_question" for d in decisions) == int(0.3 * 8)


def test_a_new_selection_key_beyond_the_limit_is_refused(tiny_llava: pathlib.Path) -> None:
    """Refused every time, as itself: grpc.aio fails a client write in flight when the call
    ends and overwrites the call's status with INTERNAL, so the server reads what the
    client still sends before it refuses (5 of 30 refusals came back INTERNAL without)."""
    config = score_config(tiny_llava)
    config.curate.max_selection_keys = 1
    server = ServerThread(config).start()
    more = asyncio.Event()

    async def held_open() -> AsyncIterator[Sample]:
        yield sample(0)
        await more.wait()

    async def run() -> list[grpc.RpcError]:
        refusals = []
        async with AsyncCurationClient(server.target, timeout=60, retry=False) as client:
            limits = (await client.server_info()).limits
            assert (limits.max_selection_keys, limits.selection_window) == (1, 10000)
            assert limits.max_task_types == 256  # config curate.max_task_types, default
            assert limits.max_name_length == 256  # keys and task types, fixed
            a = client.curate(held_open(), selection_key="a", min_window=1)
            await anext(a)
            try:
                for attempt in range(30):  # a race: many tries, samples right behind options
                    samples = [sample(i) for i in range(1, 9)]
                    # resume=False: the client's one blind resume would hide a lost refusal
                    call = client.curate(samples, selection_key=f"b{attempt}", resume=False)
                    with pytest.raises(grpc.RpcError) as refused:
                        _ = [r async for r in call]
                    assert call.streams == 1
                    refusals.append(refused.value)
                [same] = [r async for r in client.curate([sample(2)], selection_key="a")]
                assert same.question_window_size == 2  # sample(0)'s task: A's score counts
            finally:
                more.set()
                _ = [r async for r in a]
            return refusals

    try:
        refusals = asyncio.run(run())
    finally:
        server.stop()
    codes = collections.Counter(error.code() for error in refusals)
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: 30}
    error = refusals[-1]
    assert "options.selection_key: 1 selection keys are live" in (error.details() or "")
    assert "limits.max_selection_keys 1" in (error.details() or "")
    info = error_details(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "TOO_MANY_SELECTION_KEYS"


def test_streams_past_their_deadline_are_counted_as_deadline_exceeded(server: ServerThread) -> None:
    """Streams whose producer goes quiet until the caller's deadline: the caller gets
    DEADLINE_EXCEEDED, and align2_requests_total counts each so (not OK, not CANCELLED),
    which is what an operator's deadline alert reads. gRPC ends such a call on the server
    either by cancelling the handler or by ending its request stream (the handler then
    returns): which one varies from run to run, hence three streams."""
    labels = {"rpc": "Curate", "code": "DEADLINE_EXCEEDED"}
    before = metric("align2_requests_total", **labels)
    cancelled = metric("align2_requests_total", rpc="Curate", code="CANCELLED")
    ok = metric("align2_requests_total", rpc="Curate", code="OK")
    quiet = threading.Event()

    def requests() -> Iterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions())
        yield pb.CurateRequest(sample=sample_to_proto(sample(0)))
        quiet.wait(30)  # the producer goes quiet

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CurationServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    for _ in stub.Curate(requests(), timeout=1.0):
                        pass
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        until = time.monotonic() + 10
        while metric("align2_requests_total", **labels) < before + 3 and time.monotonic() < until:
            time.sleep(0.05)
        assert metric("align2_requests_total", **labels) == before + 3
        assert metric("align2_requests_total", rpc="Curate", code="CANCELLED") == cancelled
        assert metric("align2_requests_total", rpc="Curate", code="OK") == ok
    finally:
        quiet.set()


def test_a_stream_its_client_cancels_is_counted_cancelled_and_its_work_stops(
    tiny_llava: pathlib.Path,
) -> None:
    """gRPC closes the response stream of a call its client cancelled; the handler must
    count it CANCELLED (not OK) and cancel the samples it still works on. Fails on: the
    closed response generator ending the call as if it had returned (OK in 3 of 4 runs
    with 16 samples in flight; this module's server holds one, and gets it right)."""
    config = score_config(tiny_llava)
    config.limits.max_stream_inflight = 16
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=60) as client:
            for attempt in range(4):
                _cancel_after_three_decisions(client, attempt)
    finally:
        server.stop()


def _cancel_after_three_decisions(client: CurationClient, attempt: int) -> None:
    def count(code: str) -> float:
        return metric("align2_requests_total", rpc="Curate", code=code)

    def settled(check: Any) -> bool:  # the server records the call as it unwinds
        for _ in range(500):
            if check():
                return True
            time.sleep(0.01)
        return False

    before = {code: count(code) for code in ("OK", "CANCELLED")}
    results = client.curate([sample(i) for i in range(30)], min_window=1)
    seen = 0
    with pytest.raises(grpc.RpcError) as ended:
        for _ in results:
            seen += 1
            if seen == 3:
                results.cancel()
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    assert settled(lambda: count("CANCELLED") > before["CANCELLED"]), attempt
    assert count("CANCELLED") == before["CANCELLED"] + 1 and count("OK") == before["OK"], attempt
    assert settled(lambda: metric("align2_curate_inflight") == 0), attempt  # its work stopped


def test_the_servers_stored_scores_bound_refuses_what_would_grow_it(
    tiny_llava: pathlib.Path,
) -> None:
    """curate.max_stored_scores bounds every window's scores together: seeds past it refuse
    their stream (RESOURCE_EXHAUSTED, RetryInfo), a sample whose scores would pass it fails
    alone, and a stream's own windows give their scores back when it ends."""
    config = score_config(tiny_llava)
    config.curate.max_stored_scores = 4
    config.limits.max_stream_inflight = 1  # one sample at a time: each sees the last's scores
    server = ServerThread(config).start()
    try:
        with CurationClient(server.target, timeout=60, retry=False) as client:
            assert client.server_info().limits.max_stored_scores == 4
            seeds = {TASKS[0]: [0.0] * 5}
            with pytest.raises(grpc.RpcError) as refused:
                list(client.curate([sample(0)], question_seed_scores=seeds, resume=False))
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error.details() or ""
            assert "options.question_seed_scores: 5 more score(s)" in details
            assert "limits.max_stored_scores 4" in details
            retry = error_details(error)["RetryInfo"]
            assert isinstance(retry, error_details_pb2.RetryInfo)
            assert retry.retry_delay.seconds == 10
            # 2 seeds, then s0 adds at most 2 (its question and answer windows): 4. s2 (the
            # same task) and s1 (a new one) would add more: each fails alone, unscored.
            seeds = {TASKS[0]: [0.0] * 2}
            samples = [sample(0), sample(2), sample(1)]
            results = {
                r.id: r for r in client.curate(samples, question_seed_scores=seeds, min_window=1)
            }
            assert results["s0"].error is None
            for refused_id in ("s2", "s1"):
                failed = results[refused_id]
                assert failed.decision == "error" and failed.error is not None
                assert failed.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "sample.task" in failed.error.message
                assert "limits.max_stored_scores 4" in failed.error.message
                assert failed.scores.question_score is None
            # That stream's own windows were given back when it ended: 4 seeds fit again.
            seeds = {TASKS[1]: [0.0] * 4}
            [last] = client.curate([sample(1)], question_seed_scores=seeds, resume=False)
            assert last.id == "s1"
    finally:
        server.stop()


def test_seeded_windows_given_back_trim_the_heap(
    tiny_llava: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeds hold no request bytes, so only the stored-score count can tell the heap trimmer
    that a stream's windows were freed: 500 seeded streams cancelled left ~960 MB of freed
    heap untrimmed (see docs/operating.md). Fails on: the windows not wired to the trimmer."""
    monkeypatch.setattr(memory, "MIN_RELEASED_BYTES", 1000 * 16)
    config = score_config(tiny_llava)
    config.server.trim_idle_seconds = 0
    server = ServerThread(config).start()
    trims: list[int] = []
    server.app._trimmer._trim = trims.append
    try:
        with CurationClient(server.target, timeout=60, retry=False) as client:
            seeds = {TASKS[0]: [0.0] * 1000}
            assert list(client.curate([], question_seed_scores=seeds, resume=False)) == []
            deadline = time.monotonic() + 10
            while not trims and time.monotonic() < deadline:
                time.sleep(0.05)
            assert trims == [0]  # one malloc_trim(0), once the windows were given back
    finally:
        server.stop()


def _alive_of_failures() -> list[object]:
    """Objects of the kinds a failed Curate stream leaves alive when it is in a cycle:
    request messages (the server's and the client's), core errors, decisions and samples
    in scoring."""
    kinds = (
        pb.CurateRequest,
        pb.CurateOptions,
        errors.Align2Error,
        curation.Curated,
        scoring.ScoringSample,
    )
    # issubclass of the type: isinstance reads __class__, which some objects warn about
    return [o for o in gc.get_objects() if issubclass(type(o), kinds)]


def _alive_since(before: list[object]) -> dict[str, int]:
    """Those alive now that were not in ``before`` (held, so no id is reused meanwhile):
    objects that earlier tests keep alive (an error in a kept traceback) are not counted."""
    known = {id(o) for o in before}
    counts = collections.Counter(
        type(o).__name__ for o in _alive_of_failures() if id(o) not in known
    )
    return dict(counts)


def test_failed_streams_are_freed_when_they_end_not_by_the_cyclic_gc(
    tiny_llava: pathlib.Path,
) -> None:
    """With the cyclic GC off, nothing of a refused stream or of an error decision is left
    once the stream has ended: each was a reference cycle that kept the stream's request
    (a refused stream: its options and seeds, ~400 KB of seeds per stream) until the next
    full collection. Fails on: grpc.aio's AbortError raised through the interceptor's
    frames (the call's state keeps it, its traceback holds frames that hold the context,
    which holds that state; through its __context__ the core error and its frames), the
    stream's reader task kept in the frame its error was raised through, and an error
    decision keeping its error's traceback, whose frames hold the decision. (The asyncio
    client: grpc's sync one keeps its own call, and so the client's request, in a cycle.)"""
    config = score_config(tiny_llava)
    config.curate.max_stored_scores = 1000
    config.curate.max_selection_keys = 0
    server = ServerThread(config).start()
    seeds = {TASKS[0]: [0.5] * 2000}  # over the bound: RESOURCE_EXHAUSTED
    bad = Sample(id="bad", image=b"not an image", task=TASKS[0], turns=sample(0).turns)

    async def run() -> tuple[list[grpc.StatusCode], CurateResult]:
        codes = []
        async with AsyncCurationClient(server.target, timeout=60, retry=False) as client:
            for key in ("", "k") * 3:  # a key, and none allowed: INVALID_ARGUMENT
                call = client.curate(
                    [sample(0)], question_seed_scores=seeds, selection_key=key, resume=False
                )
                try:
                    _ = [r async for r in call]
                except grpc.RpcError as error:
                    codes.append(error.code())
            [decision] = [r async for r in client.curate([bad], resume=False)]
        return codes, decision

    gc.collect()
    before = _alive_of_failures()
    gc.disable()  # a cycle now lives on, and fails the test, whatever the timing
    try:
        codes, decision = asyncio.run(run())
        refusals = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT]
        assert codes == refusals * 3
        assert decision.error is not None
        assert decision.error.code == grpc.StatusCode.INVALID_ARGUMENT
        deadline = time.monotonic() + 10  # the server ends its side of a call after ours
        while (alive := _alive_since(before)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == {}
    finally:
        gc.enable()
        server.stop()


def test_a_stream_sends_its_request_id_before_any_decision(server: ServerThread) -> None:
    """A Curate stream may run for hours: its x-request-id comes in the initial metadata,
    before any decision, as well as in the trailers. Fails on: trailers only."""
    more = threading.Event()

    def requests() -> Iterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions())
        more.wait(30)  # nothing to decide until the id has been read

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CurationServiceStub(channel)
        call = stub.Curate(requests(), timeout=60, metadata=(("x-request-id", "job-7"),))
        try:
            initial = dict(call.initial_metadata())
            assert initial.get("x-request-id") == "job-7"
        finally:
            more.set()
        assert list(call) == []
        assert dict(call.trailing_metadata()).get("x-request-id") == "job-7"
