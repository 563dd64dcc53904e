"""The client's offline curation (records, score store, refusals), its LLaVA reading and
writing, the Curate stream's bookkeeping on resume, and the decoding of decisions."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import time
from typing import Any

import grpc
import pytest
from client_fakes import FAST_RESUME, FakeCuration, kept_decision, make_samples, serving

from align2.client import Sample, Turn, cli, offline
from align2.client.convert import curate_result_from_proto
from align2.client.curate import LOST_STATUS, CurateStream, selection_options
from align2.client.llava import read_llava, write_llava
from align2.client.records import Invalid, InvalidRecords, load_inputs
from align2.client.resume import ResumePolicy
from align2.client.scorestore import ScoreKey, ScoreStore
from align2.client.selection import describe, keep_count
from align2.v1 import curation_pb2 as pb

RECORD = {
    "id": "1",
    "image": "1.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
    ],
}


def detail_file(tmp_path: pathlib.Path, count: int = 10) -> pathlib.Path:
    records = []
    for i in range(1, count + 1):
        (tmp_path / f"{i}.png").write_bytes(b"png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nQuestion about {i}?"},
                    {"from": "gpt", "value": "a" * i},
                ],
            }
        )
    path = tmp_path / "detail_x.json"
    path.write_text(json.dumps(records))
    return path


def curate(fake: FakeCuration, *args: Any) -> int:
    return cli.main(["curate", *map(str, args), "--target", fake.target, "--no-progress"])


# ---------------------------------------------------------------------------------------
# offline.py


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
    """Killed: offline._value not checking NaN (the whole run then fails in top_fraction)."""
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
    run (a rerun resumes) instead of silently dropping the record. Killed: treating every
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
    """Scores of two model revisions must never be ranked together. Killed: removing the
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
    Killed: ``millis <= 0`` for ``millis < 0``."""
    calls = []

    async def call() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Refusal("0")
        return "scored"

    assert asyncio.run(offline.when_room(call)) == "scored"
    assert len(calls) == 2


def test_a_refusal_is_sent_again_no_sooner_than_the_servers_delay() -> None:
    """The pause is never shorter than grpc-retry-pushback-ms. Killed: pacing on the
    client's own backoff alone (0.25-0.5 s here)."""
    calls = []

    async def call() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise Refusal("1000")
        return "scored"

    assert asyncio.run(offline.when_room(call)) == "scored"
    assert calls[1] - calls[0] >= 1.0


# ---------------------------------------------------------------------------------------
# selection.py


def test_describe_one_score() -> None:
    """A task with one score (a tiny file) has a summary. Killed: quantile's high index
    not clamped (IndexError)."""
    summary = describe([2.5], [2.5])
    assert (summary.minimum, summary.q1, summary.median, summary.q3, summary.maximum) == (
        2.5,
        2.5,
        2.5,
        2.5,
        2.5,
    )


def test_a_keep_fraction_of_zero_is_allowed() -> None:
    """check_fraction's range is [0, 1]. Killed: refusing 0."""
    assert keep_count(0.0, 10) == 0
    assert offline.OfflineSettings(question_keep=0.0, answer_keep=0.0).question_keep == 0.0


# ---------------------------------------------------------------------------------------
# resume.py


def test_the_resume_backoff_is_capped_at_its_maximum() -> None:
    """Killed: ``min(base, max_backoff_seconds)`` removed (0.5 * 2**19 s on try 20)."""
    policy = ResumePolicy()
    assert all(policy.backoff(n) <= 10.0 * 1.2 for n in range(1, 31))


# ---------------------------------------------------------------------------------------
# records.py


def test_one_task_ranks_records_that_have_a_task_together(tmp_path: pathlib.Path) -> None:
    """--one-task: a single stratum "all", whatever task keys records carry.
    Killed: typed records keeping their own stratum under one_task."""
    (tmp_path / "1.jpg").write_bytes(b"x")
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{**RECORD, "task": "detail"}, {**RECORD, "task": "conversation"}]))
    inputs = load_inputs([path], image_folder=tmp_path, one_task=True)
    assert list(inputs.tasks) == ["all"] and len(inputs.tasks["all"]) == 2


