"""Bound plans: plans whose outputs feed their own next call, stepped on a worker that keeps their state.

A training step is the common case (parameters, buffers and optimizer state in; loss, metrics and their
new values out), but nothing here knows about training: everything comes from the plan's own metadata
(``schemas/PROTOCOL.md`` §7.2). Each output whose ``planwire.outputs`` entry ``"binds"`` an input is the
next call's value of that input; every input that is neither an ``arg`` (the call's arguments) nor a
``hyper``-parameter is *state*. :class:`BoundPointer` stores the state on the worker once, then each call
sends one run message that reads the state by key and writes the bound outputs back to the same keys, so
the state never travels unless asked for (:meth:`BoundPointer.state_dict`).

The same pointer drives a plan built by ``planwire.training_plan`` (the exporter hands it the initial
state) and a plan file loaded without torch (``planwire.load_plan(path).send(worker, state=...)``).
"""

from __future__ import annotations

import json
import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from planwire.transport.arrays import as_array, wrap
from planwire.transport.dtypes import human, to_numpy, to_wire
from planwire.transport.runs import RunTemplate
from planwire.transport.spec import META_KIND, META_NAME, META_OUTPUTS, META_TRAINING, PlanVariant, TensorSpec

if TYPE_CHECKING:
    from planwire.transport.client import WorkerClient
    from planwire.transport.pointers import PointerTensor

ARG, HYPER, OPTIM = "arg", "hyper", "optim"  # input roles with a meaning here (PROTOCOL.md §7.2)


