"""The runner's side of device-resident tensors: ``OrtValue``s on the plan device, by handle.

The supervisor's Store refers to a tensor the runner holds by a handle (worker/resident.py). Here each
handle maps to an onnxruntime ``OrtValue`` on the device (CUDA memory, or CPU memory on a CPU worker: the
same code path), so runs bind them as inputs and leave their outputs there: nothing crosses to the host
until the supervisor asks (``download``). Buffers the runner allocated and the supervisor freed go to a
pool that the next run may write its outputs into (a training step writes its new state into the buffers
of the state two steps back: two buffer sets alternate, nothing is copied); what that run does not reuse
is released, so a freed tensor's memory is held at most until the next run. Each held output says which
session's onnxruntime arena its memory is in (worker/arenas.py), so it can be copied out when that session goes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from planwire.transport import dtypes
from planwire.worker.device import Device


@dataclass(slots=True)
class _Held:
    value: object  # onnxruntime's C OrtValue
    keep: object = None  # the host buffer a CPU OrtValue wraps (kept alive with it), if any
    own: bool = False  # memory the runner allocated (an output): may be reused once freed
    arena: int = 0  # the token of the session whose arena holds its memory (0: none)
    private: int = 0  # bytes of the runner's own host memory it takes (counted in ``private_bytes``)
    ptr: int = 0  # its data's address (read once: a held value's memory does not move)
    kind: tuple | None = None  # (onnxruntime type, shape): its buffer's pool, when the caller read it already


@dataclass
class Counts:
    """What crossed between host and device, and buffers reused (the runner's answer to ``stats``)."""

    uploads: int = 0
    upload_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0
    reused: int = 0


class DeviceStore:
    """Handles -> OrtValues on ``device``, and the pool of freed output buffers."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.held: dict[int, _Held] = {}
        self.counts = Counts()
        self._pool: dict[tuple[str, tuple[int, ...]], list[object]] = {}
        self._ptrs: Counter[int] = Counter()  # held values by data address (outputs may alias inputs)
        self.private_bytes = 0  # of held values in the runner's own host memory (CPU, not wrapping a buffer)
        self.lent: dict[int, int] = {}  # data address -> arena token of the pooled buffers the last run was given
        self.lending = 0  # how many pooled buffers the last run was given
        self.addresses: list[int] | None = None  # the data address of each buffer the last run was given (0: none)

    def __len__(self) -> int:
        return len(self.held)

    def upload(self, array: np.ndarray) -> tuple[object, object]:
        """(OrtValue, host buffer it wraps or None) for a host array: on CPU a wrapper of the same memory
        (the array must stay alive: hold the second item), on CUDA a copy on the device."""
        self.counts.uploads += 1
        self.counts.upload_bytes += array.nbytes
        if not self.device.cuda:
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            return ort.OrtValue.ortvalue_from_numpy(array)._ortvalue, array
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device.id)
        return value._ortvalue, None

    def wrap(self, array: np.ndarray) -> tuple[object, object]:
        """(OrtValue, array) wrapping host memory on a CPU runner, without a copy (not counted)."""
        return ort.OrtValue.ortvalue_from_numpy(array)._ortvalue, array

    def copy(self, value: object) -> object:
        """A copy of a CPU OrtValue in memory of its own (not in the arena of the session that made it)."""
        host = value.numpy()  # type: ignore[attr-defined]
        out = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, host.dtype, "cpu")
        out.update_inplace(host)
        return out._ortvalue

    def hold(
        self,
        handle: int,
        value: object,
        keep: object = None,
        *,
        own: bool = False,
        arena: int = 0,
        nbytes: int | None = None,
        ptr: int | None = None,
        kind: tuple | None = None,
    ) -> None:
        """Hold ``value`` under ``handle``; ``own``: memory the runner allocated for it alone, which may be
        written again once freed (never a buffer that wraps host memory or aliases another value); ``arena``:
        the token of the session whose arena holds that memory; ``nbytes``, ``ptr``, ``kind``: its size, data
        address and (onnxruntime type, shape) when the caller read them already (else read here, or when
        freed)."""
        old = self.held.get(handle)
        if old is not None:
            self._ptrs[old.ptr] -= 1
            self.private_bytes -= old.private
        private = 0
        if not self.device.cuda and keep is None:
            private = value_nbytes(value) if nbytes is None else nbytes
        if ptr is None:
            ptr = value.data_ptr()  # type: ignore[attr-defined]
        self.held[handle] = _Held(value, keep, own, arena, private, ptr, kind)
        self._ptrs[ptr] += 1
        self.private_bytes += private

    def get(self, handle: int) -> object:
        """The OrtValue of ``handle``; KeyError when the runner does not hold it."""
        return self.held[handle].value

    def free(self, handles: Iterable[int]) -> None:
        """Forget ``handles`` (the supervisor dropped them); buffers the runner allocated join the pool."""
        pop, ptrs, pool = self.held.pop, self._ptrs, self._pool
        for h in handles:
            held = pop(h, None)
            if held is None:
                continue
            ptr = held.ptr
            self.private_bytes -= held.private
            left = ptrs[ptr] - 1
            if left > 0:
                ptrs[ptr] = left
                continue
            ptrs.pop(ptr, None)
            if held.own:  # nothing else held shares its memory: the next run may write into it
                kind = held.kind
                if kind is None:
                    v = held.value
                    kind = held.kind = (v.data_type(), tuple(v.shape()))  # type: ignore[attr-defined]
                pool.setdefault(kind, []).append(held)

    def buffers(self, shapes: list[tuple[str, tuple[int, ...]]] | None) -> list | None:
        """Pooled buffers for outputs of these (ONNX type, shape)s, None where there is none; None when no
        output can reuse one. ``lent`` says which arena each one's memory is in, ``addresses`` each one's data
        address (read when it was held: a run's output written into its buffer is that buffer, OrtPlan.run_bound)."""
        self.lent = lent = {}
        self.lending = 0
        self.addresses = None
        if not shapes or not self._pool:
            return None
        out: list = []
        addresses: list[int] = []
        pool, n = self._pool, 0
        for key in shapes:
            free = pool.get(key)
            if not free:
                out.append(None)
                addresses.append(0)
                continue
            held = free.pop()
            out.append(held.value)
            addresses.append(held.ptr)
            n += 1
            if held.arena:
                lent[held.ptr] = held.arena
        if not n:
            return None
        self.lending, self.addresses = n, addresses
        self.counts.reused += n
        return out

    def evacuate(self, arena: int) -> None:
        """Copy every held value whose memory is in the arena of session ``arena`` (or is shared with one that
        is) into memory of its own, so that arena goes with its session (an OrtValue keeps the arena its memory
        came from alive). A value onnxruntime cannot copy stays where it is."""
        if not arena:
            return
        for free in self._pool.values():  # freed buffers of that arena are not lent to a later run
            free[:] = [h for h in free if h.arena != arena]
        ptrs = {h.ptr for h in self.held.values() if h.arena == arena}
        copies: dict[int, object] = {}
        for handle, held in list(self.held.items()):
            ptr = held.ptr
            if ptr not in ptrs:
                continue
            if ptr not in copies:
                try:
                    copies[ptr] = self.copy(held.value)
                except Exception:  # noqa: BLE001  (memory at the bound: the arena stays for it)
                    ptrs.discard(ptr)
                    continue
            self.hold(handle, copies[ptr], own=held.own, kind=held.kind)  # (the copy wraps no host buffer)

    def release_pool(self) -> None:
        """Release what the last run did not reuse (its memory goes back to the device's allocator)."""
        self._pool.clear()

    def download(self, value: object, out: np.ndarray | None = None) -> np.ndarray:
        """A host copy of ``value``: into ``out`` when given (a shared-memory segment), else a new array.
        On CPU the OrtValue's memory is read directly (one copy)."""
        host = value.numpy()  # type: ignore[attr-defined]  # CPU: a view of the OrtValue's memory; CUDA: a copy
        self.counts.downloads += 1
        self.counts.download_bytes += host.nbytes
        if out is None:
            return host  # on CPU a view: send it before the next run
        out[...] = host
        return out


_KINDS: dict[str, tuple[str, int]] = {}  # onnxruntime type -> (wire dtype, item size)


def described(ort_type: str, shape: tuple[int, ...]) -> tuple[str, list[int], int]:
    """(wire dtype, shape, bytes) of a tensor of ``ort_type`` (``tensor(float)``) and ``shape``."""
    kind = _KINDS.get(ort_type)
    if kind is None:
        wire = dtypes.from_ort(ort_type)
        kind = _KINDS[ort_type] = (wire, dtypes.to_numpy(wire).itemsize)
    return kind[0], list(shape), math.prod(shape) * kind[1]


def value_meta(value: object) -> tuple[str, list[int]]:
    """(wire dtype, shape) of an OrtValue."""
    return dtypes.from_ort(value.data_type()), list(value.shape())  # type: ignore[attr-defined]


def value_info(value: object) -> tuple[str, list[int], int]:
    """(wire dtype, shape, bytes) of an OrtValue, read from onnxruntime once."""
    wire, shape = value_meta(value)
    return wire, shape, math.prod(shape) * dtypes.to_numpy(wire).itemsize


def value_nbytes(value: object) -> int:
    """Bytes of an OrtValue's tensor."""
    return value_info(value)[2]
