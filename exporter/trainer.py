"""Training plans on workers: the step is sent once, its state lives on the worker, each call is one message.

``training_plan(model, ...)`` builds the whole step (forward, loss, backward, optimizer update) as one
ONNX graph (see ``planwire.exporter.training``). ``send(worker)`` registers it and stores parameters,
buffers and optimizer state on the worker; each ``pointer(x, y)`` runs one step there and binds the
updated state back to the same keys, so weights never travel unless asked for (``state_dict``). The
pointer is the transport's generic :class:`~planwire.transport.bound.BoundPointer`, which also drives a
training plan loaded from its file without torch (``planwire.load_plan(path).send(worker, state=...)``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planwire.exporter import summary
from planwire.exporter.optim import Optimizer
from planwire.exporter.training import TrainingStep, build_training_step
from planwire.transport.bound import BoundPlan, BoundPointer
from planwire.transport.client import Client
from planwire.transport.spec import PlanVariant


class TrainingPlan:
    """A built training step; ``send`` it to a worker to train there."""

    def __init__(self, step: TrainingStep) -> None:
        self.step = step
        self.name = step.name
        self.variants = [step.variant]

    is_built = True

    def variant_for(self, args: Sequence[tuple[str, Sequence[int]]]) -> PlanVariant:
        why = self.step.variant.mismatch(args)
        if why:
            raise TypeError(f"training plan {self.name!r}: {why}")
        return self.step.variant

    @cached_property
    def bound(self) -> BoundPlan:
        """The step as a bound plan: bindings and default hyper-parameters read from its own metadata."""
        props = {p.key: p.value for p in self.step.model.metadata_props}
        return BoundPlan.from_metadata(self.step.variant, props, name=self.name)

    def send(self, worker: Client) -> TrainingPointer:
        """Register the step on ``worker`` and store its initial state there."""
        return TrainingPointer(self, worker)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the step as a standard .onnx file (ports, roles and bindings in its metadata).

        The graph takes the state as inputs: a device that runs the file feeds it the initial state
        (``step.state``, or ``step.initial_state(model)``) and then each call's bound outputs.
        ``planwire.load_plan`` reads it back (onnxruntime alone suffices), and its
        ``send(worker, state=...)`` trains it on a worker as ``send`` here does.
        """
        path = Path(path)
        path.write_bytes(self.step.variant.data)
        return path

    @property
    def parameter_count(self) -> int:
        """Elements of the model's parameters and buffers (optimizer state not counted)."""
        return sum(int(self.step.state[n].size) for n in (*self.step.params, *self.step.frozen, *self.step.buffers))

    def __repr__(self) -> str:
        """A bounded summary (ports, parameter count, bytes), never the weights."""
        return summary.line("TrainingPlan", self.name, self.variants, self.parameter_count)

    __str__ = __repr__


class TrainingPointer(BoundPointer):
    """A training step on a worker, with its state stored there under keys this pointer owns.

    The generic :class:`~planwire.transport.bound.BoundPointer` (driven by the plan's ``binds``
    metadata) with the built plan attached and ``state_dict`` in torch tensors.
    """

    def __init__(self, plan: TrainingPlan, worker: Client) -> None:
        self.plan, self.step = plan, plan.step
        super().__init__(plan.bound, worker, plan.step.state)

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """The trained parameters and buffers, fetched from the worker (copies; training goes on)."""
        return OrderedDict((k, torch.as_tensor(v)) for k, v in super().state_dict().items())


def training_plan(
    model: nn.Module,
    loss: Callable[..., Tensor] = F.cross_entropy,
    optimizer: Optimizer | None = None,
    args_shape: Sequence[Sequence[int]] | None = None,
    args_dtypes: Sequence[torch.dtype] | None = None,
    metrics: Sequence[str] = (),
    *,
    examples: Sequence[Tensor] | None = None,
    name: str | None = None,
    targets: int = 1,
    progress: bool | None = None,
) -> TrainingPlan:
    """A plan of one whole training step of ``model`` (forward, ``loss``, backward, ``optimizer`` update)
    that a worker runs in plain onnxruntime; hyper-parameters are inputs that can change per call.

    The batch is described by ``args_shape`` (one shape per argument, model inputs then targets, -1 for
    any size) and ``args_dtypes``, or by ``examples``: one example batch ``(x, y)``, whose first axis is
    taken as the (dynamic) batch axis. ``optimizer`` is a :mod:`planwire.optim` optimizer (default SGD).
    ``progress`` shows the build's stages on stderr when it takes over a second.
    """
    if examples is not None:
        if args_shape is not None or args_dtypes is not None:
            raise TypeError("training_plan takes args_shape/args_dtypes or examples, not both")
        tensors = [e if isinstance(e, Tensor) else torch.as_tensor(e) for e in examples]
        args_shape = [(-1, *t.shape[1:]) if t.dim() else () for t in tensors]
        args_dtypes = [t.dtype for t in tensors]
    step = build_training_step(
        model, loss, optimizer, args_shape, args_dtypes, metrics, targets=targets, name=name, progress=progress
    )
    return TrainingPlan(step)
