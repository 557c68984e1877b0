"""What a plan looks like to its callers: typed inputs and outputs, and the ONNX bytes of each variant.

This is the contract between the exporter (which makes plans from torch) and the client side of the
transport (which sends them and calls them): neither needs the other's internals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

from planwire.transport.dtypes import human

Dim = int | str | None  # a fixed size, or a dynamic axis (its symbol, or None)

# Keys of the ONNX ``metadata_props`` a planwire plan carries (see schemas/PROTOCOL.md).
META_NAME = "planwire.name"
META_FORMAT = "planwire.format"  # "1"
META_INPUTS = "planwire.inputs"  # JSON list of {"name", "role", "dtype", "shape"}
META_OUTPUTS = "planwire.outputs"  # JSON list of {"name", "role", "dtype", "shape", "binds"?}
META_STATE = "planwire.state"  # JSON list of initializer names that hold plan state
META_KIND = "planwire.kind"  # "function" | "module" | "training"
META_TRAINING = "planwire.training"  # JSON {"optimizer": {"name", "hyper": {...}}, "loss", "targets", "train"}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (wire name) and shape of one plan input or output (a *port*); dynamic axes are str/None.
    ``role`` is what the plan's metadata says it is; ``binds``, for an output, the input it replaces on the
    next call (a training step's new state), where the metadata says so."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    role: str = "arg"
    binds: str | None = None

    def mismatch(self, dtype: str, shape: Sequence[int]) -> str | None:
        """Why a concrete tensor does not fit this spec, or None when it does."""
        if dtype != self.dtype:
            return f"expected dtype {human(self.dtype)}, got {human(dtype)}"
        if len(shape) != len(self.shape):
            return f"expected rank {len(self.shape)} {self.describe_shape()}, got shape {list(shape)}"
        for axis, (want, got) in enumerate(zip(self.shape, shape, strict=True)):
            if isinstance(want, int) and want != got:
                return f"expected shape {self.describe_shape()}, got {list(shape)} (axis {axis})"
        return None

    def describe_shape(self) -> str:
        return "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape) + "]"

    def __str__(self) -> str:
        return f"{self.name}: {human(self.dtype)}{self.describe_shape()}"


@dataclass(frozen=True)
class PlanVariant:
    """One built graph of a plan: its ONNX bytes and typed ports. Its id is the hash of the bytes."""

    data: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", plan_id(self.data))

    @cached_property
    def results(self) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
        """(dtype, shape when static else None) of each output: what a call's result pointers start with."""
        return tuple((o.dtype, o.shape if all(isinstance(d, int) for d in o.shape) else None) for o in self.outputs)  # type: ignore[misc]

    @cached_property
    def _fits(self) -> dict[tuple[tuple[str, tuple[int, ...]], ...], str | None]:
        return {}  # mismatch's answers by signature (a variant never changes: the answer neither)

    def mismatch(self, args: Sequence[tuple[str, Sequence[int]]]) -> str | None:
        """Why (dtype, shape) arguments do not fit this variant, or None when they do (remembered, up to 256
        signatures: a plan called in a loop asks the same question every call)."""
        if not _plain(args):
            return self._mismatch(args)
        fits = self._fits
        try:
            key = tuple(args)
            return fits[key]  # type: ignore[index]
        except KeyError:
            if len(fits) >= 256:  # bounded: past that many signatures, start afresh
                fits.clear()
            why = fits[key] = self._mismatch(args)  # type: ignore[index]
            return why
        except TypeError:  # a shape given as a list: not hashable, not remembered
            return self._mismatch(args)

    def _mismatch(self, args: Sequence[tuple[str, Sequence[int]]]) -> str | None:
        if len(args) != len(self.inputs):
            return f"expected {len(self.inputs)} arguments, got {len(args)}"
        for i, (spec, (dtype, shape)) in enumerate(zip(self.inputs, args, strict=True)):
            why = spec.mismatch(dtype, shape)
            if why:
                return f"argument {i} ({spec.name!r}): {why}"
        return None


@runtime_checkable
class PlanSource(Protocol):
    """Anything a PointerPlan can call: it names itself and yields the variant for given arguments."""

    name: str

    def variant_for(self, args: Sequence[tuple[str, Sequence[int]]]) -> PlanVariant:
        """The variant that accepts (dtype, shape) args, building one if it can; TypeError if none fits."""
        ...


def _plain(args: Sequence[tuple[str, Sequence[int]]]) -> bool:
    """Whether every dtype in ``args`` is a str and every size an int: only such signatures are remembered, as
    sizes of other types may compare and hash equal (3.0 and 3, True and 1) yet read apart in an answer."""
    for dtype, shape in args:  # plain loops: this runs on every call of a plan
        if type(dtype) is not str:
            return False
        for d in shape:
            if type(d) is not int:
                return False
    return True


def plan_id(data: bytes) -> str:
    """Content id of a plan: registering the same bytes twice is a no-op."""
    return hashlib.sha256(data).hexdigest()
