"""Where a message that did not parse holds text that is not UTF-8.

proto3 ``string`` fields must be valid UTF-8, and protobuf refuses the whole message
otherwise ("String field had bad UTF-8"), without saying which field. Callers hit it from
JavaScript, whose strings may hold a lone surrogate (an emoji cut in half): so that the
error names the field, the bytes are walked here by wire type against the message's
descriptor, and the first string that does not decode is named as a request path
(``samples[1].turns[0].question``).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def bad_utf8_path(data: bytes, descriptor: Descriptor) -> str | None:
    """The path of the first ``string`` field of ``data`` (a message of ``descriptor``) that
    is not valid UTF-8; None if there is none, or the bytes are not a message at all."""
    try:
        return _walk(memoryview(data), descriptor, "")
    except (IndexError, ValueError):  # truncated or corrupt: nothing more to say
        return None


def _walk(data: memoryview, descriptor: Descriptor, prefix: str) -> str | None:
    counts: dict[int, int] = {}
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, position = _varint(data, position)
        elif wire == _FIXED64:
            position += 8
        elif wire == _FIXED32:
            position += 4
        elif wire == _LENGTH:
            size, position = _varint(data, position)
            value, position = data[position : position + size], position + size
            if len(value) < size:
                raise ValueError("truncated")
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(number, 0)
            counts[number] = index + 1
            path = _path(prefix, field, index)
            found = _check(value, field, path)
            if found is not None:
                return found
        else:  # groups (proto2 only) and invalid wire types
            raise ValueError(f"wire type {wire}")
    return None


def _check(value: memoryview, field: FieldDescriptor, path: str) -> str | None:
    if field.type == _STRING:
        try:
            str(value, "utf-8")
        except UnicodeDecodeError:
            return path
        return None
    if field.type == _MESSAGE:
        entry = field.message_type
        assert entry is not None  # a message field has its type
        found = _walk(value, entry, path)
        if entry.GetOptions().map_entry and found == f"{path}.key":
            return path  # a map's key: the map is the field a caller knows
        return found
    return None


def _path(prefix: str, field: FieldDescriptor, index: int) -> str:
    name = f"{prefix}.{field.name}" if prefix else field.name
    repeated = field.is_repeated
    entry = field.message_type
    is_map = entry is not None and entry.GetOptions().map_entry
    return f"{name}[{index}]" if repeated and not is_map else name


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
