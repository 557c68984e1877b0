"""Pointers: local handles to tensors and plans that live on a worker.

A result pointer holds the Call of the run that makes it and reads its value (when the reply carried one)
from there itself: no other code touches a pointer's state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex

from planwire.transport.arrays import wrap
from planwire.transport.dtypes import human, to_numpy
from planwire.transport.errors import NothingFound
from planwire.transport.spec import Dim, PlanSource, PlanVariant

if TYPE_CHECKING:
    import numpy as np

    from planwire.transport.client import WorkerClient
    from planwire.transport.connection import Call


class PointerTensor:
    """A tensor stored on ``worker`` under ``key``.

    ``owned`` pointers (results, sent tensors) free the remote copy when garbage-collected; pointers
    from ``search`` do not own the worker's data.
    """

    __slots__ = (
        "worker",
        "key",
        "dtype",
        "_shape",
        "_dims",
        "tags",
        "owned",
        "private",
        "consumed",
        "_call",
        "_value",
        "__weakref__",
    )

    def __init__(
        self,
        worker: WorkerClient,
        key: str,
        dtype: str,
        shape: tuple[int, ...] | None,
        tags: tuple[str, ...] = (),
        owned: bool = True,
        private: bool = False,
        call: Call | None = None,
        dims: tuple[Dim, ...] | None = None,
    ) -> None:
        self.worker, self.key, self.dtype, self._shape = worker, key, dtype, shape
        self.tags, self.owned, self.private, self.consumed = tags, owned, private, False
        self._dims = dims  # declared shape (dynamic axes as str/None) while the real one is unknown
        self._call = call  # the run whose reply may carry this tensor's value; None once read
        self._value: np.ndarray | None = None  # that value, when the reply carried it

    def _settle(self) -> np.ndarray | None:
        """Wait for the producing run's reply and keep the value it carried (None if it carried none).
        WorkerLost if the reply can never come."""
        call = self._call
        if call is not None:
            self._value = call.tensor(self.key)
            self._call = None
        return self._value

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the remote tensor (waits for its run, and asks the worker once when the plan's output
        shape is dynamic and the value did not come back with the run)."""
        if self._shape is None:
            value = self._settle()
            self._shape = tuple(value.shape if value is not None else self.worker.describe(self)[0].shape)
        return self._shape

    def signature(self) -> tuple[str, Sequence[Dim]] | None:
        """(dtype, shape) without waiting: the shape when known, else the declared one with its dynamic
        axes; None when neither is known."""
        if self._shape is not None:
            return self.dtype, self._shape
        if self._call is None and self._value is not None:
            return self.dtype, self._value.shape
        return None if self._dims is None else (self.dtype, self._dims)

    @property
    def value(self) -> Any:
        """The value its run's reply carried (fetched or small enough), or None; ``get()`` reads it too."""
        value = self._settle() if self._call is not None and self._call.done else self._value
        return None if value is None else wrap(value.copy())  # a copy: the kept value is this pointer's

    def get(self, keep: bool = False, *, progress: bool | None = None) -> Any:
        """The tensor's value (torch.Tensor when torch is in use). Moves it off the worker unless ``keep``.
        A value that came back with its run's reply costs no round trip (a move then frees the stored copy
        with the next frees). Over 64 MiB a progress bar shows on stderr (``progress=False`` or
        PLANWIRE_PROGRESS=0: none)."""
        if self.consumed:
            self.worker.check_pointer(self)  # raises, saying why
        call = self._call
        if call is not None:  # as _settle, inline: this is every call's path
            value = self._value = call.tensor(self.key)
            self._call = None
        else:
            value = self._value
        if value is None:
            nbytes = 0 if self._shape is None else math.prod(self._shape) * to_numpy(self.dtype).itemsize
            value = self.worker.fetch_arrays([self.key], keep=keep, progress=progress, nbytes=nbytes)[0]
        elif keep:  # the caller's own copy: writing to it must not change what the next read returns
            return wrap(value.copy())
        else:  # a move: the caller takes the value, the stored copy is freed with the next frees
            self._value = None
            self.worker.connection.release(self.key)
        if not keep and not self.private:
            self.consumed = True
        return wrap(value)

    def cancel(self) -> bool:
        """Stop the run that makes this tensor if the worker still has it queued or running; its outputs
        then read as failed, reason ``cancelled``. False when the run had already finished."""
        return self.worker.cancel(self)

    def __del__(self) -> None:
        if self.owned and not self.consumed:
            with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to free
                self.worker.connection.release(self.key)  # (WorkerClient.release, one call less per result)

    def __repr__(self) -> str:
        shape = list(self._shape) if self._shape is not None else "?"
        tags = f" tags={list(self.tags)}" if self.tags else ""
        state = " (fetched)" if self.consumed else ""
        return f"[PointerTensor | me:{self.key} -> {self.worker.id}] {human(self.dtype)}{shape}{tags}{state}"


