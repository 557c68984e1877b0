"""Plans built from torch code: ``@func2plan`` functions and ``class Net(Plan)`` modules.

A :class:`Plan` is a ``torch.nn.Module``: a function plan is a module whose ``forward`` calls the function
(its state as buffers), a class plan is the user's own module. Building traces it once per signature with
``torch.onnx.export(..., dynamo=True)`` into a :class:`~planwire.transport.spec.PlanVariant`, checks the
graph against eager torch, and keeps the variant; calling the plan then runs that graph, locally in
onnxruntime or, given pointers, on their worker.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch

from planwire.exporter import cache, metadata, runtime
from planwire.exporter import progress as build_progress
from planwire.exporter.base import PlanRunner, Signature
from planwire.exporter.dtypes import WIRE_TO_TORCH, DTypeLike, torch_dtype, wire_of
from planwire.exporter.errors import FixedShapeWarning, PlanBuildError
from planwire.exporter.export import OPSET, export_model
from planwire.exporter.fingerprint import function_fingerprint, module_fingerprint, tensors_digest
from planwire.exporter.state import State
from planwire.exporter.verify import RANDOM_OPS, compare
from planwire.transport.arrays import as_array
from planwire.transport.dtypes import to_wire
from planwire.transport.spec import PlanVariant

TRACE_SIZE = 3  # example size of a dynamic axis (torch.export specializes sizes 0 and 1)
CACHE_FORMAT = "planwire-plan/1"

# Inside this context a Plan called as a module runs its torch code (tracing, eager reference runs).
_eager: ContextVar[bool] = ContextVar("planwire_eager", default=False)

Axes = frozenset[int]


class _EagerError(PlanBuildError):
    """The plan's own torch code failed on the example arguments (before any export)."""


@contextmanager
def eager() -> Iterator[None]:
    """Make plans called within run their Python code instead of their built graph."""
    token = _eager.set(True)
    try:
        yield
    finally:
        _eager.reset(token)


