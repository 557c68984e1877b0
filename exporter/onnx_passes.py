"""Walks over and passes on exported ONNX graphs (protobuf level), subgraphs included.

Every pass that looks at nodes or tensors goes through :func:`iter_graphs`/:func:`iter_nodes`/
:func:`iter_tensors`, so an op inside an ``If`` or ``Loop`` body is never missed (a random op in a
branch, a custom-domain op, an external tensor). The exporters (:mod:`..export` for plans,
:mod:`..training.graph_export` for traced graphs) call these after ``torch.onnx.export``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import onnx
from onnx import helper, numpy_helper

from planwire.exporter.errors import PlanBuildError

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

# Ops whose results are random (Dropout: a module exported in training mode): a graph with any of them
# is checked for output dtypes and shapes only.
RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node``'s attributes hold (``If`` branches, ``Loop``/``Scan`` bodies)."""
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append(attr.g)
        found.extend(attr.graphs)
    return found


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for g in iter_graphs(graph):
        yield from g.node


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers (subgraphs' too) and constant attributes."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def has_random_ops(proto: onnx.ModelProto) -> bool:
    """Whether the graph (or a subgraph) draws random numbers: its outputs then differ from eager torch's."""
    return any(node.op_type in RANDOM_OPS for node in iter_nodes(proto.graph))


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node and per-value metadata and doc strings.

    They hold FX node dumps and stack traces with local file paths: nothing a worker needs, more than
    the graph itself for small plans, and they would make a plan's content id depend on where its
    source file lives (or, for the graph's own metadata, on how torch named its FX nodes and symbols).
    """
    for graph in iter_graphs(proto.graph):
        graph.doc_string = ""
        del graph.metadata_props[:]  # torch.export's graph signature (FX node names) and range constraints
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        for value in [*graph.input, *graph.output, *graph.value_info]:
            del value.metadata_props[:]
            value.doc_string = ""
        for tensor in graph.initializer:
            del tensor.metadata_props[:]
            tensor.doc_string = ""


def check_exported(
    proto: onnx.ModelProto, *, plan: str, input_names: Sequence[str], dynamic: Sequence[Collection[int]]
) -> None:
    """PlanBuildError unless the model is standard, self-contained and dynamic where asked."""
    if proto.functions:
        raise PlanBuildError(
            f"plan {plan!r}: the exported graph still has local functions "
            f"({', '.join(f.name for f in proto.functions)})",
            plan=plan,
            op=proto.functions[0].name,
        )
    for node in iter_nodes(proto.graph):
        if node.domain not in STANDARD_DOMAINS:
            op = f"{node.domain}::{node.op_type}"
            raise PlanBuildError(f"plan {plan!r}: op {op} is not a standard ONNX op", plan=plan, op=op)
    for tensor in iter_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise PlanBuildError(f"plan {plan!r}: tensor {tensor.name!r} uses external data", plan=plan)
    inputs = {i.name: i for i in proto.graph.input}
    for name, axes in zip(input_names, dynamic, strict=True):
        dims = inputs[name].type.tensor_type.shape.dim
        for axis in sorted(axes):
            if not dims[axis].dim_param:
                raise PlanBuildError(
                    f"plan {plan!r}: axis {axis} of {name!r} should be dynamic but the traced code fixed it "
                    f"to {dims[axis].dim_value}",
                    plan=plan,
                )


def name_dynamic_axes(
    proto: onnx.ModelProto, inputs: Sequence[Sequence[object]], outputs: Sequence[Sequence[object]]
) -> None:
    """Give the graph's dynamic dims the plan's axis names (the exporter writes ``s0``, ``2*s0``...).

    ``inputs``/``outputs`` hold each port's shape, a str for a named dynamic axis. Graph inputs and
    outputs take those names verbatim; intermediate values are renamed through the symbols the inputs
    define.
    """
    rename: dict[str, str] = {}
    for values, shapes in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        for value, shape in zip(values, shapes, strict=True):
            for dim, want in zip(value.type.tensor_type.shape.dim, shape, strict=False):
                if isinstance(want, str) and not dim.HasField("dim_value"):
                    if values is proto.graph.input and dim.dim_param:
                        rename.setdefault(dim.dim_param, want)
                    dim.dim_param = want
    for value in proto.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def tidy_max_pools(proto: onnx.ModelProto) -> int:
    """Remove the ``Indices`` output of every ``MaxPool`` that nothing reads, then let a MaxPool that
    computes indices also serve a one-output MaxPool of the same input and attributes; returns how
    many outputs and nodes went.

    The tiled max-pool backward (``pool_backward.max_pool2d_backward_onnx``) pools the forward's input
    again for its indices, while the forward's MaxPool keeps an Indices output nothing reads. onnxruntime
    runs a MaxPool with an Indices output in a generic kernel, several times slower than its one-output
    kernel, and one pool is cheaper than two.
    """
    graph = proto.graph
    used = {o.name for o in graph.output} | {i for node in iter_nodes(graph) for i in node.input}
    changed = 0
    pools = [n for n in graph.node if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")]
    for node in pools:
        if len(node.output) == 2 and node.output[1] and node.output[1] not in used:
            del node.output[1]
            changed += 1

    def signature(node: onnx.NodeProto) -> tuple:
        attrs = sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)
        return node.domain, tuple(node.input), tuple(attrs)

    if any(subgraphs(node) for node in graph.node):  # names would need renaming in the subgraphs too
        return changed
    outputs = {o.name for o in graph.output}
    while True:
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
        pools = {i: n for i, n in enumerate(nodes) if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")}
        with_indices = {signature(n): i for i, n in pools.items() if len(n.output) == 2 and n.output[0]}
        pair = next(
            (
                (i, with_indices[signature(n)])
                for i, n in pools.items()
                if len(n.output) == 1 and n.output[0] not in outputs and signature(n) in with_indices
            ),
            None,
        )
        if pair is None:
            return changed
        at, other = pair
        old, new = nodes[at].output[0], nodes[other].output[0]
        for user in nodes:
            user.input[:] = [new if name == old else name for name in user.input]
        if other > at:  # its only input is the same, so it may run where the one-output pool ran
            nodes[at] = nodes.pop(other)
        else:
            del nodes[at]
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [v for v in graph.value_info if v.name != old]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        changed += 1


# Float types whose Where(c, 0, g) becomes a mask multiply: those onnxruntime's CPU ReduceSum takes
# (integers have no non-finite values to guard, and their selects are small index arithmetic).
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


def _zero_scalars(graph: onnx.GraphProto) -> dict[str, int]:
    """Names of the 0-d float zeros ``graph`` defines (initializers, ``Constant`` nodes) -> their dtype."""
    zeros = {}
    for name, tensor in _constants(graph).items():
        if tensor.data_type in _FLOAT_TYPES and not tensor.dims and numpy_helper.to_array(tensor) == 0:
            zeros[name] = tensor.data_type
    return zeros


def guard_zero_selects(proto: onnx.ModelProto) -> int:
    """Replace every ``Where(c, 0, g)`` (and ``Where(c, g, 0)``) over floats in the main graph by a mask
    multiply ``g * Cast(not c)`` guarded by ``If(g has a non-finite value)``, which then takes the
    ``Where``; returns how many were replaced.

    Backward passes select this way (ReLU's ``threshold_backward`` is ``where(x <= t, 0, g)``), and
    onnxruntime's Where takes a generic per-element path: measured ~12x slower than the multiply over a
    (32, 16, 32, 32) gradient. The multiply alone differs from Where where ``g`` is infinite or NaN
    (``inf * 0`` is NaN, Where gives 0), so the guard sums ``g`` once (``s - s`` is NaN exactly when
    the sum, so some element, is not finite; an overflowing sum of finite values merely takes the
    Where too). The result equals the Where's for every input, except that a zero may come out as
    ``-0.0`` (``g * 0`` for a negative ``g``).
    """
    graph = proto.graph
    zeros = _zero_scalars(graph)
    if not zeros:
        return 0
    taken = {name for node in iter_nodes(graph) for name in (*node.input, *node.output, node.name)}
    taken |= {v.name for v in [*graph.input, *graph.output, *graph.initializer, *graph.value_info]}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if node.op_type != "Where" or node.domain not in STANDARD_DOMAINS or len(node.input) != 3:
            nodes.append(node)
            continue
        cond, a, b = node.input
        if a in zeros and b not in zeros:
            grad, dtype, negate = b, zeros[a], True  # 0 where cond
        elif b in zeros and a not in zeros:
            grad, dtype, negate = a, zeros[b], False  # g where cond
        else:
            nodes.append(node)
            continue
        out = node.output[0]
        total, spread, bad = fresh(f"{out}__sum"), fresh(f"{out}__spread"), fresh(f"{out}__nonfinite")
        keep, keep_f, then_out, else_out = (fresh(f"{out}__{s}") for s in ("keep", "keepf", "where", "mul"))
        where = onnx.NodeProto()
        where.CopyFrom(node)
        where.output[0] = then_out
        where.name = fresh(f"{node.name or out}__where")
        mask = [helper.make_node("Not", [cond], [keep], name=fresh(f"{out}__not"))] if negate else []
        kept = keep if negate else cond
        mask.append(helper.make_node("Cast", [kept], [keep_f], to=dtype, name=fresh(f"{out}__cast")))
        mask.append(helper.make_node("Mul", [grad, keep_f], [else_out], name=fresh(f"{out}__mul")))
        then_branch = helper.make_graph([where], fresh(f"{out}__nonfinite_branch"), [], [_typed(then_out, dtype)])
        else_branch = helper.make_graph(mask, fresh(f"{out}__finite_branch"), [], [_typed(else_out, dtype)])
        nodes += [
            helper.make_node("ReduceSum", [grad], [total], keepdims=0, name=fresh(f"{out}__reducesum")),
            helper.make_node("Sub", [total, total], [spread], name=fresh(f"{out}__sub")),
            helper.make_node("IsNaN", [spread], [bad], name=fresh(f"{out}__isnan")),
            helper.make_node(
                "If", [bad], [out], name=fresh(f"{out}__if"), then_branch=then_branch, else_branch=else_branch
            ),
        ]
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return replaced


def _typed(name: str, dtype: int) -> onnx.ValueInfoProto:
    """A subgraph output of element type ``dtype`` and any shape."""
    return helper.make_tensor_value_info(name, dtype, None)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The tensors ``graph`` defines as constants: initializers and ``Constant`` nodes' values."""
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        attrs = node.attribute
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and [a.name for a in attrs] == ["value"]:
            found[node.output[0]] = attrs[0].t
    return found


def merge_slices(proto: onnx.ModelProto) -> int:
    """``Slice(Slice(x))`` over disjoint axes, every bound a constant, as one ``Slice(x)``; the inner
    Slice goes once nothing reads it. Returns how many Slices were merged.

    onnxruntime copies a Slice's result, so two Slices copy twice: the exporter slices one axis per
    node (a conv weight gradient's tap windows are a row Slice, then a column Slice of it).
    """
    graph = proto.graph
    consts = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}

    def ints(name: str) -> list[int] | None:
        tensor = consts.get(name)
        if tensor is None or tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]

    def bounds(node: onnx.NodeProto) -> list[list[int]] | None:
        """(starts, ends, axes, steps) of a Slice with constant, non-negative axes."""
        if node.op_type != "Slice" or node.domain not in STANDARD_DOMAINS or not 3 <= len(node.input) <= 5:
            return None
        names = [*node.input[1:], "", ""][:4]
        got = [ints(n) if n else None for n in names]
        starts, ends, axes, steps = got
        if starts is None or ends is None or any(n and v is None for n, v in zip(names, got, strict=True)):
            return None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        if min(axes, default=0) < 0 or not len(starts) == len(ends) == len(axes) == len(steps):
            return None
        return [starts, ends, axes, steps]

    taken = {name for node in iter_nodes(graph) for name in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer}
    merged = 0
    for node in graph.node:
        outer = bounds(node)
        inner_node = producer.get(node.input[0])
        inner = bounds(inner_node) if inner_node is not None and outer is not None else None
        if outer is None or inner is None or set(outer[2]) & set(inner[2]):
            continue
        names = []
        for part, a, b in zip(("starts", "ends", "axes", "steps"), inner, outer, strict=True):
            name, k = f"{node.output[0]}__{part}", 0
            while name in taken:
                k += 1
                name = f"{node.output[0]}__{part}_{k}"
            taken.add(name)
            consts[name] = helper.make_tensor(name, onnx.TensorProto.INT64, [len(a + b)], a + b)
            graph.initializer.append(consts[name])
            names.append(name)
        node.input[:] = [inner_node.input[0], *names]
        merged += 1
    if merged:  # the inner Slices nothing reads any more, and their bounds
        used = {o.name for o in graph.output} | {i for n in iter_nodes(graph) for i in n.input}
        dead = [n for n in graph.node if n.op_type == "Slice" and not any(o in used for o in n.output)]
        kept = [n for n in graph.node if not any(n is d for d in dead)]
        del graph.node[:]
        graph.node.extend(kept)
        used = {o.name for o in graph.output} | {i for n in iter_nodes(graph) for i in n.input}
        bounds_of_dead = {i for n in dead for i in n.input[1:]} - used
        kept_tensors = [t for t in graph.initializer if t.name not in bounds_of_dead]
        del graph.initializer[:]
        graph.initializer.extend(kept_tensors)
    return merged


# The passes above that change what a training graph computes, with their helpers: their code is part of
# the training export's cache key (training.graph_export.translations_source).
GRAPH_PASSES = (guard_zero_selects, _zero_scalars, _typed, merge_slices, _constants)
