"""ONNX passes the training export runs after ``torch.onnx.export`` (:mod:`.graph_export`): graphs that
compute the same values in fewer or cheaper onnxruntime kernels (guarded mask multiplies for zero selects,
merged Slices, Transposes read by Gemm). Main graph only; each returns how many places it changed.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import onnx
from onnx import helper, numpy_helper

from planwire.exporter.onnx_passes import STANDARD_DOMAINS, iter_nodes

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
    fresh = _namer(graph)
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


def _namer(graph: onnx.GraphProto) -> Callable[[str], str]:
    """A function giving names ``graph`` does not use yet (``base``, else ``base_1``, ``base_2``, ...)."""
    taken = {name for node in iter_nodes(graph) for name in (*node.input, *node.output, node.name)}
    taken |= {v.name for v in [*graph.input, *graph.output, *graph.initializer, *graph.value_info]}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh


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

    fresh = _namer(graph)
    merged = 0
    for node in graph.node:
        outer = bounds(node)
        inner_node = producer.get(node.input[0])
        inner = bounds(inner_node) if inner_node is not None and outer is not None else None
        if outer is None or inner is None or set(outer[2]) & set(inner[2]):
            continue
        names = []
        for part, a, b in zip(("starts", "ends", "axes", "steps"), inner, outer, strict=True):
            name = fresh(f"{node.output[0]}__{part}")
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


def transposes_into_gemm(proto: onnx.ModelProto) -> int:
    """``MatMul(Transpose(a), b)`` of 2-d floats (either side, ``perm=[1, 0]``, the Transpose read only
    there) as one ``Gemm(a, b, transA=1)`` (``transB``); returns how many MatMuls became Gemms.

    Linear layers' weight gradients are ``mm(permute(g), x)``: onnxruntime fuses a MatMul with the Add
    that follows it (Adam's weight decay) into a Gemm before it folds Transposes into products, so the
    Transpose stays, a copy of the whole activation (the LM's step: 9 of the 25 Transposes left after
    onnxruntime's own fusions, half their time). Gemm reads ``a`` transposed where it lies.
    """
    graph = proto.graph
    info = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {out: node for node in graph.node for out in node.output}
    reads = collections.Counter(name for node in iter_nodes(graph) for name in node.input)
    reads.update(o.name for o in graph.output)

    def transposed(name: str) -> str | None:
        node = producer.get(name)
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"] if node is not None else None
        ok = node is not None and node.op_type == "Transpose" and node.domain in STANDARD_DOMAINS
        return node.input[0] if ok and perm == [[1, 0]] and reads[name] == 1 else None

    def two_d_float(name: str) -> bool:
        t = info.get(name)
        return t is not None and t.elem_type in _FLOAT_TYPES and t.HasField("shape") and len(t.shape.dim) == 2

    folded, dropped = 0, set()
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in STANDARD_DOMAINS or not all(map(two_d_float, node.input)):
            continue
        sources = [transposed(name) for name in node.input]
        if sources == [None, None] or not two_d_float(node.output[0]):
            continue
        dropped |= {name for name, s in zip(node.input, sources, strict=True) if s}
        inputs = [s or name for name, s in zip(node.input, sources, strict=True)]
        gemm = helper.make_node("Gemm", inputs, list(node.output), name=node.name, transA=int(bool(sources[0])))
        gemm.attribute.append(helper.make_attribute("transB", int(bool(sources[1]))))
        graph.node[i].CopyFrom(gemm)
        folded += 1
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in dropped)]
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def leading_sums_as_products(proto: onnx.ModelProto) -> int:
    """``ReduceSum`` of a float32 tensor over its leading axes (the trailing ones of known size) as a
    product ``ones(R) @ x.reshape(R, K)``; returns how many ReduceSums became products.

    Bias and LayerNorm gradients sum a (batch x tokens, features) gradient over its rows. onnxruntime's
    ReduceSum splits such a sum by columns across its threads in slivers that each walk every row: at 2
    intra-op threads one over (512, 256) took 240 µs of CPU against 32 µs at 1 thread (the LM's step:
    2.2 ms of ReduceSum at 2 threads, 0.5 ms at 1). MLAS's product takes the same time at 1 thread and
    stays near it at 2. ``R`` follows the batch, so the ones are made from the input's shape each run,
    once for the sums whose leading sizes the export names alike, unless made downstream of a subgraph (an If):
    the worker's estimate of a plan's work cannot see a shape through one, and would miss every product sharing
    them (in a training step that is every gradient below the loss's guard: each sum has its own ones then).
    """
    graph = proto.graph
    info = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    consts = _constants(graph)
    fresh = _namer(graph)

    def int64s(values: list[int]) -> str:
        name = fresh("leading_sum_shape")
        graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values))
        return name

    one = helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])
    made: dict[tuple, str] = {}  # leading sizes -> their ones vector
    # values downstream of a subgraph (guard_zero_selects' If): their shapes transport/shapes.py cannot infer
    unseen: set[str] = set()
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute) or any(
            i in unseen for i in node.input
        ):
            unseen.update(node.output)
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        t = info.get(node.input[0]) if node.input else None
        axes = consts.get(node.input[1]) if len(node.input) == 2 else None
        ok = (
            node.op_type == "ReduceSum"
            and node.domain in STANDARD_DOMAINS
            and set(attrs) <= {"keepdims", "noop_with_empty_axes"}
        )
        if not ok or t is None or axes is None or t.elem_type != onnx.TensorProto.FLOAT or not t.HasField("shape"):
            nodes.append(node)
            continue
        rank = len(t.shape.dim)
        given = [int(a) for a in numpy_helper.to_array(axes).reshape(-1)]
        lead = sorted(a % rank for a in given) if all(-rank <= a < rank for a in given) else []
        trailing = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim[len(lead) :]]
        if not lead or lead != list(range(len(lead))) or not trailing or not all(trailing):
            nodes.append(node)
            continue
        out, x = node.output[0], node.input[0]
        k = math.prod(trailing)
        if rank > 2:
            flat = fresh(f"{out}__flat")
            nodes.append(helper.make_node("Reshape", [x, int64s([-1, k])], [flat], name=fresh(f"{out}__flatten")))
            x = flat
        # a wrong size name fails the MatMul's shape check, never a sum
        sizes = tuple(d.dim_param or d.dim_value for d in t.shape.dim[: len(lead)])
        ones = made.get(sizes) if all(sizes) else None
        if ones is None:
            ones, rows = fresh(f"{out}__ones"), fresh(f"{out}__rows")
            if node.input[0] not in unseen:
                made[sizes] = ones
            nodes += [
                helper.make_node("Shape", [x], [rows], name=fresh(f"{out}__shape"), end=1),
                helper.make_node("ConstantOfShape", [rows], [ones], name=fresh(f"{out}__fill"), value=one),
            ]
        keep = attrs.get("keepdims", 1)
        shape = [1] * len(lead) + trailing if keep else trailing
        product = fresh(f"{out}__product") if shape != [k] else out
        nodes.append(helper.make_node("MatMul", [ones, x], [product], name=node.name or fresh(out)))
        if shape != [k]:
            nodes.append(helper.make_node("Reshape", [product, int64s(shape)], [out], name=fresh(f"{out}__unflatten")))
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return replaced


# The passes above that change what a training graph computes, with their helpers: their code is part of
# the training export's cache key (training.graph_export.translations_source).
GRAPH_PASSES = (
    guard_zero_selects,
    _zero_scalars,
    _namer,
    _typed,
    merge_slices,
    _constants,
    transposes_into_gemm,
    leading_sums_as_products,
)