class Plan(PlanRunner, torch.nn.Module):
    """A torch computation exported to ONNX, runnable locally and sendable to workers.

    Use ``@func2plan(...)`` for functions, or subclass ``Plan`` like ``nn.Module`` (define ``forward``)
    and call :meth:`build` with example inputs; parameters and buffers become the plan's state.
    """

    def __init__(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        args_shape: Sequence[Sequence[int]] | None = None,
        args_dtypes: DTypeLike | Sequence[DTypeLike] | None = None,
        state: Iterable[torch.Tensor] | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        self._progress = progress  # show build stages (None: unless PLANWIRE_PROGRESS=0)
        self._warned_fixed = False
        self._function = function
        self.name = name or getattr(function, "__name__", None) or type(self).__name__
        self.kind = "function" if function is not None else "module"
        self._variants: list[PlanVariant] = []
        self._sessions: dict[str, ort.InferenceSession] = {}
        # Per argument: (rank, dynamic axes) that later builds of the same rank keep dynamic.
        self._dynamic: list[tuple[int, Axes]] = []
        if function is None and (args_shape is not None or state is not None):
            raise TypeError("args_shape and state are for function plans; a Plan subclass calls build()")
        self.state: State | None = State(state) if state is not None else None
        if args_shape is not None:
            self._dynamic = [(len(s), frozenset(a for a, d in enumerate(s) if d == -1)) for s in args_shape]
            dynamic = self._dynamic_axes(len(args_shape))
            self.build(*_examples(_signature(args_shape, args_dtypes), dynamic), dynamic_axes=dynamic)
        elif args_dtypes is not None:
            raise TypeError("args_dtypes needs args_shape")

    # -- torch side ---------------------------------------------------------------------------------

    def forward(self, *args: torch.Tensor) -> Any:
        """A function plan calls its function (with its state last); Plan subclasses override this."""
        if self._function is None:
            raise NotImplementedError(f"{type(self).__name__} must define forward()")
        if self.state is not None:
            return self._function(*args, self.state)
        return self._function(*args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the plan's graph (see PlanRunner.__call__); inside tracing or ``eager()``, run torch code."""
        if _eager.get() or torch.compiler.is_compiling() or any(_is_traced(a) for a in args):
            return torch.nn.Module.__call__(self, *args, **kwargs)
        if kwargs:
            raise TypeError(f"plan {self.name!r} takes positional tensor arguments only")
        return PlanRunner.__call__(self, *args)

    def eager(self, *args: Any) -> Any:
        """The torch result of the plan's code, without ONNX (what every build is verified against)."""
        with eager():
            return self(*args)

    # -- building -----------------------------------------------------------------------------------

    def build(
        self,
        *args: torch.Tensor,
        dynamic_axes: Sequence[Iterable[int]] | None = None,
        progress: bool | None = None,
    ) -> None:
        """Export the plan for these example tensors; replaces all variants.

        ``dynamic_axes[i]`` lists the axes of argument i that accept any size; by default, those of
        ``args_shape`` (or of the previous build) for arguments of the same rank. Without any, every size
        is fixed: a :class:`FixedShapeWarning` says so once per plan. ``progress`` shows the build's
        stages on stderr when it takes over a second (default: unless ``PLANWIRE_PROGRESS=0``).
        """
        if progress is not None:
            self._progress = progress
        if dynamic_axes is not None:
            if len(dynamic_axes) != len(args):
                raise ValueError(f"dynamic_axes has {len(dynamic_axes)} entries for {len(args)} arguments")
            self._dynamic = [(_rank(a), frozenset(axes)) for a, axes in zip(args, dynamic_axes, strict=True)]
        dynamic = self._dynamic_axes(len(args), [_rank(a) for a in args])
        variant, session = self._make_variant(list(args), dynamic)
        self._variants = [variant]
        self._sessions = {variant.id: session}
        if dynamic_axes is None and not any(dynamic):
            self._warn_fixed(variant)

    def _warn_fixed(self, variant: PlanVariant) -> None:
        """Say once that a build without dynamic axes fixed every size (the batch size included)."""
        if self._warned_fixed or not any(spec.shape for spec in variant.inputs):
            return
        self._warned_fixed = True
        sizes = ", ".join(map(str, variant.inputs))
        free = ", ".join("[0]" if spec.shape else "[]" for spec in variant.inputs)
        warnings.warn(
            f"plan {self.name!r} is built for these sizes only ({sizes}): its saved .onnx and its graph on "
            f"workers accept no other batch size. To free the batch axis: build(..., dynamic_axes=[{free}]) "
            "(the free axes of each argument), or args_shape with -1 for them.",
            FixedShapeWarning,
            stacklevel=3,
        )

    def _build_variant_for(self, args: Signature, examples: Sequence[Any] | None) -> PlanVariant | None:
        """A new variant for a call signature no variant accepts, traced on the call's own tensors or,
        for calls on pointers, on seeded random values."""
        self._check_arity(len(args), args)
        try:
            signature = [(WIRE_TO_TORCH[dtype], tuple(shape)) for dtype, shape in args]
        except KeyError as e:
            raise TypeError(f"plan {self.name!r} cannot take dtype {e.args[0]!r}") from None
        dynamic = self._dynamic_axes(len(args), [len(s) for _, s in signature])
        if examples is None:
            tensors = _examples(signature, dynamic)
        else:
            tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in examples]
        try:
            variant, session = self._make_variant(tensors, dynamic)
        except _EagerError as e:  # the code itself rejects these arguments
            raise TypeError(f"{self._mismatch_message(args)}; the plan's code fails on them: {e}") from e
        self._variants.append(variant)
        self._sessions[variant.id] = session
        return variant

    def _dynamic_axes(self, n: int, ranks: Sequence[int] | None = None) -> list[Axes]:
        out = []
        for i in range(n):
            rank, axes = self._dynamic[i] if i < len(self._dynamic) else (-1, frozenset())
            out.append(axes if ranks is None or ranks[i] == rank else frozenset())
        return out

    def _make_variant(self, args: list[torch.Tensor], dynamic: list[Axes]) -> tuple[PlanVariant, ort.InferenceSession]:
        """Export (or fetch from the cache) and verify one variant."""
        started = time.perf_counter()
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"plan {self.name!r} argument {i}: expected a torch.Tensor, got {type(a).__name__}")
            wire_of(a.dtype)
        self._check_arity(len(args), [(wire_of(a.dtype), tuple(a.shape)) for a in args])
        args = [a.detach() for a in args]
        pairs = list(zip(args, dynamic, strict=True))
        trace = [_resize(a, axes, lambda n: n if n >= 2 else TRACE_SIZE) for a, axes in pairs]
        checks = [trace]
        if any(t.shape != a.shape for t, a in zip(trace, args, strict=True)):
            checks.append(args)
        if any(dynamic):  # a second size catches sizes baked into the graph
            checks.append([_resize(t, axes, lambda n: n + 2) for t, axes in zip(trace, dynamic, strict=True)])
        expected = [self._reference(c) for c in checks]
        input_names = self._input_names(len(args))
        output_names = _output_names(len(expected[0]), input_names)
        key = self._cache_key(trace, dynamic, input_names, output_names)

        data = cache.get(key)
        if data is not None:
            try:
                return self._verified(data, checks, expected)
            except PlanBuildError:
                cache.discard(key)  # a stale entry (code the fingerprint missed): export afresh
        with build_progress.building(self.name, show=self._progress, started=started):
            with eager():  # nested plans trace as torch code
                from planwire.exporter.training.function import build_function_step, uses_autograd

                if self._function is not None and uses_autograd(self._function):
                    # Gradients inside the plan (torch.func.grad, autograd.grad): the training pipeline.
                    proto = build_function_step(
                        self.eager,
                        trace,
                        dynamic=dynamic,
                        input_names=input_names,
                        output_names=output_names,
                        name=self.name,
                        verify=False,
                    ).model
                else:
                    proto = export_model(
                        self,
                        trace,
                        plan=self.name,
                        input_names=input_names,
                        output_names=output_names,
                        dynamic=dynamic,
                        keep=self._state_names(),
                        output_dtypes=[_wire(e) for e in expected[0]],
                    )
            data = metadata.stamp(proto, name=self.name, kind=self.kind, state=self._state_names())
            cache.put(key, data)
            build_progress.stage("verify")
            return self._verified(data, checks, expected)

    def _verified(
        self, data: bytes, checks: list[list[torch.Tensor]], expected: list[list[np.ndarray]]
    ) -> tuple[PlanVariant, ort.InferenceSession]:
        model = onnx.load_from_string(data)
        inputs, outputs = metadata.ports(model)
        variant = PlanVariant(data, inputs, outputs)
        try:
            session = runtime.make_session(data)
        except Exception as e:
            raise PlanBuildError(
                f"plan {self.name!r}: onnxruntime cannot load the exported graph: {e}", plan=self.name
            ) from e
        values = not any(n.op_type in RANDOM_OPS for n in model.graph.node)
        names = [o.name for o in outputs]
        for args, want in zip(checks, expected, strict=True):
            arrays = [as_array(a) for a in args]
            shapes = ", ".join(str(list(a.shape)) for a in arrays)
            try:
                got = runtime.run(session, variant, arrays)
            except Exception as e:
                raise PlanBuildError(
                    f"plan {self.name!r}: onnxruntime failed on inputs of shape {shapes}: {e}", plan=self.name
                ) from e
            compare(got, want, plan=self.name, names=names, values=values, what=f" (inputs {shapes})")
        return variant, session

    def _reference(self, args: list[torch.Tensor]) -> list[np.ndarray]:
        """Eager torch outputs as numpy, with buffers restored (BatchNorm statistics must not drift)."""
        saved = [(b, b.clone()) for b in self.buffers()]
        try:
            with torch.no_grad():
                result = self.eager(*args)
        except Exception as e:
            shapes = ", ".join(f"{wire_of(a.dtype)}{list(a.shape)}" for a in args)
            raise _EagerError(
                f"plan {self.name!r} fails in eager torch on example arguments ({shapes}): {e}", plan=self.name
            ) from e
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        outputs = result if isinstance(result, tuple | list) else (result,)
        arrays = []
        for i, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor):
                raise PlanBuildError(
                    f"plan {self.name!r} returns {type(out).__name__} as output {i}; plans return tensors",
                    plan=self.name,
                )
            try:
                wire_of(out.dtype)
            except TypeError as e:
                raise PlanBuildError(f"plan {self.name!r} output {i}: {e}", plan=self.name) from e
            arrays.append(as_array(out))
        return arrays

    # -- naming and keys ----------------------------------------------------------------------------

    def _parameters_of_code(self) -> list[inspect.Parameter]:
        code = self._function if self._function is not None else self.forward
        params = list(inspect.signature(code).parameters.values())
        if self._function is not None and self.state is not None:
            params = params[:-1]  # the trailing state argument
        return [p for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]

    def _check_arity(self, n: int, args: Signature) -> None:
        params = self._parameters_of_code()
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            return
        required = sum(p.default is p.empty for p in params)
        if not required <= n <= len(params):
            want = str(len(params)) if required == len(params) else f"{required} to {len(params)}"
            got = ", ".join(f"{d}{list(s)}" for d, s in args)
            raise TypeError(f"plan {self.name!r} takes {want} arguments, got {n} ({got})")

    def _input_names(self, n: int) -> list[str]:
        names: list[str] = []
        for p in self._parameters_of_code():
            if p.kind == p.VAR_POSITIONAL:
                names += [f"{p.name}_{j}" for j in range(n - len(names))]
            else:
                names.append(p.name)
        return names[:n]

    def _state_names(self) -> list[str]:
        return [name for name, _ in [*self.named_parameters(), *self.named_buffers()]]

    def _cache_key(self, trace: list[torch.Tensor], dynamic: list[Axes], inputs: list[str], outputs: list[str]) -> str:
        fn = self._function
        code = function_fingerprint(fn) if fn is not None else module_fingerprint(self)
        return cache.make_key(
            CACHE_FORMAT,
            self.kind,
            self.name,
            code,
            tensors_digest([*self.named_parameters(), *self.named_buffers()]),
            [(wire_of(t.dtype), list(t.shape)) for t in trace],
            [sorted(a) for a in dynamic],
            inputs,
            outputs,
            OPSET,
            torch.__version__,
            onnx.__version__,
            onnxscript.__version__,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles drop the onnxruntime sessions (recreated on first run)."""
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state


def func2plan(
    args_shape: Sequence[Sequence[int]] | None = None,
    args_dtypes: DTypeLike | Sequence[DTypeLike] | None = None,
    state: Iterable[torch.Tensor] | None = None,
    *,
    name: str | None = None,
    progress: bool | None = None,
) -> Callable[[Callable[..., Any]], Plan]:
    """Decorator turning a torch function into a :class:`Plan`.

    With ``args_shape`` (one shape per argument, ``-1`` for an axis of any size) the plan is built at
    once for ``args_dtypes`` (default float32); otherwise call ``plan.build(*examples)``. With
    ``state`` the function takes a last argument whose ``read()`` returns those tensors. ``progress``
    shows build stages on stderr for builds over a second (default: unless ``PLANWIRE_PROGRESS=0``).
    """
    if callable(args_shape):
        raise TypeError("use @func2plan() with parentheses")

    def decorate(function: Callable[..., Any]) -> Plan:
        plan = Plan(function, name=name, args_shape=args_shape, args_dtypes=args_dtypes, state=state, progress=progress)
        plan.__doc__ = function.__doc__
        return plan

    return decorate


# -- helpers ----------------------------------------------------------------------------------------


def _is_traced(value: Any) -> bool:
    """FakeTensors and other tensor subclasses mean someone is tracing through this plan."""
    return isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter)


def _wire(array: np.ndarray) -> str:
    return to_wire(array.dtype)


def _rank(value: Any) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _signature(
    args_shape: Sequence[Sequence[int]], args_dtypes: DTypeLike | Sequence[DTypeLike] | None
) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    if args_dtypes is None:
        dtypes: list[DTypeLike] = [torch.float32] * len(args_shape)
    elif isinstance(args_dtypes, torch.dtype | str | np.dtype | type):
        dtypes = [args_dtypes] * len(args_shape)
    else:
        dtypes = list(args_dtypes)
        if len(dtypes) != len(args_shape):
            raise ValueError(f"args_dtypes has {len(dtypes)} entries for {len(args_shape)} shapes")
    out = []
    for i, shape in enumerate(args_shape):
        shape = tuple(shape)
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ValueError(f"args_shape[{i}] = {shape}: sizes must be ints >= 0, or -1 for any size")
        out.append((torch_dtype(dtypes[i]), shape))
    return out


def _examples(signature: Sequence[tuple[torch.dtype, tuple[int, ...]]], dynamic: list[Axes]) -> list[torch.Tensor]:
    """Seeded random tensors for a signature; -1 (dynamic) sizes become TRACE_SIZE."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for (dtype, shape), axes in zip(signature, dynamic, strict=True):
        size = [TRACE_SIZE if d == -1 or (a in axes and d < 2) else d for a, d in enumerate(shape)]
        out.append(_random(dtype, size, gen))
    return out


def _random(dtype: torch.dtype, size: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(size, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, size, generator=gen).bool()
    return torch.randint(0, 5, size, generator=gen).to(dtype)  # small non-negative: index-safe


def _resize(t: torch.Tensor, axes: Axes, size: Callable[[int], int]) -> torch.Tensor:
    """``t`` with each axis in ``axes`` tiled (or, when empty, randomly filled) to ``size(old)``."""
    for axis in sorted(axes):
        old = t.shape[axis]
        new = size(old)
        if new == old:
            continue
        if old == 0:
            shape = list(t.shape)
            shape[axis] = new
            t = _random(t.dtype, shape, torch.Generator().manual_seed(1))
        else:
            reps = [1] * t.dim()
            reps[axis] = -(-new // old)
            t = t.repeat(*reps).narrow(axis, 0, new)
    return t


def _output_names(n: int, inputs: Sequence[str]) -> list[str]:
    names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
    return [f"{name}_" if name in inputs else name for name in names]
