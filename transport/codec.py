"""Tensor codec: a numpy array becomes a small JSON description plus one raw frame, and back.

Bytes are little-endian, C order, sent as the array's own buffer (no copy) and read back as a numpy view
of the received frame (no copy) when it is aligned, as in vLLM's msgspec tensor codec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from planwire.transport import dtypes
from planwire.transport.errors import ProtocolError
from planwire.transport.messages import MAX_RANK

Buffer = bytes | bytearray | memoryview
_WIRE_TO_NUMPY = dtypes.WIRE_TO_NUMPY
prod = math.prod


def to_frame(array: np.ndarray) -> tuple[str, list[int], memoryview]:
    """(wire dtype, shape, buffer) of an array; the buffer aliases the array when it can."""
    wire = dtypes.to_wire(array.dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    # A flat byte view: zero-copy, and shape-independent for zmq (0-d arrays included; memoryview cannot
    # cast an empty array, numpy's view can).
    buf = memoryview(array).cast("B") if array.size else memoryview(array.reshape(-1).view(np.uint8))
    return wire, list(array.shape), buf


def from_frame(dtype: str, shape: Sequence[int], frame: Buffer, *, what: str = "tensor") -> np.ndarray:
    """A numpy view of a received frame; ProtocolError when dtype × shape disagrees with its size."""
    dt = _WIRE_TO_NUMPY.get(dtype)
    if dt is None:
        try:
            dt = dtypes.to_numpy(dtype)
        except ValueError as e:
            raise ProtocolError("invalid_message", f"{what}: {e}") from None
    kind = type(frame)
    if kind is bytearray or kind is bytes:  # read as is: the array's base is then the frame itself
        buf: Buffer = frame
        nbytes = len(frame)
    else:
        buf = frame if kind is memoryview and frame.format == "B" else memoryview(frame).cast("B")  # type: ignore[union-attr]
        nbytes = buf.nbytes  # type: ignore[union-attr]
    expected = prod(shape) * dt.itemsize
    if nbytes != expected:
        raise ProtocolError(
            "bad_frames",
            f"{what}: {dtypes.human(dtype)}{list(shape)} needs {expected} bytes, its frame has {nbytes}",
        )
    arr = np.frombuffer(buf, dtype=dt)
    if not arr.flags.aligned:  # unaligned small frames: copy once rather than fault later
        arr = arr.copy()
    try:
        return arr.reshape(shape)
    except ValueError:  # numpy's own bounds: at most 64 axes, and every axis product must fit in intp
        raise ProtocolError("invalid_message", f"{what}: shape {_shape_text(shape)} {_impossible(shape, dt)}") from None


def from_copied_frame(dtype: str, shape: Sequence[int], frame: Buffer) -> np.ndarray:
    """:func:`from_frame` in fewer steps for the usual small reply frame, a ``bytearray`` the link copied
    (its own memory, aligned by the allocator): the same array, writable, and the same errors (anything
    else, or any doubt, goes through from_frame)."""
    dt = _WIRE_TO_NUMPY.get(dtype)
    fits = dt is not None and type(frame) is bytearray and len(shape) <= MAX_RANK
    if fits and prod(shape) * dt.itemsize == len(frame):  # type: ignore[union-attr]
        try:
            return np.ndarray(shape, dt, frame)
        except ValueError:  # numpy's own bounds (e.g. [0, 2**62]): from_frame says why
            pass
    return from_frame(dtype, shape, frame)


def _shape_text(shape: Sequence[int]) -> str:
    text = str(list(shape))
    return text if len(text) <= 200 else text[:200] + "...]"


def _impossible(shape: Sequence[int], dt: np.dtype) -> str:
    """Why numpy cannot make an array of ``shape`` (its element count is checked before the frame size)."""
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} axes; at most {MAX_RANK} are allowed"
    return (
        f"cannot be represented: the product of its non-zero axes times {dt.itemsize} bytes must stay below "
        "2^63 even for an empty tensor"
    )