@dataclass(frozen=True)
class BoundPlan:
    """A plan variant with its bindings (output -> the input it replaces) and default hyper-parameters.

    ``targets`` counts the trailing arguments that are targets (error messages say "targets" for them).
    """

    name: str
    variant: PlanVariant
    bindings: Mapping[str, str]
    hyper: Mapping[str, np.ndarray] = field(default_factory=dict)
    targets: int = 0

    @classmethod
    def from_metadata(cls, variant: PlanVariant, props: Mapping[str, str], *, name: str | None = None) -> BoundPlan:
        """Read the bindings and defaults from a plan's ``metadata_props``; ports (with roles) from ``variant``.

        ValueError names what is missing or inconsistent: a binding to an unknown input, to an argument
        or to an input of another dtype or shape, a hyper-parameter without a default.
        """
        name = name or props.get(META_NAME) or "plan"
        try:
            outputs = json.loads(props.get(META_OUTPUTS) or "[]")
            training = json.loads(props.get(META_TRAINING) or "{}")
            binds = {str(e["name"]): str(e["binds"]) for e in outputs if e.get("binds") is not None}
            hyper = training.get("optimizer", {}).get("hyper", {}) if isinstance(training, dict) else {}
            targets = training.get("targets", 1) if props.get(META_KIND) == "training" else 0
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"plan {name!r} has unreadable planwire metadata: {e}") from None
        n_args = sum(s.role == ARG for s in variant.inputs)
        if isinstance(targets, bool) or not isinstance(targets, int) or not 0 <= targets <= n_args:
            raise ValueError(
                f'plan {name!r}: {META_TRAINING} "targets" must count its trailing arguments that are targets '
                f"(a whole number from 0 to {n_args}), not {targets!r}; export the plan again"
            )
        inputs = {s.name: s for s in variant.inputs}
        outputs_by_name = {s.name: s for s in variant.outputs}
        for out, target in binds.items():
            spec, bound = outputs_by_name.get(out), inputs.get(target)
            if spec is None or bound is None or bound.role in (ARG, HYPER):
                raise ValueError(f"plan {name!r}: output {out!r} binds {target!r}, which is not a state input")
            if (spec.dtype, spec.shape) != (bound.dtype, bound.shape):
                raise ValueError(f"plan {name!r}: output {out!r} ({spec}) cannot replace input {bound}")
        defaults: dict[str, np.ndarray] = {}
        for spec in variant.inputs:
            if spec.role == HYPER:
                value = hyper.get(spec.name.removeprefix("hyper.")) if isinstance(hyper, dict) else None
                if value is None:
                    raise ValueError(f"plan {name!r} has no default for hyper-parameter {spec.name!r}")
                try:
                    defaults[spec.name] = hyper_array(spec, value)
                except ValueError as e:
                    raise ValueError(f"plan {name!r}: default of {e}; export the plan with a usable default") from None
        return cls(name, variant, binds, defaults, targets)

    @staticmethod
    def declared(props: Mapping[str, str]) -> bool:
        """Whether ``metadata_props`` say some output binds an input (unreadable metadata: no)."""
        try:
            return any(isinstance(e, dict) and "binds" in e for e in json.loads(props.get(META_OUTPUTS) or "[]"))
        except (TypeError, ValueError):
            return False

    @property
    def args(self) -> tuple[TensorSpec, ...]:
        """The inputs each call passes (role ``arg``), in graph order."""
        return tuple(s for s in self.variant.inputs if s.role == ARG)

    @property
    def state(self) -> tuple[TensorSpec, ...]:
        """The inputs kept on the worker between calls (neither ``arg`` nor ``hyper``), in graph order."""
        return tuple(s for s in self.variant.inputs if s.role not in (ARG, HYPER))

    def initial_state(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every state input's value from ``values`` (keyed by input name, or by the name without its role
        prefix: a module path as in a ``state_dict``); optimizer state not given starts at zeros.

        KeyError lists what is missing; ValueError names a value of the wrong dtype or shape.
        """
        by_path = {_path(s.name): s.name for s in self.state}
        given = {by_path.get(k, k): v for k, v in values.items()}
        state: dict[str, np.ndarray] = {}
        missing = []
        for spec in self.state:
            if spec.name in given:
                state[spec.name] = self.checked(spec, given[spec.name])
            elif spec.role == OPTIM:
                state[spec.name] = np.zeros(spec.shape, to_numpy(spec.dtype))  # type: ignore[arg-type]
            else:
                missing.append(spec.name)
        unknown = set(given) - {s.name for s in self.state}
        if missing or unknown:
            raise KeyError(
                f"initial state of plan {self.name!r}: missing {missing}, unexpected {sorted(unknown)} "
                "(give every parameter and buffer, by input name or module path)"
            )
        return state

    def checked(self, spec: TensorSpec, value: Any) -> np.ndarray:
        """``value`` as an array for ``spec``; ValueError (naming it) unless dtype and shape match."""
        arr = as_array(value)
        if arr.shape != spec.shape or to_wire(arr.dtype) != spec.dtype:
            raise ValueError(
                f"{_path(spec.name)}: got {arr.dtype}{list(arr.shape)}, "
                f"this plan holds {human(spec.dtype)}{list(spec.shape)}"
            )
        return arr

    def send(self, worker: WorkerClient, state: Mapping[str, Any]) -> BoundPointer:
        """Register the plan on ``worker`` and store its initial ``state`` there (see initial_state)."""
        return BoundPointer(self, worker, state)


class BoundPointer:
    """A bound plan on a worker, with its state stored there under keys this pointer owns.

    A call runs one step: it returns the unbound outputs (a training step's loss and metrics) as pointers
    at once, and the bound outputs overwrite the state on the worker.
    """

    def __init__(self, plan: BoundPlan, worker: WorkerClient, state: Mapping[str, Any]) -> None:
        self.bound, self.worker = plan, worker
        initial = plan.initial_state(state)
        worker.ensure_plan(plan.variant, plan.name)
        prefix = worker.new_key()
        self.keys = {spec.name: f"{prefix}:{spec.name}" for spec in plan.state}
        # The default hyper-parameters are stored on the worker too, so a step that keeps them sends only
        # references (no inline tensor frames to encode, send and decode); a call's overrides go inline.
        self._hyper_keys = {name: f"{prefix}:{name}" for name in plan.hyper}
        values = {self.keys[n]: v for n, v in initial.items()}
        values.update({key: plan.hyper[name] for name, key in self._hyper_keys.items()})
        pointers = worker.put_many(values, tags=(f"plan:{plan.name}",), owned=False)
        stored = dict(zip([*self.keys, *self._hyper_keys], pointers, strict=True))
        self._state = {name: stored[name] for name in self.keys}
        self._session = worker.session
        # A step's request is encoded once: the state and the stored hyper-parameters by key in, the bound
        # outputs to their state keys out; per call only the arguments change. The other outputs get fresh
        # keys and ride on the reply, so .get() on them needs no round trip. A call that overrides
        # hyper-parameters uses a second form with them as slots too (the stored ones by reference, the
        # overrides inline).
        inputs, bindings = plan.variant.inputs, plan.bindings
        outputs = [self.keys[bindings[o.name]] if o.name in bindings else None for o in plan.variant.outputs]
        stored_keys = {**self.keys, **self._hyper_keys}
        self._run = RunTemplate(plan.variant, plan.name, [stored_keys.get(s.name) for s in inputs], outputs)
        self._run_hyper = RunTemplate(plan.variant, plan.name, [self.keys.get(s.name) for s in inputs], outputs)
        slots = [s for s in inputs if s.role in (ARG, HYPER)]  # of _run_hyper, in graph order
        self._args = [(k, s) for k, s in enumerate(slots) if s.role == ARG]
        self._hyper_at = {s.name.removeprefix("hyper."): (k, s) for k, s in enumerate(slots) if s.role == HYPER}
        self._defaults: list[Any] = [stored.get(s.name) for s in slots]
        self._lent: tuple[PointerTensor, ...] = ()  # state pointers handed out (parameters()): a .get() moves one
        self._weights = tuple(s.name for s in plan.state if s.role != OPTIM)

    @property
    def name(self) -> str:
        return self.bound.name

    def __call__(self, *args: Any, **hyper: float) -> PointerTensor | tuple[PointerTensor, ...]:
        """Run one step on ``args`` (pointers on this worker or local tensors); returns the unbound outputs'
        pointers at once. ``lr=0.01`` etc. override hyper-parameters for this call."""
        self._check_alive()
        n = len(self._args)
        if len(args) != n:
            raise TypeError(
                f"{self._what()} takes {n} batch arguments {[s.name for _, s in self._args]}, got {len(args)}"
            )
        targets_from = n - self.bound.targets
        for k, ((_, spec), arg) in enumerate(zip(self._args, args, strict=True)):
            dtype, shape = self.worker.signature_of(arg)
            why = spec.mismatch(dtype, shape)
            if why:
                role = "targets" if k >= targets_from else "input"
                raise TypeError(f"{self._what()}: {role} argument {k} ({spec.name!r}): {why}")
        template, call = self._run, args
        if hyper:
            unknown = set(hyper) - set(self._hyper_at)
            if unknown:
                raise TypeError(f"unknown hyper-parameters {sorted(unknown)}; this plan takes {list(self._hyper_at)}")
            template, call = self._run_hyper, list(self._defaults)
            for (i, _), arg in zip(self._args, args, strict=True):
                call[i] = arg
            for key, value in hyper.items():
                i, spec = self._hyper_at[key]
                call[i] = hyper_array(spec, value)
        for p in self._lent:  # after the call's own checks, in the order the state's were made before
            if p.consumed:
                self.worker.check_pointer(p)  # raises: the state it held was moved off the worker
        reported = self.worker.run_template(template, call)
        return reported[0] if len(reported) == 1 else tuple(reported)

    def _what(self) -> str:
        return f"{'training ' if self.bound.targets else ''}plan {self.name!r}"

    def _check_alive(self) -> None:
        self.worker.check_connection()
        if self.worker.session != self._session:
            raise RuntimeError(
                f"worker {self.worker.id!r} restarted since {self._what()} was sent: "
                "its parameters and optimizer state there are gone; send the plan again"
            )

    def parameters(self) -> list[PointerTensor]:
        """Pointers to the trainable parameters (role ``param``) on the worker (owned by this pointer)."""
        params = [self._state[s.name] for s in self.bound.state if s.role == "param"]
        self._lent = tuple(params)
        return params

    def state_arrays(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Copies of the stored state by input name (default: all of it), fetched in one message."""
        self._check_alive()
        names = list(self.keys) if names is None else list(names)
        arrays = self.worker.fetch_arrays([self.keys[n] for n in names], keep=True)
        return dict(zip(names, arrays, strict=True))

    def state_dict(self) -> OrderedDict[str, Any]:
        """The parameters and buffers (not the optimizer state), by module path, fetched from the worker
        (copies; training goes on): torch tensors when torch is in use in this process, else numpy."""
        arrays = self.state_arrays(self._weights)
        return OrderedDict((_path(n), wrap(np.array(a))) for n, a in arrays.items())

    def load_state_dict(self, state_dict: Mapping[str, Any], *, reset_optimizer: bool = False) -> None:
        """Push new weights (all parameters and buffers, by module path) to the worker: the server side
        of federated averaging. ``reset_optimizer`` also zeroes the optimizer state there."""
        self._check_alive()
        specs = {s.name: s for s in self.bound.state}
        by_path = {_path(n): n for n in self._weights}
        missing, unexpected = set(by_path) - set(state_dict), set(state_dict) - set(by_path)
        if missing or unexpected:
            raise KeyError(
                f"load_state_dict for {self.name!r}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        values = {self.keys[n]: self.bound.checked(specs[n], state_dict[p]) for p, n in by_path.items()}
        if reset_optimizer:
            values.update(
                {self.keys[s.name]: np.zeros(s.shape, to_numpy(s.dtype)) for s in self.bound.state if s.role == OPTIM}  # type: ignore[arg-type]
            )
        self.worker.put_many(values, tags=(f"plan:{self.name}",), owned=False)

    def free(self) -> None:
        """Delete this pointer's state (and stored hyper-parameters) from the worker."""
        for key in (*self.keys.values(), *self._hyper_keys.values()):
            self.worker.release(key)
        self.keys, self._hyper_keys = {}, {}

    def __repr__(self) -> str:
        return f"[{type(self).__name__} | me:{self.name} -> {self.worker.id}]"


def hyper_array(spec: TensorSpec, value: Any) -> np.ndarray:
    """``value`` as the 0-d array hyper-parameter ``spec`` takes; ValueError (naming it) unless it is a finite
    number its dtype holds: an integer input takes whole numbers in its range, a float input finite ones. A bool
    or a string is no number here (``True`` is not a learning rate), wherever the value comes from."""
    dtype = np.dtype(to_numpy(spec.dtype))
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    number, arr = float("nan"), None
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        try:
            number = float(value)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is refused below
                arr = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            arr = None
    exact = dtype.kind not in "fc"  # integers must hold the value itself, not a rounded or wrapped one
    if arr is None or not np.isfinite(number) or not np.isfinite(arr) or (exact and arr.item() != value):
        raise ValueError(
            f"hyper-parameter {spec.name!r} is {value!r}: it takes "
            + (f"a whole number in {human(spec.dtype)}'s range" if exact else f"a finite {human(spec.dtype)}")
        )
    return arr


def _path(name: str) -> str:
    """An input's name without its role prefix ("param.fc.weight" -> "fc.weight"): the module path."""
    return name.partition(".")[2] or name
