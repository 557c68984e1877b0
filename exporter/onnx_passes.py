"""Walks over and passes on exported ONNX graphs (protobuf level), subgraphs included.

Every pass that looks at nodes or tensors goes through :func:`iter_graphs`/:func:`iter_nodes`/
:func:`iter_tensors`, so an op inside an ``If`` or ``Loop`` body is never missed (a random op in a
branch, a custom-domain op, an external tensor). The exporters (:mod:`..export` for plans,
:mod:`..training.graph_export` for traced graphs) call these after ``torch.onnx.export``; the passes
that make training graphs faster are :mod:`..training.graph_passes`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import onnx

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
