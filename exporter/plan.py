"""Plans built from torch code: ``@func2plan`` functions and ``class Net(Plan)`` modules.

A :class:`Plan` is a ``torch.nn.Module``: a function plan is a module whose ``forward`` calls the function
(its state as buffers), a class plan is the user's own module. Building traces it once per signature with
``torch.onnx.export(..., dynamo=True)`` into a :class:`~planwire.transport.spec.PlanVariant`, checks the
graph against eager torch, and keeps the variant (through :func:`planwire.exporter.build.build_variant`,
the driver every plan shares); calling the plan then runs that graph, locally in onnxruntime or, given
pointers, on their worker.
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
import torch

from planwire.exporter import metadata, modes
from planwire.exporter import progress as build_progress
from planwire.exporter.base import PlanRunner, Signature
from planwire.exporter.build import build_variant, cache_key
from planwire.exporter.dtypes import WIRE_TO_TORCH, DTypeLike, wire_of
from planwire.exporter.errors import FixedShapeWarning, PlanBuildError, TrainingModeWarning
from planwire.exporter.examples import TRACE_SIZE, Axes, args_signature, output_names, random_examples, resize
from planwire.exporter.export import export_model
from planwire.exporter.fingerprint import function_fingerprint, module_fingerprint, tensors_digest, uses_autograd
from planwire.exporter.onnx_passes import has_random_ops
from planwire.exporter.state import State
from planwire.exporter.torch_compat import EXPORT_LOCK
from planwire.exporter.translations import translations_source
from planwire.exporter.verify import verify_variant
from planwire.transport.arrays import as_array
from planwire.transport.dtypes import to_wire
from planwire.transport.spec import PlanVariant

# Inside this context a Plan called as a module runs its torch code (tracing, eager reference runs).
_eager: ContextVar[bool] = ContextVar("planwire_eager", default=False)


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
        self._warned_training: frozenset[str] = frozenset()  # layers named by the training-mode warning
        self._random: set[str] = set()  # ids of variants whose graph draws random numbers
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
            self.build(*random_examples(args_signature(args_shape, args_dtypes), dynamic), dynamic_axes=dynamic)
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
        layers = modes.training_layers(self._modules_used())  # before the build switches any flag
        variant, session = self._make_variant(list(args), dynamic)
        self._variants = [variant]
        self._sessions = {variant.id: session}
        self._warn_training(variant, layers)
        if dynamic_axes is None and not any(dynamic):
            self._warn_fixed(variant)

    def _warn_training(self, variant: PlanVariant, layers: list[tuple[str, torch.nn.Module]]) -> None:
        """Say once per set of layers that BatchNorm/Dropout layers in training mode are built as such
        (batch statistics, fresh random masks) and that the plan updates no running statistics; or, with
        no such layer, that the graph draws random numbers (``F.dropout``'s default ``training=True``).
        ``layers``: :func:`modes.training_layers`, read before the build."""
        names = frozenset(name for name, _ in layers) or frozenset({""} if variant.id in self._random else ())
        if not names or names <= self._warned_training:
            return
        self._warned_training |= names
        message = modes.training_mode_warning(self.name, layers, random=variant.id in self._random)
        if message is not None:
            with EXPORT_LOCK:  # not while another thread's export has warnings ignored (catch_warnings is global)
                warnings.warn(message, TrainingModeWarning, stacklevel=3)

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
            tensors = random_examples(signature, dynamic)
        else:
            tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in examples]
        try:
            variant, session = self._make_variant(tensors, dynamic)
        except _EagerError as e:  # the code itself rejects these arguments
            raise TypeError(f"{self._mismatch_message(args)}; the plan's code fails on them: {e}") from e
        self._variants.append(variant)
        self._sessions[variant.id] = session
        return variant

    def _modules_used(self) -> list[tuple[str, torch.nn.Module]]:
        """The plan itself and the modules its forward reaches outside its submodules, or for a function
        plan the torch modules its code reads (directly, through helpers, or inside dicts and lists)."""
        if self._function is None:
            return [("", self), *modes.reachable_modules(self, type(self).forward)]
        return modes.modules_used(self._function)

    def _dynamic_axes(self, n: int, ranks: Sequence[int] | None = None) -> list[Axes]:
        out = []
        for i in range(n):
            rank, axes = self._dynamic[i] if i < len(self._dynamic) else (-1, frozenset())
            out.append(axes if ranks is None or ranks[i] == rank else frozenset())
        return out

    def _make_variant(self, args: list[torch.Tensor], dynamic: list[Axes]) -> tuple[PlanVariant, ort.InferenceSession]:
        """Export (or fetch from the cache) and verify one variant, through the one build driver."""
        started = time.perf_counter()
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"plan {self.name!r} argument {i}: expected a torch.Tensor, got {type(a).__name__}")
            wire_of(a.dtype)
        self._check_arity(len(args), [(wire_of(a.dtype), tuple(a.shape)) for a in args])
        args = [a.detach() for a in args]
        pairs = list(zip(args, dynamic, strict=True))
        trace = [resize(a, axes, lambda n: n if n >= 2 else TRACE_SIZE) for a, axes in pairs]
        checks = [trace]
        if any(t.shape != a.shape for t, a in zip(trace, args, strict=True)):
            checks.append(args)
        if any(dynamic):  # a second size catches sizes baked into the graph
            checks.append([resize(t, axes, lambda n: n + 2) for t, axes in zip(trace, dynamic, strict=True)])
        expected = [self._reference(c) for c in checks]
        input_names = self._input_names(len(args))
        names = output_names(len(expected[0]), input_names)
        state = self._state_names()
        autograd = self._function is not None and uses_autograd(self._function)

        def export() -> onnx.ModelProto:
            with eager(), modes.exportable(self._modules_used()):  # nested plans trace as torch code
                if autograd:  # gradients inside the plan (torch.func.grad, autograd.grad): traced like a step
                    from planwire.exporter.training.function import export_function

                    return export_function(
                        self.eager, trace, dynamic=dynamic, input_names=input_names, output_names=names, name=self.name
                    )
                return export_model(
                    self,
                    trace,
                    plan=self.name,
                    input_names=input_names,
                    output_names=names,
                    dynamic=dynamic,
                    keep=state,
                    output_dtypes=[to_wire(e.dtype) for e in expected[0]],
                )

        def verify(data: bytes, model: onnx.ModelProto) -> tuple[PlanVariant, ort.InferenceSession]:
            variant = PlanVariant(data, *metadata.ports(model))
            runs = [([as_array(a) for a in c], e) for c, e in zip(checks, expected, strict=True)]
            random = has_random_ops(model)
            if random:
                self._random.add(variant.id)
            return variant, verify_variant(variant, runs, plan=self.name, random=random)

        return build_variant(
            self._cache_key(trace, dynamic, input_names, names, autograd),
            export=export,
            stamp=lambda model: metadata.stamp(model, name=self.name, kind=self.kind, state=state),
            verify=verify,
            reporting=lambda: build_progress.building(self.name, show=self._progress, started=started),
        )

    def _reference(self, args: list[torch.Tensor]) -> list[np.ndarray]:
        """Eager torch outputs as numpy, with buffers restored (BatchNorm statistics must not drift): the
        plan's own and those of the modules a function plan's code reads."""
        buffers = {id(b): b for _, m in [("", self), *self._modules_used()] for b in m.buffers()}
        saved = [(b, b.clone()) for b in buffers.values()]
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

    def _cache_key(
        self, trace: list[torch.Tensor], dynamic: list[Axes], inputs: list[str], outputs: list[str], autograd: bool
    ) -> str:
        fn = self._function
        code = function_fingerprint(fn) if fn is not None else module_fingerprint(self)
        return cache_key(
            "traced-function" if autograd else f"plan-{self.kind}",
            self.name,
            code,
            tensors_digest([*self.named_parameters(), *self.named_buffers()]),
            [(wire_of(t.dtype), list(t.shape)) for t in trace],
            [sorted(a) for a in dynamic],
            inputs,
            outputs,
            _autograd_translations() if autograd else translations_source(),
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


def _rank(value: Any) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _autograd_translations() -> str:
    """The training pipeline's translation code, which shapes a gradient function's export too."""
    from planwire.exporter.training.graph_export import translations_source

    return translations_source()
