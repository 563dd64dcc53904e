"""The protobuf wire format by hand, and hypothesis strategies that walk a message's
descriptor: the generic half of the wire fuzzer (tests/integration/test_wire_fuzz.py).

Every field is drawn from its type's interesting values (numbers at their edges: 0,
negatives as 10-byte varints, 2^32 and 2^64 - 1 in 32-bit fields, NaN with and without
payload, infinities, subnormals, float32's largest; enums: unknown numbers; strings: invalid
UTF-8 next to ordinary text), absent, present, or present twice. The bytes are written here
rather than by protobuf's serializer, so that a case can hold what a real serializer refuses
to write (invalid UTF-8, out-of-range varints, unknown fields, a known number with the wrong
wire type), and repeated numbers come packed or not. ``Field`` overrides let a caller put
meaningful values into the fields that decide how deep a request goes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from hypothesis import strategies as st

T = TypeVar("T")
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
_U64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """A varint; a negative value as its 64-bit two's complement (10 bytes), as protobuf does."""
    value &= _U64
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """A string, bytes or message field: tag, length, payload."""
    return tag(number, LEN) + varint(len(payload)) + payload


def f32(value: float) -> bytes:
    return struct.pack("<f", value)


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says. (``st.one_of`` flattens
    nested one_ofs into equally likely branches: repeating a branch there weights nothing.)"""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


# -- values by type -------------------------------------------------------------------------
# Each strategy draws one encoded value (its payload, without tag): a varint's bytes, 4 or 8
# bytes of a fixed-width number, or the payload of a length-delimited field.

BAD_UTF8 = (
    b"\xff",  # never valid
    b"\xc3",  # a lead byte without its continuation
    b"\x80",  # a lone continuation byte
    b"\xc0\xaf",  # an overlong "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate (U+D800)
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
)

invalid_utf8 = st.tuples(
    st.sampled_from([b"", b"ok ", b"<image>\n"]), st.sampled_from(BAD_UTF8), st.binary(max_size=4)
).map(b"".join)

text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "\x00", "<image>", "\u202e\u200b", "\U0001f600" * 3]),
).map(str.encode)

strings = weighted((3, text), (1, invalid_utf8))

_U32_EDGES = [0, 1, 2, 3, 100, 2**31 - 1, 2**31, 2**32 - 1]
_U64_EDGES = [*_U32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, 2**63, _U64]
# Beyond a 32-bit field's range: parsers truncate such varints to 32 bits.
uint32s = st.one_of(
    st.integers(0, 16), st.sampled_from(_U32_EDGES), st.sampled_from(_U64_EDGES[8:])
).map(varint)
uint64s = st.one_of(st.integers(0, 16), st.sampled_from(_U64_EDGES), st.integers(0, _U64)).map(
    varint
)
int32s = st.one_of(
    st.integers(-2, 16), st.sampled_from([-(2**31), 2**31 - 1]), st.integers(-(2**31), 2**31 - 1)
).map(varint)
bools = st.sampled_from([0, 1, 2, 2**63, _U64]).map(varint)  # any non-zero varint is true

SPECIAL_F32 = (
    float("nan"),
    -float("nan"),
    float("inf"),
    -float("inf"),
    0.0,
    -0.0,
    1e-45,  # the smallest subnormal
    3.4028234663852886e38,  # float32's largest
    -3.4028234663852886e38,
    0.01,
    0.0099999998,  # float32's 0.01 read back
    0.5,
    1.0,
    1.0000001,
    2.0,
    2.0000002,
    -1.0,
)
floats32 = st.one_of(
    st.sampled_from(SPECIAL_F32).map(f32),
    st.floats(width=32).map(f32),
    # NaNs with a payload and the sign bit: not every parser keeps them as they are
    st.sampled_from([0x7F800001, 0x7FC00001, 0xFFFFFFFF, 0xFF800001]).map(
        lambda bits: struct.pack("<I", bits)
    ),
)
doubles = st.one_of(st.sampled_from([*SPECIAL_F32, 1e300, -1e300, 5e-324]), st.floats()).map(
    lambda v: struct.pack("<d", v)
)


def enums(descriptor: EnumDescriptor, known_only: bool = False) -> st.SearchStrategy[bytes]:
    """Known values mostly; unknown and negative numbers (10-byte varints) too."""
    known = [v.number for v in descriptor.values]
    if known_only:
        return st.sampled_from(known).map(varint)
    unknown = st.sampled_from([max(known) + 1, 99, -1, -(2**31), 2**31 - 1])
    return weighted((3, st.sampled_from(known)), (1, unknown)).map(varint)


_SCALARS: dict[int, st.SearchStrategy[bytes]] = {
    FieldDescriptor.TYPE_STRING: strings,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=32),
    FieldDescriptor.TYPE_FLOAT: floats32,
    FieldDescriptor.TYPE_DOUBLE: doubles,
    FieldDescriptor.TYPE_UINT32: uint32s,
    FieldDescriptor.TYPE_UINT64: uint64s,
    FieldDescriptor.TYPE_INT32: int32s,
    FieldDescriptor.TYPE_BOOL: bools,
}
_WIRE_TYPES = {
    FieldDescriptor.TYPE_FLOAT: FIXED32,
    FieldDescriptor.TYPE_DOUBLE: FIXED64,
    FieldDescriptor.TYPE_STRING: LEN,
    FieldDescriptor.TYPE_BYTES: LEN,
    FieldDescriptor.TYPE_MESSAGE: LEN,
}


def wire_type(field: FieldDescriptor) -> int:
    return _WIRE_TYPES.get(field.type, VARINT)


# -- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """How to draw one field instead of from its type's values.

    ``values``: one encoded value (payload); ``count``: how many times the field occurs
    (singular: 0 absent, 2 twice, when the last wins or messages merge)."""

    values: st.SearchStrategy[bytes] | None = None
    count: st.SearchStrategy[int] | None = None


@dataclass(frozen=True)
class Profile:
    """How a message's fields are drawn: ``overrides`` by the field's full name (e.g.
    "align2.v1.Sample.image"); ``valid``: enums only their known values, and unknown fields
    only undeclared numbers (what a newer client may send), so that the overrides alone
    decide what is out of range."""

    overrides: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    valid: bool = False


HOSTILE = Profile()

# A singular field: mostly present, sometimes absent, now and then twice.
SINGULAR_COUNT = st.sampled_from([1, 1, 1, 0, 0, 2])
REPEATED_COUNT = st.integers(0, 3)


def values_of(field: FieldDescriptor, profile: Profile) -> st.SearchStrategy[bytes]:
    override = profile.overrides.get(field.full_name)
    if override is not None and override.values is not None:
        return override.values
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return st.deferred(lambda: message(field.message_type, profile))
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enums(field.enum_type, known_only=profile.valid)
    return _SCALARS[field.type]


def encoded_field(field: FieldDescriptor, profile: Profile) -> st.SearchStrategy[bytes]:
    """Every occurrence of ``field`` in a message: tagged values, or one packed run."""
    override = profile.overrides.get(field.full_name)
    count = override.count if override is not None and override.count is not None else None
    if count is None:
        count = REPEATED_COUNT if field.is_repeated else SINGULAR_COUNT
    items = count.flatmap(lambda n: st.lists(values_of(field, profile), min_size=n, max_size=n))
    kind = wire_type(field)
    if field.is_repeated and kind != LEN:
        # Repeated numbers: packed (proto3's default) or one field per value; parsers take both.
        return st.tuples(items, st.booleans()).map(
            lambda drawn: (
                length_delimited(field.number, b"".join(drawn[0]))
                if drawn[1] and drawn[0]
                else b"".join(tag(field.number, kind) + v for v in drawn[0])
            )
        )
    if kind == LEN:
        return items.map(lambda vs: b"".join(length_delimited(field.number, v) for v in vs))
    return items.map(lambda vs: b"".join(tag(field.number, kind) + v for v in vs))


def unknown_fields(descriptor: Descriptor, declared: bool = True) -> st.SearchStrategy[bytes]:
    """Fields the message does not declare, and (``declared``) declared numbers with the
    wrong wire type (parsers keep both as unknown fields or refuse the message)."""
    known = {f.number for f in descriptor.fields}
    numbers = st.integers(1, 2**29 - 1).filter(
        lambda n: n not in known and not 19000 <= n <= 19999  # 19000-19999: reserved
    )
    if declared:
        numbers = st.one_of(st.sampled_from(sorted(known) or [1]), numbers)
    payloads = st.one_of(
        st.tuples(st.just(VARINT), uint64s),
        st.tuples(st.just(FIXED32), floats32),
        st.tuples(st.just(FIXED64), doubles),
        st.tuples(st.just(LEN), st.binary(max_size=16).map(lambda b: varint(len(b)) + b)),
    )
    one = st.tuples(numbers, payloads).map(lambda d: tag(d[0], d[1][0]) + d[1][1])
    return st.lists(one, max_size=2).map(b"".join)


def message(descriptor: Descriptor, profile: Profile = HOSTILE) -> st.SearchStrategy[bytes]:
    """Encoded messages of ``descriptor``: each field drawn (see the module doc), in
    declaration order, then now and then unknown fields."""
    fields = [encoded_field(f, profile) for f in descriptor.fields]
    unknown = unknown_fields(descriptor, declared=not profile.valid)
    extras = weighted((5, st.just(b"")), (1, unknown))
    return st.tuples(*fields, extras).map(b"".join)