def test_a_given_task_wins_over_the_file_name(tmp_path: pathlib.Path) -> None:
    """Record key, else --task, else the file name. Killed: file name before --task."""
    (tmp_path / "1.jpg").write_bytes(b"x")
    path = tmp_path / "detail_23k.json"
    path.write_text(json.dumps([RECORD]))
    inputs = load_inputs([path], image_folder=tmp_path, task="conversation")
    assert list(inputs.tasks) == ["conversation"]


def test_invalid_records_beyond_five_are_counted_in_the_message() -> None:
    """Killed: dropping the "(and N more)" part."""
    error = InvalidRecords([Invalid("f.json", i, str(i), "read", "bad") for i in range(7)])
    assert str(error).startswith("7 invalid records: ") and str(error).endswith("(and 2 more)")


# ---------------------------------------------------------------------------------------
# curate.py (the stream's bookkeeping)


def test_samples_waiting_to_be_sent_again_are_listed_as_unanswered() -> None:
    """After a restart and before the next stream sends them, they are still unanswered
    (the caller resends them if the call fails now). Killed: ``unanswered`` ignoring the
    resend queue."""
    stream = CurateStream.plan(resume=True)
    first = stream.requests(iter(make_samples(3)))
    assert [next(first).WhichOneof("item")] + [next(first).sample.id for _ in range(3)] == [
        "options",
        "0",
        "1",
        "2",
    ]
    stream.decode(kept_decision(1, "1"))
    stream.restart()
    assert stream.unanswered == ["0", "2"]


def test_a_second_failure_resends_in_the_original_order() -> None:
    """What the failed stream had sent goes before what it had not sent yet. Killed:
    ``extend`` for ``extendleft(reversed(...))`` in restart."""
    stream = CurateStream.plan(resume=True)
    produced = iter(make_samples(5))
    first = stream.requests(produced)
    assert [next(first).WhichOneof("item")] + [next(first).sample.id for _ in range(3)] == [
        "options",
        "0",
        "1",
        "2",
    ]
    stream.restart()
    second = stream.requests(produced)
    assert [next(second).WhichOneof("item"), next(second).sample.id] == ["options", "0"]
    stream.restart()  # the second stream failed after resending only "0"
    third = list(stream.requests(produced))
    assert [r.sample.id for r in third[1:]] == ["0", "1", "2", "3", "4"]


def test_a_lost_status_on_a_new_stream_without_decisions_is_resumed_once_only() -> None:
    """Decisions of an earlier stream do not make a new, silent stream "going": it gets
    one blind resume, not the policy's every attempt. Killed: restart() not resetting the
    per-stream decision count."""
    stream = CurateStream.plan(resume=FAST_RESUME)
    first = stream.requests(iter(make_samples(2)))
    list(first)
    stream.decode(kept_decision(0, "0"))
    assert stream.next_try("INTERNAL", LOST_STATUS) is not None  # it was going
    stream.restart()
    assert stream.next_try("INTERNAL", LOST_STATUS) is not None  # blind, once
    stream.restart()
    assert stream.next_try("INTERNAL", LOST_STATUS) is None


def test_a_selection_key_of_exactly_256_characters_is_sent() -> None:
    """As the server checks it. Killed: ``>=`` for ``>``."""
    assert selection_options(selection_key="k" * 256).selection_key == "k" * 256
    with pytest.raises(ValueError, match="257 characters exceeds 256"):
        selection_options(selection_key="k" * 257)


# ---------------------------------------------------------------------------------------
# convert.py (a decision as the client reads it)

ORIGINAL = Sample(id="s", image=b"", turns=[Turn("q?", "a.")])


def test_a_kept_decision_with_an_error_reads_as_an_error() -> None:
    """Never keep what carries an error. Killed: removing the kept-with-error rule."""
    error = pb.ItemError(code=grpc.StatusCode.INTERNAL.value[0], message="boom")
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, error=error)
    result = curate_result_from_proto(response, ORIGINAL)
    assert (result.decision, result.sample) == ("error", None)


def test_a_kept_sample_is_the_aligned_one_when_aligned() -> None:
    """Killed: ignoring ``aligned.sample`` (the restyle would be lost)."""
    rewrite = pb.Turn(question="q?", answer="A rewritten answer.")
    aligned = pb.AlignResult(
        id="s",
        turns=[
            pb.AlignedTurn(
                original=pb.Turn(question="q?", answer="a."), rewrite=rewrite, kept=pb.KEPT_REWRITE
            )
        ],
    )
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, aligned=aligned)
    result = curate_result_from_proto(response, ORIGINAL)
    assert result.sample is not None and result.sample.turns == [Turn("q?", "A rewritten answer.")]


