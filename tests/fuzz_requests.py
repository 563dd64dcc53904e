"""Hypothesis strategies for align2.v1 requests on the wire: the align2 half of the wire
fuzzer (tests/integration/test_wire_fuzz.py; the generic half is tests/wire.py).

A case is an RPC and its request bytes (for Curate, the stream's messages). Two profiles:
``clean`` fills the fields that decide how deep a request goes (images, turn texts, model and
template names, option ranges) mostly with values a real client sends, so that many cases
reach the models, the selection and the inner LLM; ``hostile`` draws every field from its
type's edges (wire.py). Both send odd images: empty, truncated, corrupt, non-image formats,
1x1, extreme aspect ratios, headers claiming huge dimensions in a tiny file, over
max_image_bytes, over the message limit. Repeats go one past their limits, and now and then
far past. Curate streams put options after samples, send messages with neither or both
members of the oneof, and mix in bytes that do not parse.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from hypothesis import strategies as st
from PIL import Image
from wire import (
    Field,
    Profile,
    floats32,
    length_delimited,
    message,
    strings,
    uint32s,
    varint,
    weighted,
)

from align2.v1 import curation_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The fuzzed server's limits that the strategies aim just inside and just past."""

    max_samples_per_call: int
    max_turns: int
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    max_new_tokens: int
    max_seed_scores: int
    max_candidates: int


@dataclass(frozen=True)
class Case:
    """One call: the RPC's name and its request bytes (Curate: the stream's messages)."""

    rpc: str
    messages: tuple[bytes, ...]

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying case
        shown = [m if len(m) <= 300 else m[:300] + b"...(%d bytes)" % len(m) for m in self.messages]
        return f"Case({self.rpc!r}, {shown!r})"


