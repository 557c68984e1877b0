"""Turning user tensors into numpy arrays and back, without importing torch.

torch tensors are recognised by duck typing (``detach``/``numpy``). Results come back as torch tensors
when the calling process already uses torch, else as numpy arrays: a worker-only install never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

TAG_ATTR = "_planwire_tags"  # where tag() keeps a tensor's tags


def as_array(value: Any) -> np.ndarray:
    """A C-contiguous numpy view or copy of a numpy array, torch tensor, scalar or nested list."""
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, without importing torch
        t = value.detach()
        if getattr(t, "device", None) is not None and str(t.device) != "cpu":
            t = t.cpu()
        if hasattr(t, "resolve_conj"):
            t = t.resolve_conj().resolve_neg()
        arr = t.numpy()
    else:
        arr = np.asarray(value)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def wrap(array: np.ndarray) -> Any:
    """The caller's tensor type: torch.Tensor if torch is in use in this process, else the numpy array."""
    torch = sys.modules.get("torch")
    if torch is None:
        return array
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def tags_of(value: Any) -> tuple[str, ...]:
    """Tags attached to a tensor with ``tag()``; empty when it has none."""
    return tuple(getattr(value, TAG_ATTR, ()) or ())


def set_tags(value: Any, tags: Iterable[str]) -> Any:
    """Attach tags to a tensor (kept on the object); returns it for chaining."""
    merged = tuple(dict.fromkeys([*tags_of(value), *map(str, tags)]))
    setattr(value, TAG_ATTR, merged)
    return value