class SearchResult(list):  # type: ignore[type-arg]
    """The pointers ``search(*tags)`` found; indexing an empty result says which tags and worker."""

    def __init__(self, pointers: Iterable[PointerTensor], *, tags: Sequence[str], worker: str) -> None:
        super().__init__(pointers)
        self.tags, self.worker = tuple(tags), worker

    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        if not self and not isinstance(index, slice):
            asked = ", ".join(map(repr, self.tags))
            raise NothingFound(
                f"search({asked}) found nothing on worker {self.worker!r}: no tensor there carries "
                f"{'all of these tags' if len(self.tags) > 1 else 'this tag'}; check the spelling, or list "
                "what the worker holds with search() (no tags)"
            )
        return super().__getitem__(index)


class PointerPlan:
    """A plan on ``worker``: a call sends one run message and returns result pointers at once."""

    def __init__(self, source: PlanSource, worker: WorkerClient) -> None:
        self.source = source
        self.worker = worker

    def __call__(self, *args: Any) -> Any:
        results = self.worker.run(self.variant_for(args), args, name=self.source.name)
        return results[0] if len(results) == 1 else tuple(results)

    def variant_for(self, args: tuple[Any, ...]) -> PlanVariant:
        """The source's variant for these arguments, registered on the worker. Pointers whose shape is
        still on its way (a run not yet answered) do not wait when exactly one known variant takes them
        whatever their dynamic axes turn out to be: the call is pipelined (the worker checks shapes). The source
        is asked every call (a rebuild replaces its variants; each variant remembers its answers: spec.py)."""
        worker = self.worker
        signature = []
        for a in args:
            if type(a) is PointerTensor:
                if a.worker is not worker or a.consumed:
                    worker.check_pointer(a)  # raises, saying why
                if a._shape is None:  # a run's result not read yet
                    variant = self._fits_unknown(args)
                    if variant is None:
                        signature = [worker.signature_of(a) for a in args]  # waits for the shapes
                        break
                    worker.ensure_plan(variant, self.source.name)
                    return variant
                signature.append((a.dtype, a._shape))
            else:
                signature.append(worker.signature_of(a))
        variant = self.source.variant_for(signature)
        worker.ensure_plan(variant, self.source.name)
        return variant

    def _fits_unknown(self, args: tuple[Any, ...]) -> PlanVariant | None:
        sigs: list[tuple[str, Sequence[Dim]]] = []
        for a in args:
            if isinstance(a, PointerTensor):
                self.worker.check_pointer(a)
                sig = a.signature()
                if sig is None:
                    return None
                sigs.append(sig)
            else:
                sigs.append(self.worker.signature_of(a))
        fits = [v for v in getattr(self.source, "variants", ()) if _may_fit(v, sigs)]
        return fits[0] if len(fits) == 1 else None

    def __repr__(self) -> str:
        return f"[PointerPlan | me:{self.source.name} -> {self.worker.id}]"


def _may_fit(variant: PlanVariant, args: Sequence[tuple[str, Sequence[Dim]]]) -> bool:
    """Whether arguments with some axes unknown (str/None) fit ``variant`` whatever those axes turn out to
    be: dtypes and ranks agree, known axes match, and every unknown axis is a dynamic axis of the plan."""
    if len(args) != len(variant.inputs):
        return False
    for spec, (dtype, shape) in zip(variant.inputs, args, strict=True):
        if dtype != spec.dtype or len(shape) != len(spec.shape):
            return False
        for want, got in zip(spec.shape, shape, strict=True):
            if isinstance(want, int) and (not isinstance(got, int) or want != got):
                return False
    return True
