"""Local decompositions: the CompositeImplicitAutograd ops of common modules, rewritten node by node.

torch.onnx's decomposition step (``ExportedProgram.run_decompositions``) re-traces the whole captured
graph under fake tensors whenever one node needs decomposing: 0.67 s of CPU of a 0.92 s warm build of
bench/build.py's BatchNorm/reshape/flatten plan, where capture takes 0.14 s and the rest 0.1 s. The ops
that make common plans need it are few: ``aten.batch_norm`` in eval mode (BatchNorm layers),
``aten.reshape``, ``aten.flatten``, dropout in eval mode, ``contiguous``, global average pooling. For
each, :data:`RULES` writes in place of the node exactly the nodes that torch's own decomposition gives
(the CompositeImplicitAutograd kernels in torch's ``TensorShape.cpp``, ``Normalization.cpp`` and
``AdaptiveAveragePooling.cpp``, and torch's Python decomposition of dropout, as traced by export):

* ``batch_norm(x, w, b, mean, var, training=False, momentum, eps, _)`` with running statistics →
  ``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]``;
* ``reshape(x, shape)`` of a contiguous ``x`` → ``view(x, shape)`` (a contiguous tensor is always
  viewable, so the kernel never takes its copying branch);
* ``flatten(x, start, end)`` of a contiguous ``x`` of rank >= 1, ``start < end``, with static sizes in
  the flattened range → ``view(x, sizes before + [their product] + sizes after)``, a symbolic size
  read by ``sym_size.int`` from the graph input it comes from, as torch's tracer does;
* ``dropout(x, p, train=False)`` → ``clone(x)`` (torch's Python decomposition of dropout);
* ``contiguous(x)`` → ``x`` when contiguous, else ``clone(x, memory_format=torch.contiguous_format)``;
* ``adaptive_avg_pool2d(x, [1, 1])`` of a contiguous ``x`` → ``mean(x, [-1, -2], keepdim=True)`` (the
  kernel's own shortcut for global pooling, as in ResNet heads).

Every rule returns None (and the build takes torch's normal path) on anything else: training-mode
batch norm, missing statistics, mixed dtypes, non-contiguous or symbolic cases, an argument that is
not what the schema says. :func:`decompose_locally` rewrites a *copy* of the program and hands it back
only if the result passes :func:`torch_compat.nothing_to_decompose` (so torch's step would leave it
alone); tests export plans both ways and compare the ONNX graphs.

``decompose.skipped``/``decompose.decomposed``/``decompose.rewritten`` (read by the build benchmark)
are torch_compat's live counters.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from planwire.exporter import torch_compat

aten = torch.ops.aten

# A rule looks at one node and returns how to rewrite it (called later on the copy), or None.
Rewrite = Callable[[fx.Graph, fx.Node, dict[fx.Node, fx.Node]], fx.Node]
Rule = Callable[[fx.Node], Rewrite | None]


def __getattr__(name: str) -> Any:
    """The counters live in torch_compat (one module patches torch.onnx and counts what it did)."""
    if name in ("skipped", "decomposed", "rewritten"):
        return getattr(torch_compat, name)
    raise AttributeError(name)


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _contiguous(value: Any) -> bool:
    """Whether a fake tensor is contiguous for every value of its symbolic sizes (no guard added)."""
    if not isinstance(value, torch.Tensor) or value.layout is not torch.strided:
        return False
    expected = 1
    for size, stride in reversed(list(zip(value.shape, value.stride(), strict=True))):
        if not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def _call(graph: fx.Graph, like: fx.Node, target: Any, args: tuple[Any, ...], val: Any) -> fx.Node:
    """A call_function node placed before ``like``, with its metadata (source, module stack) and ``val``."""
    name = target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else None
    with graph.inserting_before(like):
        node = graph.call_function(target, args, name=name)  # named as torch names them: "view", "view_1"
    for key in ("stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["val"] = val
    if isinstance(target, torch._ops.OpOverload):
        node.meta["original_aten"] = target
    return node


def _batch_norm(node: fx.Node) -> Rewrite | None:
    """``batch_norm`` in eval mode with running statistics → ``_native_batch_norm_legit_no_training[0]``."""
    if len(node.args) != 9 or node.kwargs:
        return None
    x, weight, bias, mean, var, training, momentum, eps, _cudnn = node.args
    if training is not False or not isinstance(momentum, float) or not isinstance(eps, float):
        return None
    tensors = [_val(a) for a in (x, mean, var)] + [_val(a) for a in (weight, bias) if a is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    if len({t.dtype for t in tensors}) != 1 or not tensors[0].is_floating_point() or tensors[0].dim() < 2:
        return None
    out = _val(node)
    if not isinstance(out, torch.Tensor):
        return None

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        args = tuple(env[a] if isinstance(a, fx.Node) else a for a in (x, weight, bias, mean, var))
        mode = out.fake_mode  # type: ignore[attr-defined]
        with mode:
            triple = aten._native_batch_norm_legit_no_training.default(*(_val(a) for a in args), momentum, eps)
        legit = _call(graph, new, aten._native_batch_norm_legit_no_training.default, (*args, momentum, eps), triple)
        return _call(graph, new, operator.getitem, (legit, 0), triple[0])

    return rewrite


def _reshape(node: fx.Node) -> Rewrite | None:
    """``reshape`` of a contiguous tensor → ``view`` with the same sizes."""
    if len(node.args) != 2 or node.kwargs or not _contiguous(_val(node.args[0])):
        return None
    x, shape = node.args
    if not isinstance(shape, list | tuple) or not all(isinstance(s, int | fx.Node) for s in shape):
        return None

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        sizes = [env[s] if isinstance(s, fx.Node) else s for s in shape]
        return _call(graph, new, aten.view.default, (env[x], sizes), new.meta["val"])

    return rewrite


def _dropout(node: fx.Node) -> Rewrite | None:
    """``dropout(x, p, train=False)`` → ``clone(x)`` (torch's decomposition of dropout outside training)."""
    if len(node.args) != 3 or node.kwargs or node.args[2] is not False or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        return _call(graph, new, aten.clone.default, (env[x],), new.meta["val"])

    return rewrite


def _contiguous_op(node: fx.Node) -> Rewrite | None:
    """``contiguous(x)`` → ``x`` itself when contiguous, else ``clone(x, memory_format=contiguous_format)``."""
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    if node.kwargs.get("memory_format", torch.contiguous_format) is not torch.contiguous_format:
        return None
    x = node.args[0]
    if _contiguous(_val(x)):
        if any(user.op == "output" for user in node.users):  # the program would return an input as is
            return None
        return lambda graph, new, env: env[x]

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        clone = _call(graph, new, aten.clone.default, (env[x],), new.meta["val"])
        clone.kwargs = {"memory_format": torch.contiguous_format}
        return clone

    return rewrite


def _adaptive_avg_pool2d(node: fx.Node) -> Rewrite | None:
    """``adaptive_avg_pool2d(x, [1, 1])`` of a contiguous ``x`` → ``mean(x, [-1, -2], keepdim=True)``."""
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], list | tuple):
        return None
    if list(node.args[1]) != [1, 1] or not _contiguous(_val(node.args[0])):
        return None
    x = node.args[0]

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        return _call(graph, new, aten.mean.dim, (env[x], [-1, -2], True), new.meta["val"])

    return rewrite