def test_a_best_candidate_beyond_the_turns_candidates_is_a_protocol_error() -> None:
    """Killed: ``b > len(...)`` for ``b >= len(...)`` in _best (then an IndexError)."""
    original = Sample(id="s", image=b"", turns=[Turn("q?", candidates=("a", "b"))])
    scores = pb.ScoreResult(
        id="s", answer_candidates=[pb.CandidateScores(scores=[1.0, 2.0, 3.0], best=2)]
    )
    response = pb.CurateResponse(id="s", decision=pb.DECISION_KEPT, scores=scores)
    from align2.client import ProtocolError

    with pytest.raises(ProtocolError, match="do not fit"):
        curate_result_from_proto(response, original)


def test_an_absent_threshold_is_none_not_zero() -> None:
    """A decision without a question threshold (an error before selection) reports None,
    not 0.0. Killed: HasField dropped for question_threshold."""
    error = pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="image: bad")
    response = pb.CurateResponse(id="s", decision=pb.DECISION_ERROR, error=error)
    assert curate_result_from_proto(response, ORIGINAL).question_threshold is None


# ---------------------------------------------------------------------------------------
# llava.py


def write_json(path: pathlib.Path, records: list[Any]) -> pathlib.Path:
    path.write_text(json.dumps(records))
    return path


def test_task_key_wins_over_type_key(tmp_path: pathlib.Path) -> None:
    """Killed: reading ``type`` before ``task``."""
    [sample] = read_llava(write_json(tmp_path / "d.json", [{**RECORD, "task": "a", "type": "b"}]))
    assert sample.task == "a"


def test_an_empty_task_key_falls_back(tmp_path: pathlib.Path) -> None:
    """An empty ``task`` is no task: ``type``, then the file name, decide.
    Killed: returning the first key present even when empty."""
    records = [{**RECORD, "task": "", "type": "typed"}, {**RECORD, "task": ""}]
    path = write_json(tmp_path / "conversation_58k.json", records)
    assert [s.task for s in read_llava(path)] == ["typed", "conversation"]


def test_an_empty_image_name_is_malformed(tmp_path: pathlib.Path) -> None:
    """Killed: accepting "" (the image folder itself would be sent as the image)."""
    with pytest.raises(ValueError, match=r"record 0 \(id '1'\): image: expected a file name"):
        read_llava(write_json(tmp_path / "d.json", [{**RECORD, "image": ""}]))


def test_a_boolean_id_is_malformed(tmp_path: pathlib.Path) -> None:
    """true is not an id (it would be written back as "True"). Killed: no bool check."""
    with pytest.raises(ValueError, match=r"record 0: id: expected a string, got bool"):
        read_llava(write_json(tmp_path / "d.json", [{**RECORD, "id": True}]))


def test_an_upper_case_jsonl_suffix_writes_jsonl(tmp_path: pathlib.Path) -> None:
    """Killed: a case-sensitive suffix check."""
    [sample] = read_llava(write_json(tmp_path / "d.json", [RECORD]))
    out = tmp_path / "OUT.JSONL"
    write_llava([sample], out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [RECORD]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_tolerated(tmp_path: pathlib.Path, suffix: str) -> None:
    """Some editors write a BOM. Killed: reading as plain utf-8."""
    text = json.dumps([RECORD]) if suffix == ".json" else json.dumps(RECORD) + "\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes("\ufeff".encode() + text.encode())
    assert [s.id for s in read_llava(path)] == ["1"]


# ---------------------------------------------------------------------------------------
# scorestore.py


def test_a_boolean_score_line_is_ignored(tmp_path: pathlib.Path) -> None:
    """JSON true is not a score. Killed: no bool check in _number (true read as 1.0)."""
    path = tmp_path / "s.jsonl"
    entry = {"id": "1", "digest": "d" * 32, "head": "question", "revision": "r1",
             "template_version": "t1", "score": True}  # fmt: skip
    path.write_text(json.dumps(entry) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 0 and store.ignored_lines == 1
        assert store.get(ScoreKey("1", "d" * 32, "question", "r1", "t1")) is None
