"""What a training-step build returns: the plan variant, its ports by role, and the initial state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from planwire.exporter.optim import Optimizer
from planwire.exporter.training.specs import VariantView
from planwire.transport.spec import PlanVariant


@dataclass(frozen=True)
class TrainingStep(VariantView):
    """A built training-step plan: the ONNX variant, its port names by role, and the initial state.

    ``state`` holds initial values (numpy) for every param/frozen/buffer/optim input, keyed by input
    name; ``hyper`` the default hyper-parameters (0-d float64 arrays). ``bindings`` maps each state
    output to the input it replaces on the next call.
    """

    name: str
    variant: PlanVariant
    model: onnx.ModelProto = field(repr=False)
    args: tuple[str, ...]
    hyper: dict[str, np.ndarray]
    params: tuple[str, ...]
    frozen: tuple[str, ...]
    buffers: tuple[str, ...]
    optim: tuple[str, ...]
    metrics: tuple[str, ...]
    bindings: dict[str, str]
    state: dict[str, np.ndarray] = field(repr=False)
    optimizer: Optimizer = field(repr=False)

    def feeds(
        self,
        args: Sequence[np.ndarray | Tensor],
        state: Mapping[str, np.ndarray] | None = None,
        **hyper: float,
    ) -> dict[str, np.ndarray]:
        """Input feed for one call: the batch, hyper-parameters (defaults overridden by ``hyper``), state."""
        unknown = {f"hyper.{k}" for k in hyper} - set(self.hyper)
        if unknown:
            raise KeyError(f"unknown hyper-parameters {sorted(unknown)}; this plan takes {list(self.hyper)}")
        feed = {name: numpy_of(a) for name, a in zip(self.args, args, strict=True)}
        feed.update(self.hyper)
        feed.update({f"hyper.{k}": np.asarray(v, dtype=np.float64) for k, v in hyper.items()})
        state = self.state if state is None else state
        feed.update({name: state[name] for name in (*self.params, *self.frozen, *self.buffers, *self.optim)})
        return feed

    def advance(self, state: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The state for the next call: ``state`` with every bound input replaced by its output."""
        new = dict(state)
        for name, value in zip(self.output_names, outputs, strict=True):
            if name in self.bindings:
                new[self.bindings[name]] = value
        return new

    def initial_state(self, model: nn.Module | None = None) -> dict[str, np.ndarray]:
        """Fresh state: ``model``'s parameters and buffers (default: the built ones), zero optimizer state.

        ``model`` must have the architecture the plan was built from (same names, shapes, dtypes).
        """
        if model is None:
            return {k: v.copy() for k, v in self.state.items()}
        values = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        state = {}
        for name in (*self.params, *self.frozen, *self.buffers):
            value = numpy_of(values[name.partition(".")[2]]).copy()
            if value.shape != self.state[name].shape or value.dtype != self.state[name].dtype:
                raise ValueError(
                    f"{name}: {value.dtype}{list(value.shape)} does not fit this plan's "
                    f"{self.state[name].dtype}{list(self.state[name].shape)}"
                )
            state[name] = value
        state.update({name: np.zeros_like(self.state[name]) for name in self.optim})
        return state

    def load_into(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Copy the parameters and buffers of ``state`` into ``model`` (in place, by module path)."""
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        with torch.no_grad():
            for name, value in state.items():
                role, _, path = name.partition(".")
                if role in ("param", "frozen", "buffer"):
                    tensors[path].copy_(torch.from_numpy(np.asarray(value)))


def numpy_of(value: np.ndarray | Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
