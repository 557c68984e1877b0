"""Torch-side specs of a traced graph's inputs and outputs (name, role, dtype, shape, binding); views of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planwire.exporter.dtypes import wire_of
from planwire.transport.spec import PlanVariant, TensorSpec


class VariantView:
    """Names and bytes of a built step, read off its ``variant`` (shared by training and function steps)."""

    variant: PlanVariant

    @property
    def data(self) -> bytes:
        """The ONNX bytes of the plan."""
        return self.variant.data

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.variant.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.variant.outputs)


@dataclass(frozen=True)
class TorchSpec:
    """One graph input or output: its name, role, dtype and shape (a str is a dynamic axis' name)."""

    name: str
    role: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    binds: str | None = None  # for outputs: the input this output replaces on the next call

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, wire_of(self.dtype), tuple(self.shape), self.role)

    def meta(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "name": self.name,
            "role": self.role,
            "dtype": wire_of(self.dtype),
            "shape": list(self.shape),
        }
        if self.binds is not None:
            entry["binds"] = self.binds
        return entry
