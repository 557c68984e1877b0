"""A whole training step (forward, loss, backward, optimizer update) as one ordinary ONNX graph.

A data owner's device runs the plan in plain onnxruntime: no training build, no ONNX ``Gradient`` op.
Everything the step reads is a graph input and everything it changes is a graph output, so the device
only has to feed the updated state back in on the next call.

Graph inputs, in this order (each :class:`TensorSpec` carries the role):

====================  ========  ==================================================================
name                  role      what
====================  ========  ==================================================================
``arg0``, ``arg1``..  arg       the batch: model inputs, then the targets (last ``targets`` args)
``hyper.lr`` ...      hyper     optimizer hyper-parameters, 0-d float64 (see :mod:`..optim`)
``param.<path>``      param     trainable parameters (``named_parameters`` order)
``frozen.<path>``     frozen    parameters with ``requires_grad=False``: read, never updated
``buffer.<path>``     buffer    module buffers (BatchNorm running stats, ``num_batches_tracked``)
``optim.<path>.<s>``  optim     optimizer state per parameter, then shared state (``optim.step``)
====================  ========  ==================================================================

Graph outputs: ``loss`` (role "loss", 0-d), ``metric.<name>`` (role "metric", 0-d float32), then
``new.param.<path>``, ``new.buffer.<path>`` (only the buffers the forward mutates) and
``new.optim.<...>``, each bound to the input of the name without ``new.``: the next call takes the
output in place of that input. The bindings are in :attr:`TrainingStep.bindings` and, for the worker,
in the model's ``planwire.outputs`` metadata (``"binds"`` field of each output entry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planwire.exporter.optim import Optimizer
from planwire.exporter.optim import resolve as resolve_optimizer
from planwire.exporter.progress import building
from planwire.exporter.training.trace import (
    ModuleTagger,
    Port,
    VariantView,
    export_graph,
    has_random_ops,
    trace,
    unify_axes,
)
from planwire.exporter.training.trace import verify as verify_plan
from planwire.transport.spec import PlanVariant

Shape = Sequence[int | str]
Metric = Callable[..., Tensor]

# Losses whose target dtype and accuracy rule are known, by function and by module class.
_LOSSES: dict[object, str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.mse_loss: "mse_loss",
    F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss",
    F.huber_loss: "huber_loss",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.binary_cross_entropy: "binary_cross_entropy",
    nn.CrossEntropyLoss: "cross_entropy",
    nn.NLLLoss: "nll_loss",
    nn.MSELoss: "mse_loss",
    nn.L1Loss: "l1_loss",
    nn.SmoothL1Loss: "smooth_l1_loss",
    nn.HuberLoss: "huber_loss",
    nn.BCEWithLogitsLoss: "binary_cross_entropy_with_logits",
    nn.BCELoss: "binary_cross_entropy",
}
_CLASS_INDEX_LOSSES = {"cross_entropy", "nll_loss"}


def loss_kind(loss: Callable[..., Tensor]) -> str | None:
    """The torch loss behind ``loss`` (a functional or an ``nn`` loss module), or None if unknown."""
    return _LOSSES.get(loss) or _LOSSES.get(type(loss))


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
        feed = {name: _numpy(a) for name, a in zip(self.args, args, strict=True)}
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
            value = _numpy(values[name.partition(".")[2]]).copy()
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


def _numpy(value: np.ndarray | Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


def _dims(shapes: Sequence[Shape]) -> tuple[list[dict[int, str]], dict[str, int]]:
    """Dynamic axes of each arg (-1 -> "batch" on axis 0, "dim<k>" elsewhere) and an example size each.

    Example sizes are distinct primes that no static size uses, so a static size can never be taken for
    a dynamic axis; torch.export specializes sizes 0 and 1, hence nothing below 5.
    """
    dims: list[dict[int, str]] = []
    for shape in shapes:
        axes = {}
        for axis, size in enumerate(shape):
            if isinstance(size, str):
                axes[axis] = size
            elif size == -1 or size is None:
                axes[axis] = "batch" if axis == 0 else f"dim{axis}"
            elif not isinstance(size, int) or size < 0:
                raise ValueError(f"args_shape: axis {axis} of {tuple(shape)} must be a size, -1 or a name")
        dims.append(axes)
    static = {s for shape in shapes for s in shape if isinstance(s, int)}
    primes = (p for p in range(5, 10_000) if all(p % q for q in range(2, int(p**0.5) + 1)) and p not in static)
    sizes: dict[str, int] = {}
    for axes in dims:
        for name in axes.values():
            if name not in sizes:
                sizes[name] = next(primes)
    return dims, sizes


def _check_targets(kind: str | None, dtypes: Sequence[torch.dtype], n_targets: int) -> None:
    """TypeError naming the targets argument when its dtype cannot work with a known loss."""
    if kind is None or n_targets != 1:
        return
    index = len(dtypes) - 1
    dtype = dtypes[index]
    if kind in _CLASS_INDEX_LOSSES:
        if kind == "nll_loss" and dtype != torch.int64:
            raise TypeError(f"targets (args_dtypes[{index}]) must be int64 class indices for nll_loss, got {dtype}")
        if dtype != torch.int64 and not dtype.is_floating_point:
            raise TypeError(
                f"targets (args_dtypes[{index}]) must be int64 class indices (or floating class "
                f"probabilities) for cross_entropy, got {dtype}"
            )
    elif not dtype.is_floating_point:
        raise TypeError(f"targets (args_dtypes[{index}]) must be floating point for {kind}, got {dtype}")


def _accuracy(kind: str | None) -> Metric:
    """Fraction of correct predictions for a classification loss."""
    if kind in _CLASS_INDEX_LOSSES:

        def accuracy(output: Tensor, target: Tensor) -> Tensor:
            if target.is_floating_point():  # class probabilities
                target = target.argmax(1)
            return (output.argmax(1) == target).to(torch.float32).mean()

    elif kind in ("binary_cross_entropy_with_logits", "binary_cross_entropy"):
        threshold = 0.0 if kind == "binary_cross_entropy_with_logits" else 0.5

        def accuracy(output: Tensor, target: Tensor) -> Tensor:
            return ((output > threshold) == (target > 0.5)).to(torch.float32).mean()

    else:
        raise ValueError(
            f"metric 'accuracy' needs a classification loss (cross_entropy, nll_loss, binary cross "
            f"entropy); got {kind or 'an unknown loss'}: pass metrics={{'accuracy': fn}} instead"
        )
    return accuracy


def _metrics(metrics: Sequence[str] | Mapping[str, Metric], kind: str | None) -> dict[str, Metric]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    builtin = {"accuracy": lambda: _accuracy(kind)}
    resolved = {}
    for name in metrics:
        if name not in builtin:
            raise ValueError(f"unknown metric {name!r}; built in: {sorted(builtin)} (or pass a name->fn mapping)")
        resolved[name] = builtin[name]()
    return resolved


def build_training_step(
    model: nn.Module,
    loss: Callable[..., Tensor] = F.cross_entropy,
    optimizer: Optimizer | None = None,
    args_shape: Sequence[Shape] | None = None,
    args_dtypes: Sequence[torch.dtype] | None = None,
    metrics: Sequence[str] | Mapping[str, Metric] = (),
    *,
    targets: int = 1,
    train: bool = True,
    name: str | None = None,
    verify: bool = True,
    progress: bool | None = None,
) -> TrainingStep:
    """Build the ONNX plan of one training step of ``model`` (see the module docstring for its ports).

    ``model(*args[:-targets])`` is scored by ``loss(output, *args[-targets:])`` (a scalar), the gradient
    of the trainable parameters is taken with ``torch.func.grad_and_value`` and ``optimizer`` (default
    ``SGD()``) updates them. In ``args_shape`` a -1 is a dynamic axis ("batch" on axis 0, "dim<k>" on
    axis k); a string names a dynamic axis explicitly (equal names are the same size). ``args_dtypes``
    defaults to float32, with int64 targets for cross_entropy/nll_loss. ``metrics``: names of built-in
    metrics ("accuracy") or a mapping name -> ``fn(output, *targets)`` returning a scalar.
    ``train`` selects the module mode the step runs in (dropout, batch-norm statistics). ``verify`` runs
    the plan once in onnxruntime at another batch size against the same step in eager torch (torch's own
    autograd), comparing every output, with :meth:`Optimizer.check_hyper` values that make a wrong
    gradient visible; with dropout only dtypes and shapes can be compared.

    ``progress`` shows the build's stages on stderr once it runs over a second (default: unless
    ``PLANWIRE_PROGRESS=0``).

    Raises TypeError for a missing ``args_shape``, a ``torch.optim`` optimizer or targets of the wrong
    dtype, TrainingExportError (a PlanBuildError) naming the op and layer when the gradient cannot be
    exported.
    """
    plan = name or f"train_{type(model).__name__}"
    if args_shape is None:
        raise TypeError(
            f"training plan {plan!r} needs args_shape: one shape per batch argument, model inputs then "
            "targets, -1 for any size, e.g. args_shape=[(-1, 1, 28, 28), (-1,)] for images and class labels "
            "(or pass examples=(x, y) to training_plan)"
        )
    optimizer = resolve_optimizer(optimizer)
    with building(plan, show=progress):
        return _build(model, loss, optimizer, args_shape, args_dtypes, metrics, targets, train, plan, verify)


def _build(
    model: nn.Module,
    loss: Callable[..., Tensor],
    optimizer: Optimizer,
    args_shape: Sequence[Shape],
    args_dtypes: Sequence[torch.dtype] | None,
    metrics: Sequence[str] | Mapping[str, Metric],
    targets: int,
    train: bool,
    plan: str,
    verify: bool,
) -> TrainingStep:
    kind = loss_kind(loss)
    n_args = len(args_shape)
    if not 1 <= targets < n_args:
        raise ValueError(f"targets={targets}: args_shape must hold the model inputs and then the targets")
    if args_dtypes is None:
        args_dtypes = [torch.float32] * (n_args - targets) + [
            torch.int64 if kind in _CLASS_INDEX_LOSSES else torch.float32
        ] * targets
    if len(args_dtypes) != n_args:
        raise ValueError(f"args_dtypes has {len(args_dtypes)} entries for {n_args} args_shape entries")
    _check_targets(kind, args_dtypes, targets)
    metric_fns = _metrics(metrics, kind)

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    hyper = optimizer.hyper_tensors()
    opt_state = optimizer.init_state(params)

    dims, sizes = _dims(args_shape)
    examples: list[Tensor] = []
    arg_ports: list[Port] = []
    for i, (shape, dtype, axes) in enumerate(zip(args_shape, args_dtypes, dims, strict=True)):
        concrete = [sizes[axes[a]] if a in axes else int(s) for a, s in enumerate(shape)]
        examples.append(torch.zeros(concrete, dtype=dtype))
        arg_ports.append(Port(f"arg{i}", "arg", dtype, tuple(axes.get(a, s) for a, s in enumerate(concrete))))

    def port(prefix: str, role: str, values: Mapping[str, Tensor]) -> list[Port]:
        return [Port(f"{prefix}.{k}", role, v.dtype, tuple(v.shape)) for k, v in values.items()]

    in_ports = [
        *arg_ports,
        *port("hyper", "hyper", hyper),
        *port("param", "param", params),
        *port("frozen", "frozen", frozen),
        *port("buffer", "buffer", buffers),
        *port("optim", "optim", opt_state),
    ]
    examples += [*hyper.values(), *params.values(), *frozen.values(), *buffers.values(), *opt_state.values()]

    groups = [n_args, len(hyper), len(params), len(frozen), len(buffers), len(opt_state)]
    tagger = ModuleTagger({"": model})
    out_kinds: dict[str, Any] = {}

    def step(*flat: Tensor) -> tuple[Tensor, ...]:
        it = iter(flat)
        args_, hyper_, params_, frozen_, buffers_, state_ = ([next(it) for _ in range(n)] for n in groups)
        model_args, target_args = args_[: n_args - targets], args_[n_args - targets :]

        def compute_loss(p: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
            local = {k: b.clone() for k, b in zip(buffers, buffers_, strict=True)}  # mutated in place
            values = {**p, **dict(zip(frozen, frozen_, strict=True)), **local}
            output = torch.func.functional_call(model, values, tuple(model_args), strict=True)
            if not isinstance(output, Tensor):
                raise TypeError(f"{type(model).__name__} must return one tensor, got {type(output).__name__}")
            value = loss(output, *target_args)
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise ValueError("the loss must return a scalar (0-d) tensor; use reduction='mean' or 'sum'")
            return value, (output, local)

        grads, (value, (output, local)) = torch.func.grad_and_value(compute_loss, has_aux=True)(
            dict(zip(params, params_, strict=True))
        )
        output = output.detach()
        grads = {k: g.contiguous() for k, g in grads.items()}  # strided grads trip some decompositions
        metric_values = [fn(output, *target_args) for fn in metric_fns.values()]
        new_params, new_state = optimizer.update(
            dict(zip(params, params_, strict=True)),
            grads,
            dict(zip(opt_state, state_, strict=True)),
            dict(zip(hyper, hyper_, strict=True)),
        )
        out_kinds["loss"] = value.dtype
        out_kinds["metrics"] = [m.dtype for m in metric_values]
        return (
            value,
            *metric_values,
            *new_params.values(),
            *local.values(),
            *(new_state[k] for k in opt_state),
        )

    was_training = model.training
    model.train(train)
    try:
        gm = trace(step, examples, [*dims, *([{}] * (len(examples) - n_args))], plan=plan, tagger=tagger)
    finally:
        model.train(was_training)
    dims, _ = unify_axes(gm, dims)
    arg_ports = [
        Port(p.name, p.role, p.dtype, tuple(dims[i].get(a, s) for a, s in enumerate(p.shape)))
        for i, p in enumerate(arg_ports)
    ]
    in_ports[:n_args] = arg_ports
    first_in = n_args + len(hyper) + len(params) + len(frozen)
    first_out = 1 + len(metric_fns) + len(params)
    mutated = _keep_mutated_buffers(gm, list(buffers), first_in, first_out)

    out_ports = [Port("loss", "loss", out_kinds["loss"], ())]
    out_ports += [Port(f"metric.{m}", "metric", dt, ()) for m, dt in zip(metric_fns, out_kinds["metrics"], strict=True)]
    for p in in_ports:
        if p.role in ("param", "optim") or (p.role == "buffer" and p.name.removeprefix("buffer.") in mutated):
            out_ports.append(Port(f"new.{p.name}", p.role, p.dtype, p.shape, binds=p.name))
    extra = {
        "planwire.training": {
            "optimizer": optimizer.describe(),
            "loss": kind or getattr(loss, "__name__", type(loss).__name__),
            "targets": targets,
            "train": train,
        }
    }

    def check(variant: PlanVariant, proto: onnx.ModelProto) -> None:
        """One onnxruntime run at another batch size == the same step in eager torch."""
        check_args = _verification_args(arg_ports, examples[:n_args])
        check_hyper = list(optimizer.hyper_tensors(**optimizer.check_hyper()).values())
        check_rest = [*check_hyper, *examples[n_args + len(hyper) :]]
        model.train(train)
        try:
            expected = list(step(*check_args, *check_rest))
        finally:
            model.train(was_training)
        expected = [
            *expected[:first_out],
            *(t for k, t in zip(buffers, expected[first_out:], strict=False) if k in mutated),
            *expected[first_out + len(buffers) :],
        ]
        feeds = {p.name: _numpy(t) for p, t in zip(in_ports, [*check_args, *check_rest], strict=True)}
        verify_plan(variant, feeds, expected, plan=plan, random=has_random_ops(proto))

    variant, proto = export_graph(
        gm,
        examples,
        in_ports,
        out_ports,
        plan=plan,
        kind="training",
        extra_meta=extra,
        check=check if verify else None,
    )
    state = {
        p.name: _numpy(t).copy()
        for p, t in zip(in_ports, examples, strict=True)
        if p.role in ("param", "frozen", "buffer", "optim")
    }
    return TrainingStep(
        name=plan,
        variant=variant,
        model=proto,
        args=tuple(p.name for p in arg_ports),
        hyper={f"hyper.{k}": _numpy(v) for k, v in hyper.items()},
        params=tuple(f"param.{k}" for k in params),
        frozen=tuple(f"frozen.{k}" for k in frozen),
        buffers=tuple(f"buffer.{k}" for k in buffers),
        optim=tuple(f"optim.{k}" for k in opt_state),
        metrics=tuple(f"metric.{m}" for m in metric_fns),
        bindings={p.name: p.binds for p in out_ports if p.binds},
        state=state,
        optimizer=optimizer,
    )


def _verification_args(ports: Sequence[Port], examples: Sequence[Tensor]) -> list[Tensor]:
    """A batch for the build check: dynamic axes 2 larger than traced, normal floats, zero integers."""
    gen = torch.Generator().manual_seed(0)
    args = []
    for port, example in zip(ports, examples, strict=True):
        shape = [n + 2 if isinstance(d, str) else n for d, n in zip(port.shape, example.shape, strict=True)]
        if example.dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen, dtype=example.dtype))
        else:
            args.append(torch.zeros(shape, dtype=example.dtype))
    return args


def _keep_mutated_buffers(gm: torch.fx.GraphModule, names: list[str], first_in: int, first_out: int) -> list[str]:
    """Drop the buffer outputs the forward never writes; return the names of those it does.

    The step clones every buffer input and returns the clones; a buffer is mutated when some op in the
    trace writes to its clone or to a view of it (BatchNorm's running stats, ``num_batches_tracked``).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = gm.graph.output_node()
    values = list(out.args[0])
    kept = []
    for i, name in reversed(list(enumerate(names))):
        clones = [u for u in placeholders[first_in + i].users if u.target is torch.ops.aten.clone.default]
        if any(_written(c) for c in clones):
            kept.append(name)
        else:
            del values[first_out + i]
    out.args = (tuple(values),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return kept[::-1]


def _written(node: torch.fx.Node) -> bool:
    """Whether an op writes to ``node``'s tensor, directly or through a view."""
    for user in node.users:
        target = user.target
        if not isinstance(target, torch._ops.OpOverload):
            continue
        for arg, value in zip(target._schema.arguments, user.args, strict=False):
            if value is not node or arg.alias_info is None:
                continue
            if arg.alias_info.is_write or _written(user):  # written, or a view that may be
                return True
    return False


__all__ = ["TrainingStep", "build_training_step", "loss_kind"]
