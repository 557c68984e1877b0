"""The protobuf wire format, read by hand: the few ONNX fields the contract layer needs, without ``onnx``.

Callers pass bytes that :func:`planwire.transport.plancheck.check_model` has accepted (or that planwire
exported), so the walk is bounded; malformed input raises ValueError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

Buffer = bytes | bytearray | memoryview


def fields(buf: Buffer) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of every field of one message: an int for varints and fixed-size fields
    (fixed32/fixed64 as their raw little-endian integers), a memoryview for length-delimited ones."""
    for num, _, value in spans(buf):
        yield num, value


def spans(buf: Buffer) -> Iterator[tuple[int, memoryview, int | memoryview]]:
    """(field number, the field's own bytes, its key included, value as :func:`fields` gives it) of every field
    of one message: what a writer that keeps most fields as they are copies (worker/nchwc.py)."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    pos, end = 0, len(mv)
    while pos < end:
        start = pos
        key, pos = varint(mv, pos)
        num, wt = key >> 3, key & 7
        value: int | memoryview
        if wt == 0:
            value, pos = varint(mv, pos)
        elif wt == 2:
            n, pos = varint(mv, pos)
            if pos + n > end:
                raise ValueError("malformed protobuf: a field runs past its message")
            value = mv[pos : pos + n]
            pos += n
        elif wt in (1, 5):
            size = 8 if wt == 1 else 4
            if pos + size > end:
                raise ValueError("malformed protobuf: a field runs past its message")
            value = int.from_bytes(mv[pos : pos + size], "little")
            pos += size
        else:
            raise ValueError(f"malformed protobuf: wire type {wt} at byte {pos}")
        yield num, mv[start:pos], value


def varint(mv: memoryview | bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``."""
    value = shift = 0
    while True:
        if pos >= len(mv) or shift > 63:
            raise ValueError("malformed protobuf: bad varint")
        b = mv[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def signed(value: int) -> int:
    """An int64 field's value (negative numbers are sent as 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def ints(value: int | memoryview) -> list[int]:
    """The signed int64s of one occurrence of a repeated int field: a single varint, or a packed run."""
    if isinstance(value, int):
        return [signed(value)]
    out, pos = [], 0
    while pos < len(value):
        v, pos = varint(value, pos)
        out.append(signed(v))
    return out


def floats(value: int | memoryview) -> list[float]:
    """The float32s of one occurrence of a repeated float field (one fixed32, or a packed run)."""
    if isinstance(value, int):
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    return [v for (v,) in struct.iter_unpack("<f", value[: len(value) - len(value) % 4])]


def text(value: int | memoryview) -> str:
    """A string field (UTF-8, undecodable bytes replaced)."""
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""
