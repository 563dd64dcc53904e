"""Transport pieces alone: request conversion, priority rules, token checks, error mapping."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from align2.server import config as config_module
from align2.server.config import Config, LimitsConfig
from align2.server.core.align_types import AlignOutcome
from align2.server.core.curation import CurateOptions
from align2.server.core.priority import Priority
from align2.server.core.scoring import Head, ScoreOutcome
from align2.server.errors import Align2Error, Code, InvalidArgument
from align2.server.transport import convert
from align2.server.transport.errors import status_code
from align2.server.transport.security import BearerTokenInterceptor
from align2.v1 import curation_pb2 as pb


def test_priority_field_wins_then_metadata_then_bulk() -> None:
    assert convert.priority_from_proto(pb.PRIORITY_INTERACTIVE, "bulk") is Priority.INTERACTIVE
    assert convert.priority_from_proto(pb.PRIORITY_UNSPECIFIED, "Interactive") is (
        Priority.INTERACTIVE
    )
    assert convert.priority_from_proto(pb.PRIORITY_UNSPECIFIED, None) is Priority.BULK
    with pytest.raises(InvalidArgument, match="x-align2-priority metadata: unknown value 'urgent'"):
        convert.priority_from_proto(pb.PRIORITY_UNSPECIFIED, "urgent")
    with pytest.raises(InvalidArgument, match="priority: unknown value 9"):
        convert.priority_from_proto(9)


def test_curate_options_errors_name_the_path_in_curate_request() -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.curate_options_from_proto(pb.CurateOptions(priority=9))
    assert info.value.field == "options.priority"
    align = pb.AlignOptions(parts=9)
    with pytest.raises(InvalidArgument) as info:
        convert.curate_options_from_proto(pb.CurateOptions(align=True, align_options=align))
    assert info.value.field == "options.align_options.parts"
    settings = convert.curate_options_from_proto(pb.CurateOptions(align=True)).align
    assert settings is not None and settings.options_field == "options.align_options"
    assert convert.align_settings_from_proto(pb.AlignOptions()).options_field == "options"


def test_heads_default_to_both_and_unknown_ones_are_named() -> None:
    assert convert.heads_from_proto([]) == frozenset(Head)
    assert convert.heads_from_proto([pb.HEAD_ANSWER]) == {Head.ANSWER}
    assert convert.heads_from_proto([pb.HEAD_ANSWER] * 2) == {Head.ANSWER}  # duplicate ignored
    with pytest.raises(InvalidArgument, match=r"heads: 3 entries exceeds 2"):
        convert.heads_from_proto([pb.HEAD_ANSWER] * 3)
    with pytest.raises(InvalidArgument, match=r"heads\[0\]: unknown head 0"):
        convert.heads_from_proto([pb.HEAD_UNSPECIFIED])


def test_seed_maps_are_read_in_place_and_reading_adds_no_task() -> None:
    """The core checks a seed map's size before copying it: the converter reads the proto
    map in place, and a missing task is a KeyError there, not a new empty entry."""
    message = pb.CurateOptions()
    message.question_seed_scores["d"].scores.extend([1.0, 2.0])
    seeds = convert.curate_options_from_proto(message).question_seed_scores
    assert len(seeds) == 1 and list(seeds["d"]) == [1.0, 2.0] and list(seeds) == ["d"]
    assert "x" not in seeds and seeds.get("x") is None
    assert list(message.question_seed_scores) == ["d"]


def test_every_core_code_maps_to_the_grpc_status_of_the_same_name_and_number() -> None:
    for code in Code:
        error = Align2Error("x")
        error.code = code
        status = status_code(error)
        assert status.name == code.name and status.value[0] == int(code)


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("Bearer other", True),
        ("Bearer s3cre", False),
        ("Bearer s3cret2", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("", False),
    ],
)
def test_bearer_token_check(header: str, allowed: bool) -> None:
    interceptor = BearerTokenInterceptor([b"s3cret", b"other"], open_health=True)
    assert interceptor._allowed([("authorization", header)] if header else []) is allowed


def test_metadata_value() -> None:
    metadata = (("a", "1"), ("x-align2-priority", "bulk"))
    assert convert.metadata_value(metadata, "x-align2-priority") == "bulk"
    assert convert.metadata_value(metadata, "b") is None


async def test_image_markers_are_not_checked_anywhere() -> None:
    """The server does not use image_marker: unknown values pass Score, Align and Curate."""
    markers = [*pb.ImageMarker.values(), 9]
    request = pb.ScoreRequest(samples=[pb.Sample(id=str(m), image_marker=m) for m in markers])
    assert [s.id for s in convert.score_call_from_proto(request, LimitsConfig(), None).samples] == [
        "0",
        "1",
        "2",
        "3",
        "9",
    ]
    align = pb.AlignRequest(samples=[pb.Sample(id="x", image_marker=7)])
    aligned = convert.align_call_from_proto(align, LimitsConfig(), None)
    assert [s.id for s in aligned.samples] == ["x"]

    async def requests() -> AsyncIterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions())
        yield pb.CurateRequest(sample=pb.Sample(id="new", image_marker=9))

    read = [item async for item in convert.curate_requests_from_proto(requests(), LimitsConfig())]
    assert len(read) == 2


def test_server_info_reports_what_each_unset_option_means_from_the_config() -> None:
    """A proto-only client learns the defaults its results were made with. Fails on: a
    default not reported, or reported from the code's defaults instead of the config."""
    config = config_module.load(
        None,
        {
            "align.review": False,
            "align.template": "house-v2",
            "align.decoding.max_new_tokens": 77,
            "align.decoding.temperature": 0.7,
            "align.decoding.top_p": 0.9,
            "align.decoding.seed": 2**63 + 5,
            "curate.question_keep_fraction": 0.5,
            "curate.answer_keep_fraction": 0.25,
            "curate.min_window": 7,
            "curate.warm_up_idle_ms": 0,
            "curate.selection_key_idle_seconds": 12.5,
        },
    )
    defaults = convert.server_info_to_proto(config, [], [], "1.0").defaults
    decoding = defaults.decoding
    assert all(decoding.HasField(f) for f in ("max_new_tokens", "temperature", "top_p", "seed"))
    assert (decoding.max_new_tokens, decoding.seed) == (77, 2**63 + 5)
    assert (decoding.temperature, decoding.top_p) == pytest.approx((0.7, 0.9))
    assert (defaults.review, defaults.template) == (False, "house-v2")
    assert (defaults.question_keep_fraction, defaults.answer_keep_fraction) == (0.5, 0.25)
    assert (defaults.min_window, defaults.warm_up_idle_ms) == (7, 0)
    assert defaults.selection_key_idle_seconds == 12.5


