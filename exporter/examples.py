"""Example tensors for building plans: from an ``args_shape`` signature, resized along dynamic axes.

A build traces on one set of examples and checks the graph on up to three (:func:`resize`): the traced
sizes, the caller's own, and every dynamic axis two larger, which catches sizes baked into the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from planwire.exporter.dtypes import DTypeLike, torch_dtype

TRACE_SIZE = 3  # example size of a dynamic axis (torch.export specializes sizes 0 and 1)

Axes = frozenset[int]


def args_signature(
    args_shape: Sequence[Sequence[int]], args_dtypes: DTypeLike | Sequence[DTypeLike] | None
) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    if args_dtypes is None:
        dtypes: list[DTypeLike] = [torch.float32] * len(args_shape)
    elif isinstance(args_dtypes, torch.dtype | str | np.dtype | type):
        dtypes = [args_dtypes] * len(args_shape)
    else:
        dtypes = list(args_dtypes)
        if len(dtypes) != len(args_shape):
            raise ValueError(f"args_dtypes has {len(dtypes)} entries for {len(args_shape)} shapes")
    out = []
    for i, shape in enumerate(args_shape):
        shape = tuple(shape)
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ValueError(f"args_shape[{i}] = {shape}: sizes must be ints >= 0, or -1 for any size")
        out.append((torch_dtype(dtypes[i]), shape))
    return out


def random_examples(
    signature: Sequence[tuple[torch.dtype, tuple[int, ...]]], dynamic: list[Axes]
) -> list[torch.Tensor]:
    """Seeded random tensors for a signature; -1 (dynamic) sizes become TRACE_SIZE."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for (dtype, shape), axes in zip(signature, dynamic, strict=True):
        size = [TRACE_SIZE if d == -1 or (a in axes and d < 2) else d for a, d in enumerate(shape)]
        out.append(random_tensor(dtype, size, gen))
    return out


def random_tensor(dtype: torch.dtype, size: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(size, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, size, generator=gen).bool()
    return torch.randint(0, 5, size, generator=gen).to(dtype)  # small non-negative: index-safe


def resize(t: torch.Tensor, axes: Axes, size: Callable[[int], int]) -> torch.Tensor:
    """``t`` with each axis in ``axes`` tiled (or, when empty, randomly filled) to ``size(old)``."""
    for axis in sorted(axes):
        old = t.shape[axis]
        new = size(old)
        if new == old:
            continue
        if old == 0:
            shape = list(t.shape)
            shape[axis] = new
            t = random_tensor(t.dtype, shape, torch.Generator().manual_seed(1))
        else:
            reps = [1] * t.dim()
            reps[axis] = -(-new // old)
            t = t.repeat(*reps).narrow(axis, 0, new)
    return t


def output_names(n: int, inputs: Sequence[str]) -> list[str]:
    names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
    return [f"{name}_" if name in inputs else name for name in names]
