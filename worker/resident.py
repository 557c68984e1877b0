"""Resident: a stored tensor whose data the sandboxed runner holds on its device, as the Store sees it.

The supervisor runs no plans (but the direct lane's tiny ones, whose outputs are host arrays from the
start: worker/direct.py), so a run's outputs stay where they were computed: in the runner, as
``OrtValue``s on the plan device (worker/devstore.py), known here by handle. The Store keeps a Resident
in an entry's ``array``: it has the array's ``dtype``, ``shape`` and ``nbytes`` (quotas, describe, argument
checks need no data) and ``host``, its host copy once one exists. Tensors uploaded from the host (put,
the worker's own data) have one from the start; a result gets one when a client reads it (get, fetch,
inline results, a release), before a later run unless that run overwrites its key (worker/sandbox.py
``protect``: a crashing run then loses nothing but its own outputs), and after ``--host-copy-after``
idle seconds (``sync``). A runner that ends takes the tensors that had no host copy yet: those are
``lost`` and their keys fail with the reason; every other one is uploaded again by its next run.
Dropping the last reference frees the runner's copy.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import numpy as np


class Keeper(Protocol):
    """The tensors the runner holds (worker/handles.py): copies data to the host and frees handles."""

    def fetch(self, residents: list[Resident]) -> None: ...

    def drop(self, resident: Resident) -> None: ...


class Resident:
    """A tensor held by the runner under ``handle`` (of runner generation ``gen``; -1: no runner holds it)."""

    __slots__ = ("handle", "gen", "dtype", "shape", "size", "nbytes", "host", "born", "lost", "_keeper", "__weakref__")

    def __init__(
        self,
        keeper: Keeper,
        handle: int,
        gen: int,
        dtype: np.dtype,
        shape: tuple[int, ...] | list[int],
        host: Any = None,
        *,
        born: float = 0.0,
    ) -> None:
        self._keeper = keeper
        self.handle, self.gen = handle, gen
        self.dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        self.shape = shape = tuple(shape)
        self.size = size = math.prod(shape)  # read per step (quotas, the store's counts, stats): once
        self.nbytes = size * self.dtype.itemsize
        self.host: np.ndarray | None = host
        self.born = born or time.monotonic()  # (``born``: a run's outputs share one reading of the clock)
        self.lost = ""  # why its data is gone (the runner ended before a host copy was made)

    @classmethod
    def held(cls, keeper: Keeper, gen: int, handles: list[int], kinds: list[tuple], born: float) -> list[Resident]:
        """Residents of a run's outputs held under ``handles``, of ``kinds`` = (dtype, shape tuple, size, nbytes)
        each (read once per output, not per step), born at ``born``, with no host copy yet: in one call, not
        one per output (a training step's ~90 state tensors)."""
        new, out = cls.__new__, []
        for handle, (dtype, shape, size, nbytes) in zip(handles, kinds, strict=True):
            r = new(cls)
            r._keeper, r.handle, r.gen, r.host, r.born, r.lost = keeper, handle, gen, None, born, ""
            r.dtype, r.shape, r.size, r.nbytes = dtype, shape, size, nbytes
            out.append(r)
        return out

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def materialize(self) -> np.ndarray:
        """The host copy, fetched from the runner first when there is none (ProtocolError when lost)."""
        if self.host is None:
            self._keeper.fetch([self])
        assert self.host is not None
        return self.host

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.materialize()
        return array if dtype is None else array.astype(dtype)

    def __del__(self) -> None:
        try:  # noqa: SIM105  (a try costs a step's ~90 dying state tensors less than contextlib.suppress each)
            self._keeper.drop(self)
        except Exception:  # noqa: BLE001, S110  (at interpreter exit the keeper may be gone)
            pass

    def __repr__(self) -> str:
        where = "lost" if self.lost else "device+host" if self.host is not None else "device"
        return f"Resident(#{self.handle}, {self.dtype}{list(self.shape)}, {where})"


def hosts(arrays: list) -> list[np.ndarray]:
    """``host_of`` each, fetching the missing host copies in one request per runner."""
    pending: dict[int, tuple[Keeper, list[Resident]]] = {}
    for a in arrays:
        if isinstance(a, Resident) and a.host is None:
            pending.setdefault(id(a._keeper), (a._keeper, []))[1].append(a)
    for keeper, residents in pending.values():
        keeper.fetch(residents)
    return [host_of(a) for a in arrays]


def host_of(array: Any) -> np.ndarray:
    """A stored value as a host array: a Resident's host copy (fetched if need be), anything else as is."""
    return array.materialize() if isinstance(array, Resident) else array