def test_server_info_reports_the_batch_delay_in_seconds_and_stream_slots_only_with_curate() -> None:
    config = Config()
    config.batching.max_delay_ms = 5.0
    config.limits.max_stream_inflight = 32
    info = convert.server_info_to_proto(config, [], ["Score", "Curate"], "1.0")
    assert info.batching.max_delay_seconds == pytest.approx(0.005)
    assert info.limits.max_stream_inflight == 32
    config.score.enabled = False  # Curate needs Score: UNIMPLEMENTED, announced as 0 slots
    info = convert.server_info_to_proto(config, [], ["Align"], "1.0")
    assert info.limits.max_stream_inflight == 0


def test_responses_report_queue_and_compute_time_each_in_its_field() -> None:
    align = convert.align_response_to_proto(
        AlignOutcome([], None, "default-v1", "abc", 3, 4, queue_seconds=0.25, compute_seconds=1.5)  # type: ignore[arg-type]
    )
    assert (align.timing.queue_seconds, align.timing.compute_seconds) == (0.25, 1.5)
    assert (align.tokens.prompt_tokens, align.tokens.generated_tokens) == (3, 4)
    score = convert.score_response_to_proto(
        ScoreOutcome([], None, None, "v1", queue_seconds=0.25, compute_seconds=1.5)  # type: ignore[arg-type]
    )
    assert (score.timing.queue_seconds, score.timing.compute_seconds) == (0.25, 1.5)


def test_unset_decoding_fields_are_left_to_the_server_defaults() -> None:
    unset = convert.decoding_from_proto(pb.DecodingOptions())
    assert (unset.max_new_tokens, unset.temperature, unset.top_p, unset.seed) == (
        None,
        None,
        None,
        None,
    )
    zero = convert.decoding_from_proto(pb.DecodingOptions(seed=0, max_new_tokens=7))
    assert (zero.seed, zero.max_new_tokens) == (0, 7)


async def test_a_curate_message_with_neither_item_is_named_by_its_position() -> None:
    async def messages() -> AsyncIterator[pb.CurateRequest]:
        yield pb.CurateRequest(options=pb.CurateOptions())
        yield pb.CurateRequest(sample=pb.Sample(id="a"))
        yield pb.CurateRequest()

    read: list[object] = []
    with pytest.raises(InvalidArgument, match=r"^item: message 2 carries neither"):
        async for item in convert.curate_requests_from_proto(messages(), LimitsConfig()):
            read.append(item)
    assert isinstance(read[0], CurateOptions) and len(read) == 2


def test_a_sample_over_the_turn_or_candidate_limit_is_not_converted_text_by_text() -> None:
    """What the core refuses by its count alone is not read: 8 million empty turns took 17 s
    of conversion on the event loop to be refused. The count survives, so the refusal
    names it. Fails on: each turn converted (distinct Turn objects, texts kept)."""
    limits = LimitsConfig(max_turns=4, max_candidates=2)
    many = pb.Sample(id="m", turns=[pb.Turn(question=f"q{i}") for i in range(10_000)])
    turns = convert.sample_from_proto(many, limits).turns
    assert len(turns) == 10_000
    assert len({id(t) for t in turns}) == 1 and turns[0].question == ""
    wide = pb.Sample(
        turns=[
            pb.Turn(question="a", answer_candidates=["x", "y"]),
            pb.Turn(question="b", answer_candidates=[f"c{i}" for i in range(50)]),
        ]
    )
    first, second = convert.sample_from_proto(wide, limits).turns
    assert first.candidates == ("x", "y")
    assert (second.question, second.candidates) == ("b", ("",) * 50)
    within = pb.Sample(turns=[pb.Turn(question="q", answer="a")] * 4)
    assert [t.answer for t in convert.sample_from_proto(within, limits).turns] == ["a"] * 4


def test_the_works_deadline_leaves_a_margin_to_answer_before_the_callers() -> None:
    """Fails on: the work's deadline equal to the call's (items expiring as the call ends
    have their answers lost with it)."""
    now = time.monotonic()
    assert convert.deadline_from(None) is None
    long = convert.deadline_from(10.0)
    assert long is not None and 9.9 - 0.05 <= long - now <= 9.9 + 0.05  # 100 ms before
    short = convert.deadline_from(0.5)
    assert short is not None and 0.45 - 0.05 <= short - now <= 0.45 + 0.01  # a tenth
    assert convert.deadline_from(-1.0) is not None  # past: no margin, still a deadline
