"""Pointers: local handles to tensors and plans that live on a worker."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from planwire.transport.arrays import wrap
from planwire.transport.dtypes import human
from planwire.transport.spec import PlanSource, PlanVariant

if TYPE_CHECKING:
    from planwire.transport.client import Client


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
        "tags",
        "owned",
        "private",
        "consumed",
        "_pending",
        "_inline",
        "__weakref__",
    )

    def __init__(
        self,
        worker: Client,
        key: str,
        dtype: str,
        shape: tuple[int, ...] | None,
        tags: tuple[str, ...] = (),
        *,
        owned: bool = True,
        private: bool = False,
    ) -> None:
        self.worker, self.key, self.dtype, self._shape = worker, key, dtype, shape
        self.tags, self.owned, self.private, self.consumed = tags, owned, private, False
        self._pending: int | None = None  # id of the run whose reply may carry this tensor's value
        self._inline: Any = None  # that value (numpy), when the reply carried it

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the remote tensor (asks the worker once when the plan's output shape is dynamic)."""
        if self._shape is None:
            if self._pending is not None:
                self.worker.settle(self._pending)
            inline = self._inline
            self._shape = tuple(inline.shape if inline is not None else self.worker.describe(self)[0].shape)
        return self._shape

    @property
    def value(self) -> Any:
        """The value its run's reply carried (fetched or small enough), or None; ``get()`` reads it too."""
        return None if self._inline is None else wrap(self._inline)

    def get(self, keep: bool = False) -> Any:
        """The tensor's value (torch.Tensor when torch is in use). Moves it off the worker unless ``keep``."""
        value = self.worker.fetch(self, keep=keep)
        if not keep and not self.private:
            self.consumed = True
        return value

    def __del__(self) -> None:
        if self.owned and not self.consumed:
            with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to free
                self.worker.release(self.key)

    def __repr__(self) -> str:
        shape = list(self._shape) if self._shape is not None else "?"
        tags = f" tags={list(self.tags)}" if self.tags else ""
        state = " (fetched)" if self.consumed else ""
        return f"[PointerTensor | me:{self.key} -> {self.worker.id}] {human(self.dtype)}{shape}{tags}{state}"


class PointerPlan:
    """A plan on ``worker``: a call sends one run message and returns result pointers at once."""

    def __init__(self, source: PlanSource, worker: Client) -> None:
        self.source = source
        self.worker = worker

    def __call__(self, *args: Any) -> Any:
        variant = self.variant_for(args)
        results = self.worker.run(variant, args, name=self.source.name)
        return results[0] if len(results) == 1 else tuple(results)

    def variant_for(self, args: tuple[Any, ...]) -> PlanVariant:
        """The source's variant for these arguments, registered on the worker."""
        variant = self.source.variant_for([self.worker.signature_of(a) for a in args])
        self.worker.ensure_plan(variant, self.source.name)
        return variant

    def __repr__(self) -> str:
        return f"[PointerPlan | me:{self.source.name} -> {self.worker.id}]"