def mostly(usual: st.SearchStrategy[T], edges: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``usual`` three times in four."""
    return weighted((3, usual), (1, edges))


# -- images ---------------------------------------------------------------------------------

ACCEPTED = [
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "L"),
    ("PNG", "LA"),
    ("PNG", "P"),
    ("PNG", "1"),
    ("PNG", "I;16"),
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
]
REFUSED = [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("ICO", "RGBA"), ("PPM", "RGB")]


@cache
def encoded(fmt: str, mode: str, width: int, height: int, frames: int = 1) -> bytes:
    """An image of one colour (noise when small), ``frames`` > 1: animated (PNG, WebP)."""
    if width * height <= 64 * 64:
        image = Image.effect_noise((width, height), 60).convert(mode)
    else:
        image = Image.new(mode, (width, height))
    buffer = io.BytesIO()
    if frames > 1:
        rest = [Image.new(mode, (width, height), 255) for _ in range(frames - 1)]
        image.save(buffer, format=fmt, save_all=True, append_images=rest)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(
    width: int, height: int, depth: int = 8, colour: int = 2, extra: bytes = b""
) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` over a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + extra
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header now claims ``width`` x ``height``."""
    data = bytearray(encoded("JPEG", "RGB", 8, 8))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@cache
def text_bomb() -> bytes:
    """A PNG with 8 MB of text in 8 kB: PIL refuses it past its own text limits."""
    text = b"k\x00\x00" + zlib.compress(b"a" * (8 << 20))
    return png_claiming(4, 4, extra=png_chunk(b"zTXt", text))


NOT_IMAGES = [
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    b"PK\x03\x04\x14\x00\x00\x00",
    b"GIF89a\x01\x00\x01\x00",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/>",
    b"\x00" * 16,
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
]

DIMENSIONS = [0, 1, 2, 1023, 1024, 1025, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]


def images(limits: Limits) -> st.SearchStrategy[bytes]:
    """Image bytes: mostly small valid images of the accepted formats, and every kind of odd
    one. Sizes aim at the pixel limit: a side of about sqrt(max_image_pixels) passes as a
    line (1 x n) but not once padded to a square."""
    side = int(limits.max_image_pixels**0.5)
    small = st.tuples(st.integers(1, 48), st.integers(1, 48))
    shaped = st.sampled_from(
        [(1, 1), (1, side), (side, 1), (1, side + 1), (2 * side, 1), (side, side), (900, 7)]
    )
    valid = st.builds(
        lambda kind, size: encoded(*kind, *size),
        st.sampled_from(ACCEPTED),
        mostly(small, shaped),
    )
    animated = st.builds(
        lambda fmt, n: encoded(fmt, "RGBA", 8, 8, n),
        st.sampled_from(["PNG", "WEBP"]),
        st.integers(2, 3),
    )
    refused = st.builds(lambda kind: encoded(*kind, 8, 8), st.sampled_from(REFUSED))
    cut = st.tuples(valid, st.floats(0, 1)).map(lambda d: d[0][: int(len(d[0]) * d[1])])
    flipped = st.tuples(valid, st.floats(0, 1), st.integers(1, 255)).map(_flip)
    claimed = st.one_of(
        st.builds(png_claiming, st.sampled_from(DIMENSIONS), st.sampled_from(DIMENSIONS)),
        st.builds(
            png_claiming,
            st.integers(1, 40),
            st.integers(1, 40),
            st.sampled_from([1, 2, 3, 4, 8, 16, 32]),
            st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
        ),
        st.builds(jpeg_claiming, st.sampled_from([0, 1, 65535]), st.sampled_from([0, 1, 65535])),
    )
    junk = st.one_of(st.sampled_from(NOT_IMAGES), st.binary(max_size=64), st.builds(text_bomb))
    too_big = st.sampled_from([limits.max_image_bytes + 1, limits.max_message_bytes + 1]).map(
        lambda n: b"\x89PNG\r\n\x1a\n" + b"\x00" * (n - 8)
    )
    odd = st.one_of(st.just(b""), animated, refused, cut, flipped, claimed, junk, too_big)
    return weighted((4, valid), (1, odd))


def _flip(drawn: tuple[bytes, float, int]) -> bytes:
    data, where, mask = drawn
    if not data:
        return data
    at = min(int(len(data) * where), len(data) - 1)
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


# -- fields ---------------------------------------------------------------------------------

TEXTS = [
    "What is in the image?",
    "<image>\nWhat colour is the box?",
    "What is this?\n<image>",
    "It is a red box with 3 corners.",
    "Paris",
]
EMPTY_TEXTS = ["", "   ", "<image>", "<image> <image>"]  # empty once the marker is removed
NESTED_MARKERS = ["<ima<image>ge> What is it?", "<<image>image>", "<image<image>>"]
"""Texts that hold ``<image>`` once their markers are removed (refused, never scored)."""


def texts(clean: bool) -> st.SearchStrategy[bytes]:
    """Turn texts: sensible ones mostly; empty ones, any text, and texts far over
    max_text_tokens (and, hostile, invalid UTF-8) now and then."""
    usual = st.sampled_from(TEXTS).map(str.encode)
    empty = st.sampled_from(EMPTY_TEXTS).map(str.encode)
    odd = st.one_of(
        st.text(max_size=40).map(str.encode),
        st.integers(300, 4000).map(lambda n: b"word " * n),
        st.sampled_from(NESTED_MARKERS).map(str.encode),
        st.just(b"w" * (64 * 1024 + 1)),  # one byte over the default limits.max_text_bytes
    )
    if not clean:
        return weighted((4, usual), (1, empty), (1, odd), (1, strings))
    return weighted((12, usual), (1, empty), (1, odd))


def names(*usual: str) -> st.SearchStrategy[bytes]:
    return mostly(st.sampled_from(usual).map(str.encode), st.text(max_size=12).map(str.encode))


def counts(limit: int, far: int) -> st.SearchStrategy[int]:
    """Repeats: 1..limit mostly, 0 and limit + 1 sometimes, ``far`` now and then."""
    return weighted(
        (12, st.integers(1, limit)), (2, st.sampled_from([0, limit + 1])), (1, st.just(far))
    )


# A field a request needs (an image, a turn's texts): present, and now and then absent or
# twice (the last one wins).
NEEDED = weighted((12, st.just(1)), (1, st.sampled_from([0, 2])))


def f32s(*usual: float) -> st.SearchStrategy[bytes]:
    return mostly(st.sampled_from(usual).map(lambda v: struct.pack("<f", v)), floats32)


def profile(limits: Limits, clean: bool) -> Profile:
    """How the fields are drawn (see the module doc)."""
    tasks = names("", "conversation", "detail", "complex_reasoning")
    seed_count = mostly(st.integers(0, 12), st.just(limits.max_seed_scores + 1))
    seeds = mostly(st.floats(-8, 8, width=32).map(lambda v: struct.pack("<f", v)), floats32)
    table: dict[str, Field] = {
        "align2.v1.Sample.image": Field(images(limits), NEEDED),
        "align2.v1.Sample.turns": Field(count=counts(limits.max_turns, 70)),
        "align2.v1.Turn.question": Field(texts(clean), NEEDED),
        "align2.v1.Turn.answer": Field(texts(clean), NEEDED),
        "align2.v1.Turn.answer_candidates": Field(count=st.just(0)),
        "align2.v1.ScoreRequest.samples": Field(count=counts(limits.max_samples_per_call, 200)),
        "align2.v1.AlignRequest.samples": Field(count=counts(limits.max_samples_per_call, 200)),
        "align2.v1.ScoreList.scores": Field(seeds, seed_count),
    }
    table["align2.v1.Sample.turns"] = Field(
        turns(Profile(table, valid=clean), limits), counts(limits.max_turns, 70)
    )
    if not clean:
        return Profile(table)
    optional = st.sampled_from([0, 0, 1])
    models = names("question", "answer", "llm")  # llm: not a reward model
    table |= {
        "align2.v1.Sample.id": Field(names("s", "", "x" * 300)),
        "align2.v1.Sample.task": Field(tasks),
        "align2.v1.ScoreRequest.question_model": Field(models, optional),
        "align2.v1.ScoreRequest.answer_model": Field(models, optional),
        "align2.v1.ScoreRequest.heads": Field(
            mostly(st.sampled_from([pb.HEAD_QUESTION, pb.HEAD_ANSWER]), st.just(0)).map(varint)
        ),
        "align2.v1.AlignOptions.template": Field(names("", "default-v1", "default-v2")),
        "align2.v1.DecodingOptions.max_new_tokens": Field(
            mostly(st.integers(1, limits.max_new_tokens).map(varint), uint32s), optional
        ),
        "align2.v1.DecodingOptions.temperature": Field(f32s(0.0, 0.5, 1.0, 2.0), optional),
        "align2.v1.DecodingOptions.top_p": Field(f32s(1.0, 0.9, 0.5), optional),
        "align2.v1.CurateOptions.question_keep_fraction": Field(f32s(0.3, 0.5, 1.0), optional),
        "align2.v1.CurateOptions.answer_keep_fraction": Field(f32s(0.3, 0.5, 1.0), optional),
        "align2.v1.CurateOptions.min_window": Field(mostly(st.integers(1, 3).map(varint), uint32s)),
        "align2.v1.CurateOptions.selection_key": Field(names("", "", "k1", "k2", "x" * 257)),
    }
    for entry in (
        "QuestionThresholds",
        "AnswerThresholds",
        "QuestionSeedScores",
        "AnswerSeedScores",
    ):
        table[f"align2.v1.CurateOptions.{entry}Entry.key"] = Field(tasks)
    for entry in ("QuestionThresholds", "AnswerThresholds"):
        table[f"align2.v1.CurateOptions.{entry}Entry.value"] = Field(f32s(-1.0, 0.0, 1.0))
    for name in ("question_thresholds", "answer_thresholds"):
        table[f"align2.v1.CurateOptions.{name}"] = Field(count=st.sampled_from([0, 0, 0, 1, 2]))
    for name in ("question_seed_scores", "answer_seed_scores"):
        table[f"align2.v1.CurateOptions.{name}"] = Field(count=st.sampled_from([0, 0, 0, 1, 2]))
    return Profile(table, valid=True)


def turns(plain: Profile, limits: Limits) -> st.SearchStrategy[bytes]:
    """Turns with one answer mostly; now and then with candidate answers (best-of-n) and,
    mostly, no answer beside them."""
    with_candidates = Profile(
        {
            **plain.overrides,
            "align2.v1.Turn.answer": Field(count=weighted((6, st.just(0)), (1, st.just(1)))),
            "align2.v1.Turn.answer_candidates": Field(
                plain.overrides["align2.v1.Turn.answer"].values,
                counts(limits.max_candidates, 40),
            ),
        },
        plain.valid,
    )
    return weighted(
        (4, message(pb.Turn.DESCRIPTOR, plain)), (1, message(pb.Turn.DESCRIPTOR, with_candidates))
    )


# -- calls ----------------------------------------------------------------------------------


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A message cut short, with a byte flipped, or with bytes after it."""
    cut = st.tuples(valid, st.floats(0, 1)).map(lambda d: d[0][: int(len(d[0]) * d[1])])
    flipped = st.tuples(valid, st.floats(0, 1), st.integers(1, 255)).map(_flip)
    tail = st.tuples(valid, st.binary(min_size=1, max_size=8)).map(b"".join)
    return st.one_of(cut, flipped, tail)


def profile_calls(limits: Limits, clean: bool) -> st.SearchStrategy[Case]:
    table = profile(limits, clean)
    score = message(pb.ScoreRequest.DESCRIPTOR, table)
    align = message(pb.AlignRequest.DESCRIPTOR, table)
    options = message(pb.CurateOptions.DESCRIPTOR, table).map(lambda b: length_delimited(1, b))
    sample = message(pb.Sample.DESCRIPTOR, table).map(lambda b: length_delimited(2, b))
    odd_message = st.one_of(
        options,  # options after samples
        st.just(b""),  # neither member of the oneof
        st.tuples(options, sample).map(b"".join),  # both: the last wins
        message(pb.CurateRequest.DESCRIPTOR, table),
        mutated(sample),
    )
    stream = st.tuples(
        st.one_of(st.just(()), options.map(lambda o: (o,))),
        st.lists(weighted((6, sample), (1, odd_message)), max_size=5).map(tuple),
    ).map(lambda d: d[0] + d[1])
    return weighted(
        (2, st.tuples(st.just("Score"), score.map(lambda m: (m,)))),
        (2, st.tuples(st.just("Align"), align.map(lambda m: (m,)))),
        (3, st.tuples(st.just("Curate"), stream)),
    ).map(lambda d: Case(*d))


def calls(limits: Limits) -> st.SearchStrategy[Case]:
    """Any call of the fuzzer: clean and hostile profiles, GetServerInfo, raw bytes."""
    unary = st.sampled_from(["Score", "Align", "GetServerInfo"])
    raw = st.tuples(unary, st.binary(max_size=256).map(lambda m: (m,)))
    raw_stream = st.lists(st.binary(max_size=64), max_size=3).map(lambda ms: ("Curate", tuple(ms)))
    info = message(pb.GetServerInfoRequest.DESCRIPTOR).map(lambda m: ("GetServerInfo", (m,)))
    return weighted(
        (6, profile_calls(limits, clean=True)),
        (2, profile_calls(limits, clean=False)),
        (1, st.one_of(raw, raw_stream, info).map(lambda d: Case(*d))),
    )
