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
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planwire.exporter.onnx_passes import has_random_ops
from planwire.exporter.optim import Optimizer
from planwire.exporter.optim import resolve as resolve_optimizer
from planwire.exporter.progress import building
from planwire.exporter.training.attribution import ModuleTagger
from planwire.exporter.training.graph_export import export_graph, verify_once
from planwire.exporter.training.losses import CLASS_INDEX_LOSSES, Metric, check_targets, loss_kind, resolve_metrics
from planwire.exporter.training.result import TrainingStep, numpy_of
from planwire.exporter.training.specs import TorchSpec
from planwire.exporter.training.trace import trace, unify_axes
from planwire.transport.spec import PlanVariant

Shape = Sequence[int | str]


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
    """Check the arguments, trace the step, name its ports, export and verify it."""
    kind = loss_kind(loss)
    n_args = len(args_shape)
    if not 1 <= targets < n_args:
        raise ValueError(f"targets={targets}: args_shape must hold the model inputs and then the targets")
    if args_dtypes is None:
        target_dtype = torch.int64 if kind in CLASS_INDEX_LOSSES else torch.float32
        args_dtypes = [torch.float32] * (n_args - targets) + [target_dtype] * targets
    if len(args_dtypes) != n_args:
        raise ValueError(f"args_dtypes has {len(args_dtypes)} entries for {n_args} args_shape entries")
    check_targets(kind, args_dtypes, targets)
    metric_fns = resolve_metrics(metrics, kind)
    state = _State.of(model, optimizer)

    batch, arg_ports, dims = _batch_ports(args_shape, args_dtypes)
    examples = [*batch, *state.tensors()]
    step = _step_fn(model, loss, optimizer, metric_fns, state, n_args, targets)
    was_training = model.training
    model.train(train)
    try:
        gm = trace(
            step, examples, [*dims, *([{}] * (len(examples) - n_args))], plan=plan, tagger=ModuleTagger({"": model})
        )
    finally:
        model.train(was_training)
    reported = [v.meta["val"].dtype for v in gm.graph.output_node().args[0][: 1 + len(metric_fns)]]
    dims, _ = unify_axes(gm, dims)
    arg_ports = [
        TorchSpec(p.name, p.role, p.dtype, tuple(dims[i].get(a, s) for a, s in enumerate(p.shape)))
        for i, p in enumerate(arg_ports)
    ]
    in_ports = [*arg_ports, *state.ports()]
    first_in = n_args + len(state.hyper) + len(state.params) + len(state.frozen)
    first_out = 1 + len(metric_fns) + len(state.params)
    mutated = _keep_mutated_buffers(gm, list(state.buffers), first_in, first_out)
    out_ports = [TorchSpec("loss", "loss", reported[0], ())]
    out_ports += [TorchSpec(f"metric.{m}", "metric", dt, ()) for m, dt in zip(metric_fns, reported[1:], strict=True)]
    for p in in_ports:
        if p.role in ("param", "optim") or (p.role == "buffer" and p.name.removeprefix("buffer.") in mutated):
            out_ports.append(TorchSpec(f"new.{p.name}", p.role, p.dtype, p.shape, binds=p.name))
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
        check_args = _verification_args(arg_ports, batch)
        check_hyper = list(optimizer.hyper_tensors(**optimizer.check_hyper()).values())
        check_rest = [*check_hyper, *examples[n_args + len(state.hyper) :]]
        model.train(train)
        try:
            expected = list(step(*check_args, *check_rest))
        finally:
            model.train(was_training)
        expected = [
            *expected[:first_out],
            *(t for k, t in zip(state.buffers, expected[first_out:], strict=False) if k in mutated),
            *expected[first_out + len(state.buffers) :],
        ]
        feeds = {p.name: numpy_of(t) for p, t in zip(in_ports, [*check_args, *check_rest], strict=True)}
        verify_once(variant, feeds, expected, plan=plan, random=has_random_ops(proto))

    variant, proto = export_graph(
        gm, examples, in_ports, out_ports, plan=plan, kind="training", extra_meta=extra, check=check if verify else None
    )
    return TrainingStep(
        name=plan,
        variant=variant,
        model=proto,
        args=tuple(p.name for p in arg_ports),
        hyper={f"hyper.{k}": numpy_of(v) for k, v in state.hyper.items()},
        params=tuple(f"param.{k}" for k in state.params),
        frozen=tuple(f"frozen.{k}" for k in state.frozen),
        buffers=tuple(f"buffer.{k}" for k in state.buffers),
        optim=tuple(f"optim.{k}" for k in state.opt_state),
        metrics=tuple(f"metric.{m}" for m in metric_fns),
        bindings={p.name: p.binds for p in out_ports if p.binds},
        state={
            p.name: numpy_of(t).copy()
            for p, t in zip(in_ports, examples, strict=True)
            if p.role in ("param", "frozen", "buffer", "optim")
        },
        optimizer=optimizer,
    )


