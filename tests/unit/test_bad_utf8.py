"""transport/bad_utf8.py: the path of the first string of a message that is not UTF-8."""

from __future__ import annotations

from align2.server.transport.bad_utf8 import bad_utf8_path
from align2.v1 import curation_pb2 as pb

LONE_SURROGATE = b"\xed\xa0\xbd"  # how protobufjs encodes half an emoji


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (payloads under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_valid_messages_and_non_messages_name_nothing() -> None:
    valid = pb.ScoreRequest(samples=[pb.Sample(id="é", turns=[pb.Turn(question="q")])])
    assert bad_utf8_path(valid.SerializeToString(), pb.ScoreRequest.DESCRIPTOR) is None
    assert bad_utf8_path(b"\x0a\x05\x0a\x01", pb.ScoreRequest.DESCRIPTOR) is None  # truncated
    assert bad_utf8_path(b"\xff\xff\xff\xff", pb.ScoreRequest.DESCRIPTOR) is None


def test_a_map_key_names_the_map_and_nesting_counts_repeats() -> None:
    # CurateRequest.options = 1; CurateOptions.question_thresholds = 7; entry: key 1, value 2
    entry_ok = field(1, b"detail") + b"\x15\x00\x00\x80\x3f"  # value 1.0f
    entry_bad = field(1, b"x" + LONE_SURROGATE)
    raw = field(1, field(7, entry_ok) + field(7, entry_bad))
    assert bad_utf8_path(raw, pb.CurateRequest.DESCRIPTOR) == "options.question_thresholds"
    # ScoreRequest.samples = 1; Sample.turns = 3; Turn.answer_candidates = 3 (repeated)
    turn = field(1, b"q") + field(3, b"fine") + field(3, b"bad" + LONE_SURROGATE)
    raw = field(1, field(1, b"s0")) + field(1, field(1, b"s1") + field(3, b"") + field(3, turn))
    expected = "samples[1].turns[1].answer_candidates[1]"
    assert bad_utf8_path(raw, pb.ScoreRequest.DESCRIPTOR) == expected