def _symbol_source(graph: fx.Graph, size: Any) -> tuple[fx.Node, int] | None:
    """The graph input and axis whose size is the bare symbol ``size``, first in graph order."""
    expr = size.node.expr
    if not getattr(expr, "is_Symbol", False):
        return None
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = _val(node)
        if isinstance(value, torch.Tensor):
            for axis, s in enumerate(value.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == expr:
                    return node, axis
    return None


def _flatten(node: fx.Node) -> Rewrite | None:
    """``flatten(x, start, end)`` of a contiguous tensor with static sizes in [start, end] → ``view``."""
    if node.kwargs or not 1 <= len(node.args) <= 3:
        return None
    x = node.args[0]
    value = _val(x)
    if not _contiguous(value) or value.dim() == 0:
        return None
    rank = value.dim()
    start = node.args[1] if len(node.args) > 1 else 0
    end = node.args[2] if len(node.args) > 2 else -1
    if not isinstance(start, int) or not isinstance(end, int) or not (-rank <= start < rank and -rank <= end < rank):
        return None
    start, end = start % rank, end % rank
    if start >= end:
        return None
    inner = value.shape[start : end + 1]
    if not all(isinstance(s, int) for s in inner):
        return None
    sources = {}
    for axis in [*range(start), *range(end + 1, rank)]:
        size = value.shape[axis]
        if isinstance(size, torch.SymInt):
            source = _symbol_source(x.graph, size)
            if source is None:
                return None
            sources[axis] = source
    product = 1
    for s in inner:
        product *= s

    def rewrite(graph: fx.Graph, new: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        sizes: list[Any] = []
        for axis in range(rank):
            if start < axis <= end:
                continue
            if axis == start:
                sizes.append(product)
            elif axis in sources:
                placeholder, at = sources[axis]
                size = _sym_size(graph, env[placeholder], at, value.shape[axis], new)
                sizes.append(size)
            else:
                sizes.append(value.shape[axis])
        return _call(graph, new, aten.view.default, (env[x], sizes), new.meta["val"])

    return rewrite


def _sym_size(graph: fx.Graph, source: fx.Node, axis: int, val: Any, user: fx.Node) -> fx.Node:
    """``sym_size.int(source, axis)`` among the nodes right after the graph inputs (one per size)."""
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            last = node
        elif node.target is aten.sym_size.int and node.args == (source, axis):
            return node
        elif node.op != "call_function" or node.target is not aten.sym_size.int:
            break
    assert last is not None
    with graph.inserting_after(last):
        size = graph.call_function(aten.sym_size.int, (source, axis), name="sym_size_int")
    size.meta["val"] = val
    for key in ("stack_trace", "nn_module_stack"):
        if key in user.meta:
            size.meta[key] = user.meta[key]
    return size


RULES: dict[Any, Rule] = {
    aten.batch_norm.default: _batch_norm,
    aten.reshape.default: _reshape,
    aten.flatten.using_ints: _flatten,
    aten.dropout.default: _dropout,
    aten.contiguous.default: _contiguous_op,
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
}


def plan_rewrites(program: torch.export.ExportedProgram, registry: Any) -> dict[fx.Node, Rewrite] | None:
    """For each node torch's step would decompose, its rewrite; None when a node has no rule that applies."""
    rewrites: dict[fx.Node, Rewrite] = {}
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or torch_compat.left_alone(node.target, registry):
            continue
        rule = RULES.get(node.target)
        rewrite = rule(node) if rule is not None else None
        if rewrite is None:
            return None
        rewrites[node] = rewrite
    return rewrites


def decompose_locally(program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram | None:
    """``program`` with its decomposable nodes rewritten by :data:`RULES`, or None (take torch's path).

    Works on a copy: the captured program stays as it was for the normal path.
    """
    if not torch_compat.program_left_alone(program, registry):
        return None
    rewrites = plan_rewrites(program, registry)
    if not rewrites:
        return None
    old = program.graph_module
    env: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(tracer_cls=old.graph._tracer_cls)
    value, output = graph.graph_copy(old.graph, env, return_output_node=True)  # type: ignore[misc]
    graph.output(value, type_expr=getattr(output, "type", None)).meta = copy.copy(output.meta)
    graph._codegen = copy.deepcopy(old.graph._codegen)
    for node, rewrite in rewrites.items():
        new = env[node]
        env[node] = rewrite(graph, new, env)
        new.replace_all_uses_with(env[node])
        graph.erase_node(new)
    graph.lint()
    module = fx.GraphModule(old, graph)
    module.meta.update(old.meta)
    renamed = {node.name: env[node].name for node in rewrites}
    outputs = [
        replace(spec, arg=replace(spec.arg, name=renamed[spec.arg.name]))
        if getattr(spec.arg, "name", None) in renamed
        else spec
        for spec in program.graph_signature.output_specs
    ]
    result = program._update(module, replace(program.graph_signature, output_specs=outputs))
    if not torch_compat.nothing_to_decompose(result, registry):
        return None
    return result
