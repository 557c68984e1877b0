"""Plain functions that take gradients (``torch.func.grad`` & co.) as ONNX graphs.

``build_function_step(fn, example_args, dynamic=...)`` traces ``fn`` through the same pipeline as a
training step (:mod:`.trace`): autograd runs while tracing, so ``torch.func.grad``/``grad_and_value``/
``vjp`` over ``torch.func.functional_call`` (a custom loss, a FedProx proximal term, a hand-written
update) become ordinary forward ops in the graph. ``torch.onnx.export`` alone cannot do this: it either
fails on the transform or, for ``torch.autograd.grad``, may freeze saved values as constants.

``func2plan`` takes this path for such a function (:func:`export_function`, inside the plan's own
build); :func:`uses_autograd` is the cheap check for that.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import torch
from torch import Tensor, nn

from planwire.exporter.fingerprint import uses_autograd
from planwire.exporter.onnx_passes import has_random_ops
from planwire.exporter.training.attribution import ModuleTagger
from planwire.exporter.training.graph_export import export_graph, export_traced, verify_once
from planwire.exporter.training.specs import TorchSpec, VariantView
from planwire.exporter.training.trace import port_shape, trace, unify_axes
from planwire.transport.spec import PlanVariant


def _modules_of(fn: Callable[..., object]) -> dict[str, nn.Module]:
    """The nn.Modules ``fn`` closes over or reads as globals, by variable name (for error messages)."""
    found: dict[str, nn.Module] = {}
    code = getattr(fn, "__code__", None)
    if code is None:
        return found
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, nn.Module):
            found[name] = value
    todo = [code]
    while todo:  # globals read by fn or by the functions nested in it (lambdas, closures)
        c = todo.pop()
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        for name in c.co_names:
            value = getattr(fn, "__globals__", {}).get(name)
            if isinstance(value, nn.Module):
                found.setdefault(name, value)
    return found


@dataclass(frozen=True)
class FunctionStep(VariantView):
    """A built function plan: its ONNX variant and port names (outputs flattened in pytree order)."""

    name: str
    variant: PlanVariant
    model: onnx.ModelProto = field(repr=False)
    output_spec: object = field(repr=False)  # torch.utils._pytree.TreeSpec of fn's result


@dataclass(frozen=True)
class _Traced:
    """A traced function: its graph, example inputs, ports and how to call it flat."""

    plan: str
    gm: torch.fx.GraphModule
    examples: list[Tensor]
    inputs: list[TorchSpec]
    outputs: list[TorchSpec]
    flat: Callable[..., tuple[Tensor, ...]]
    output_spec: object


def build_function_step(
    fn: Callable[..., object],
    example_args: Sequence[Tensor],
    *,
    dynamic: Sequence[Collection[int] | Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    name: str | None = None,
    verify: bool = True,
) -> FunctionStep:
    """Export ``fn(*example_args)`` (tensors in, a tensor or a tuple/list/dict of tensors out).

    ``dynamic[i]`` lists the axes of argument i that stay symbolic (a mapping gives them names; by
    default ``f"{input_name}_{axis}"``; missing trailing entries are static); their example sizes must
    be >= 2. Axes that the code proves
    equal share one symbol. Output names default to the dict keys of the result, else ``output<i>``.
    ``verify`` runs the plan once on ``example_args`` in onnxruntime against eager ``fn``.
    Raises TrainingExportError (a PlanBuildError) naming the op, and the layer when ``fn`` uses a module
    it closes over, if the graph cannot be exported.
    """
    traced = _trace(fn, example_args, dynamic, input_names, output_names, name)

    def check(variant: PlanVariant, proto: onnx.ModelProto) -> None:
        feeds = {p.name: a.cpu().numpy() for p, a in zip(traced.inputs, traced.examples, strict=True)}
        verify_once(variant, feeds, traced.flat(*traced.examples), plan=traced.plan, random=has_random_ops(proto))

    variant, proto = export_graph(
        traced.gm,
        traced.examples,
        traced.inputs,
        traced.outputs,
        plan=traced.plan,
        kind="function",
        check=check if verify else None,
    )
    return FunctionStep(traced.plan, variant, proto, traced.output_spec)


def export_function(
    fn: Callable[..., object],
    example_args: Sequence[Tensor],
    *,
    dynamic: Sequence[Collection[int] | Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    name: str | None = None,
) -> onnx.ModelProto:
    """The ONNX graph of ``fn`` as :func:`build_function_step` exports it, without metadata, cache or
    verification: for a caller that builds the variant itself (``func2plan`` on a gradient function)."""
    traced = _trace(fn, example_args, dynamic, input_names, output_names, name)
    return export_traced(traced.gm, traced.examples, traced.inputs, traced.outputs, plan=traced.plan)


def _trace(
    fn: Callable[..., object],
    example_args: Sequence[Tensor],
    dynamic: Sequence[Collection[int] | Mapping[int, str]] | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    name: str | None,
) -> _Traced:
    """Check the arguments, trace ``fn`` (outputs flattened in pytree order) and name its ports."""
    plan = name or getattr(fn, "__name__", "function")
    for i, a in enumerate(example_args):
        if not isinstance(a, Tensor):
            raise TypeError(f"example_args[{i}] must be a tensor, got {type(a).__name__}")
    names = list(input_names or [f"arg{i}" for i in range(len(example_args))])
    if len(names) != len(example_args):
        raise ValueError(f"{len(names)} input_names for {len(example_args)} example_args")
    dims = _dims(example_args, names, list(dynamic or ()))

    spec_box: dict[str, object] = {}

    def flat(*args: Tensor) -> tuple[Tensor, ...]:
        result = fn(*args)
        leaves, spec = torch.utils._pytree.tree_flatten(result)
        for leaf in leaves:
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{plan}: outputs must be tensors, got {type(leaf).__name__}")
        spec_box["spec"] = spec
        spec_box["keys"] = list(result) if isinstance(result, Mapping) else None
        return tuple(leaves)

    examples = [a.detach() for a in example_args]
    gm = trace(flat, examples, dims, plan=plan, tagger=ModuleTagger(_modules_of(fn)))
    dims, symbols = unify_axes(gm, dims)
    in_ports = [
        TorchSpec(n, "arg", a.dtype, tuple(d.get(ax, s) for ax, s in enumerate(a.shape)))
        for n, a, d in zip(names, examples, dims, strict=True)
    ]
    values = [v.meta["val"] for v in gm.graph.output_node().args[0]]
    keys = spec_box.get("keys")
    out_names = list(
        output_names
        or (keys if isinstance(keys, list) and len(keys) == len(values) else None)
        or [f"output{i}" for i in range(len(values))]
    )
    if len(out_names) != len(values):
        raise ValueError(f"{len(out_names)} output_names for {len(values)} outputs")
    out_ports = [
        TorchSpec(str(n), "output", v.dtype, port_shape(v, symbols)) for n, v in zip(out_names, values, strict=True)
    ]
    return _Traced(plan, gm, examples, in_ports, out_ports, flat, spec_box["spec"])


def _dims(
    example_args: Sequence[Tensor], names: Sequence[str], dynamic: Sequence[Collection[int] | Mapping[int, str]]
) -> list[dict[int, str]]:
    """Each argument's dynamic axes, named (default ``<input>_<axis>``); sizes 0 and 1 are refused."""
    if len(dynamic) > len(example_args):
        raise ValueError(f"dynamic has {len(dynamic)} entries for {len(example_args)} example_args")
    dims: list[dict[int, str]] = []
    for i, axes in enumerate([*dynamic, *[()] * (len(example_args) - len(dynamic))]):
        named = dict(axes) if isinstance(axes, Mapping) else {a: f"{names[i]}_{a}" for a in axes}
        for axis in named:
            if example_args[i].shape[axis] < 2:
                raise ValueError(
                    f"dynamic axis {axis} of {names[i]!r} has example size {example_args[i].shape[axis]}: "
                    "trace with a size of 2 or more (sizes 0 and 1 get specialized)"
                )
        dims.append(named)
    return dims


__all__ = ["FunctionStep", "build_function_step", "export_function", "uses_autograd"]
