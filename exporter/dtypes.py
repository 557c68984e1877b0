"""torch dtypes on the wire: the torch side of ``planwire.transport.dtypes``."""

from __future__ import annotations

import numpy as np
import torch

from planwire.transport.dtypes import WIRE_TO_NUMPY, human_list, to_wire

TORCH_TO_WIRE: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.bool: "bool",
}
WIRE_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_WIRE.items()}

DTypeLike = torch.dtype | np.dtype | type | str


def wire_of(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; TypeError for dtypes a plan cannot carry (bfloat16, complex...)."""
    try:
        return TORCH_TO_WIRE[dtype]
    except KeyError:
        raise TypeError(f"unsupported tensor dtype {dtype}; supported: {human_list()}") from None


def torch_dtype(dtype: DTypeLike) -> torch.dtype:
    """A torch dtype from a torch dtype, numpy dtype, or name ("float32", "int64", wire "float")."""
    if isinstance(dtype, torch.dtype):
        wire_of(dtype)
        return dtype
    if isinstance(dtype, str) and dtype in WIRE_TO_NUMPY:  # wire names first: "float" is float32 here
        return WIRE_TO_TORCH[dtype]
    try:
        return WIRE_TO_TORCH[to_wire(np.dtype(dtype))]
    except (TypeError, ValueError) as e:
        raise TypeError(f"unsupported tensor dtype {dtype!r}; supported: {human_list()}") from e
