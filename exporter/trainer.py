"""Training plans on workers: the step is sent once, its state lives on the worker, each call is one message.

``training_plan(model, ...)`` builds the whole step (forward, loss, backward, optimizer update) as one
ONNX graph (see ``planwire.exporter.training``). ``send(worker)`` registers it and stores parameters,
buffers and optimizer state on the worker; each ``pointer(x, y)`` runs one step there and binds the
updated state back to the same keys, so weights never travel unless asked for (``state_dict``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planwire.exporter import summary
from planwire.exporter.optim import Optimizer
from planwire.exporter.training import TrainingStep, build_training_step
from planwire.transport.arrays import as_array
from planwire.transport.client import Client
from planwire.transport.dtypes import to_wire
from planwire.transport.pointers import PointerTensor
from planwire.transport.spec import PlanVariant

_STATE_ROLES = ("param", "frozen", "buffer", "optim")


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

    def send(self, worker: Client) -> TrainingPointer:
        """Register the step on ``worker`` and store its initial state there."""
        return TrainingPointer(self, worker)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the step as a standard .onnx file (ports, roles and bindings in its metadata).

        The graph takes the state as inputs: a device that runs the file feeds it the initial state
        (``step.state``, or ``step.initial_state(model)``) and then each call's bound outputs.
        ``planwire.load_plan`` reads it back (onnxruntime alone suffices).
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


class TrainingPointer:
    """A training step on a worker, with its state stored there under keys this pointer owns."""

    def __init__(self, plan: TrainingPlan, worker: Client) -> None:
        self.plan, self.worker, self.step = plan, worker, plan.step
        worker.ensure_plan(self.step.variant, plan.name)
        s = self.step
        prefix = worker.new_key()
        self.keys = {name: f"{prefix}:{name}" for name in (*s.params, *s.frozen, *s.buffers, *s.optim)}
        # The default hyper-parameters are stored on the worker too, so a step that keeps them sends only
        # references (no inline tensor frames to encode, send and decode); a call's overrides go inline.
        self._hyper_keys = {name: f"{prefix}:{name}" for name in s.hyper}
        values = {key: s.state[name] for name, key in self.keys.items()}
        values.update({key: s.hyper[name] for name, key in self._hyper_keys.items()})
        pointers = worker.put_many(values, tags=(f"plan:{plan.name}",), owned=False)
        stored = dict(zip([*self.keys, *self._hyper_keys], pointers, strict=True))
        self._state = {name: stored[name] for name in self.keys}
        self._session = worker.session
        self._n_args = len(s.args)
        self._weights = tuple(n for n in self.keys if not n.startswith("optim."))  # params, frozen, buffers
        self._hyper = {name.removeprefix("hyper."): name for name in s.hyper}
        # Everything a step passes after the batch, in graph-input order; a call overrides hyper entries.
        tail = s.variant.inputs[self._n_args :]
        self._tail = [stored[spec.name] for spec in tail]
        self._hyper_at = {spec.name: self._n_args + i for i, spec in enumerate(tail) if spec.role == "hyper"}
        self._specs = s.variant.inputs[: self._n_args]
        # Per step: bound outputs overwrite their state keys; loss and metrics get fresh keys and ride on the
        # step's reply, so .get() on them needs no round trip.
        self._outputs = [self.keys[s.bindings[o.name]] if o.name in s.bindings else None for o in s.variant.outputs]
        self._reported = [i for i, key in enumerate(self._outputs) if key is None]

    def __call__(self, *batch: Any, **hyper: float) -> PointerTensor | tuple[PointerTensor, ...]:
        """Run one step on ``batch`` (pointers on this worker or local tensors); returns the loss pointer
        (and metric pointers) at once. ``lr=0.01`` etc. override hyper-parameters for this call."""
        s = self.step
        self._check_alive()
        if len(batch) != self._n_args:
            raise TypeError(
                f"training plan {self.plan.name!r} takes {self._n_args} batch arguments {list(s.args)}, "
                f"got {len(batch)}"
            )
        for i, (spec, arg) in enumerate(zip(self._specs, batch, strict=True)):
            dtype, shape = self.worker.signature_of(arg)
            why = spec.mismatch(dtype, shape)
            if why:
                role = "targets" if i >= self._n_args - 1 else "input"
                raise TypeError(f"training plan {self.plan.name!r}: {role} argument {i} ({spec.name!r}): {why}")
        args: list[Any] = [*batch, *self._tail]
        if hyper:
            unknown = set(hyper) - set(self._hyper)
            if unknown:
                raise TypeError(f"unknown hyper-parameters {sorted(unknown)}; this plan takes {list(self._hyper)}")
            for key, value in hyper.items():
                name = self._hyper[key]
                args[self._hyper_at[name]] = np.asarray(value, dtype=s.hyper[name].dtype)
        results = self.worker.run(
            s.variant, args, outputs=self._outputs, fetch=self._reported, wait=False, name=self.plan.name
        )
        reported = [results[i] for i in self._reported]
        return reported[0] if len(reported) == 1 else tuple(reported)

    def _check_alive(self) -> None:
        self.worker.check_connection()
        if self.worker.session != self._session:
            raise RuntimeError(
                f"worker {self.worker.id!r} restarted since training plan {self.plan.name!r} was sent: "
                "its parameters and optimizer state there are gone; send the plan again"
            )

    def parameters(self) -> list[PointerTensor]:
        """Pointers to the trainable parameters on the worker (owned by this pointer)."""
        return [self._state[n] for n in self.step.params]

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """The trained parameters and buffers, fetched from the worker (copies; training goes on)."""
        self._check_alive()
        arrays = self.worker.fetch_arrays([self.keys[n] for n in self._weights], keep=True)
        return OrderedDict(
            (n.partition(".")[2], torch.from_numpy(np.array(a))) for n, a in zip(self._weights, arrays, strict=True)
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], *, reset_optimizer: bool = False) -> None:
        """Push new weights (all parameters and buffers, by module path) to the worker: the server side
        of federated averaging. ``reset_optimizer`` also zeroes the optimizer state there."""
        self._check_alive()
        by_path = {n.partition(".")[2]: n for n in self._weights}
        missing, unexpected = set(by_path) - set(state_dict), set(state_dict) - set(by_path)
        if missing or unexpected:
            raise KeyError(
                f"load_state_dict for {self.plan.name!r}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        values: dict[str, np.ndarray] = {}
        for path, name in by_path.items():
            arr, ref = as_array(state_dict[path]), self.step.state[name]
            if arr.shape != ref.shape or to_wire(arr.dtype) != to_wire(ref.dtype):
                raise ValueError(
                    f"{path}: got {arr.dtype}{list(arr.shape)}, this plan holds {ref.dtype}{list(ref.shape)}"
                )
            values[self.keys[name]] = arr
        if reset_optimizer:
            values.update({self.keys[n]: np.zeros_like(self.step.state[n]) for n in self.step.optim})
        self.worker.put_many(values, tags=(f"plan:{self.plan.name}",), owned=False)

    def free(self) -> None:
        """Delete this step's state from the worker."""
        for key in (*self.keys.values(), *self._hyper_keys.values()):
            self.worker.release(key)
        self.keys, self._hyper_keys = {}, {}

    def __repr__(self) -> str:
        return f"[TrainingPointer | me:{self.plan.name} -> {self.worker.id}]"


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