@dataclass(frozen=True)
class _State:
    """What a step reads besides the batch, by group, in graph-input order: hyper-parameters,
    trainable and frozen parameters, buffers, optimizer state."""

    hyper: dict[str, Tensor]
    params: dict[str, Tensor]
    frozen: dict[str, Tensor]
    buffers: dict[str, Tensor]
    opt_state: dict[str, Tensor]

    @classmethod
    def of(cls, model: nn.Module, optimizer: Optimizer) -> _State:
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
        buffers = {k: b.detach() for k, b in model.named_buffers()}
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        return cls(optimizer.hyper_tensors(), params, frozen, buffers, optimizer.init_state(params))

    def groups(self) -> list[tuple[str, str, dict[str, Tensor]]]:
        """(input name prefix, role, values) per group."""
        return [
            ("hyper", "hyper", self.hyper),
            ("param", "param", self.params),
            ("frozen", "frozen", self.frozen),
            ("buffer", "buffer", self.buffers),
            ("optim", "optim", self.opt_state),
        ]

    def ports(self) -> list[TorchSpec]:
        return [
            TorchSpec(f"{prefix}.{k}", role, v.dtype, tuple(v.shape))
            for prefix, role, g in self.groups()
            for k, v in g.items()
        ]

    def tensors(self) -> list[Tensor]:
        return [v for _, _, g in self.groups() for v in g.values()]


def _batch_ports(
    args_shape: Sequence[Shape], args_dtypes: Sequence[torch.dtype]
) -> tuple[list[Tensor], list[TorchSpec], list[dict[int, str]]]:
    """Example batch tensors (dynamic axes at distinct prime sizes), their ports and dynamic axes."""
    dims, sizes = _dims(args_shape)
    examples: list[Tensor] = []
    ports: list[TorchSpec] = []
    for i, (shape, dtype, axes) in enumerate(zip(args_shape, args_dtypes, dims, strict=True)):
        concrete = [sizes[axes[a]] if a in axes else int(s) for a, s in enumerate(shape)]
        examples.append(torch.zeros(concrete, dtype=dtype))
        ports.append(TorchSpec(f"arg{i}", "arg", dtype, tuple(axes.get(a, s) for a, s in enumerate(concrete))))
    return examples, ports, dims


def _step_fn(
    model: nn.Module,
    loss: Callable[..., Tensor],
    optimizer: Optimizer,
    metric_fns: Mapping[str, Metric],
    state: _State,
    n_args: int,
    targets: int,
) -> Callable[..., tuple[Tensor, ...]]:
    """The step as a function of flat tensors (batch, then ``state``'s groups): loss, metrics, new
    parameters, the buffers' clones (mutated by the forward) and the new optimizer state."""
    params, frozen, buffers, opt_state, hyper = state.params, state.frozen, state.buffers, state.opt_state, state.hyper
    groups = [n_args, len(hyper), len(params), len(frozen), len(buffers), len(opt_state)]

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
        return (
            value,
            *metric_values,
            *new_params.values(),
            *local.values(),
            *(new_state[k] for k in opt_state),
        )

    return step


def _verification_args(ports: Sequence[TorchSpec], examples: Sequence[Tensor]) -> list[Tensor]:
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


__all__ = ["TrainingStep", "build_training_step"]
