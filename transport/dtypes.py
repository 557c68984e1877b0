"""Tensor element types on the wire: ONNX type names mapped to numpy dtypes.

The wire names are ONNX ``TensorProto.DataType`` names in lower case, the same strings onnxruntime shows
inside ``tensor(...)``, so a worker in any language can map them without knowing numpy.
"""

from __future__ import annotations

import numpy as np

# ONNX name -> numpy dtype (always little-endian on the wire).
WIRE_TO_NUMPY: dict[str, np.dtype] = {
    "float": np.dtype("<f4"),
    "double": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}
NUMPY_TO_WIRE: dict[np.dtype, str] = {v.newbyteorder("="): k for k, v in WIRE_TO_NUMPY.items()}
# numpy spellings users type, for error messages and args_dtypes.
FRIENDLY = {"float": "float32", "double": "float64"}


def to_numpy(wire: str) -> np.dtype:
    """The numpy dtype of a wire type name; ValueError names the unknown type."""
    try:
        return WIRE_TO_NUMPY[wire]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {wire!r}; known: {sorted(WIRE_TO_NUMPY)}") from None


def to_wire(dtype: np.dtype | type | str) -> str:
    """The wire type name of a numpy dtype; ValueError names the unsupported dtype."""
    if isinstance(dtype, np.dtype):  # the common case, a native-order dtype: one lookup
        wire = NUMPY_TO_WIRE.get(dtype)
        if wire is not None:
            return wire
    dt = np.dtype(dtype).newbyteorder("=")
    try:
        return NUMPY_TO_WIRE[dt]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {np.dtype(dtype)}; supported: {human_list()}") from None


def from_ort(type_str: str) -> str:
    """Wire name of an onnxruntime type string such as ``tensor(float)``."""
    return type_str.removeprefix("tensor(").removesuffix(")")


def human(wire: str) -> str:
    """A dtype as users write it (float32 rather than ONNX's 'float')."""
    return FRIENDLY.get(wire, wire)


def human_list() -> str:
    return ", ".join(human(w) for w in WIRE_TO_NUMPY)
