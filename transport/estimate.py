"""What a plan costs at given input sizes, estimated from its bytes alone: FLOPs and peak memory.

For the review an approver reads (transport/review.py), on the worker and on the exporter side alike: no
``onnx`` package, no onnxruntime session, nothing run. The convention, stated in every review:

* **FLOPs.** MatMul, Gemm, Conv, ConvTranspose: 2 per multiply-accumulate, plus 1 per output element for
  a bias (Gemm's ``C``, Conv's ``B``): a Linear(IN, OUT) on B rows is ``2*B*IN*OUT + B*OUT``. Elementwise
  ops (Add, Relu, Exp, Where, ...): 1 per output element; Softmax/LogSoftmax 3, normalizations 5.
  Reductions: 1 per element read; pooling: 1 per output element per kernel element. Data movement
  (Reshape, Transpose, Gather, Slice, Concat, Cast, Shape, ...): 0. Ops this table lacks: 1 per output
  element, and the review names them. The bodies of If/Loop/Scan and calls of plan-local functions are
  not counted, and named.
* **Peak memory.** Initializers and inputs (resident for the whole run) plus the most bytes of
  intermediate values alive at once when the nodes run in the plan's order: a value lives from the node
  that makes it to the last node that reads it, the plan's outputs to the end. onnxruntime's fusions,
  in-place reuse, arena rounding and kernel workspaces are not modelled.
* **Shapes** are inferred by rules for the common ops from the given input shapes (following small
  integer tensors such as a Reshape's target through Shape/Gather/Concat/...); where a rule is missing the
  shape the plan declares (``value_info``, its symbolic axes bound from the inputs) is used. A value whose
  size stays unknown counts 0 and the review says how many there were: the estimate is then a lower bound.

The plan has been checked by transport/plancheck.py before this reads it (bounded nesting and sizes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from planwire.transport.dims import bind
from planwire.transport.graph import ELEM_TYPES, FLOAT, Declared, Dims, Graph, Node
from planwire.transport.shapes import BINARY, REDUCE, UNARY, Info, infer, names, sane

# --- FLOPs and memory ----------------------------------------------------------------------------------

_MOVE = names(
    "Reshape Transpose Gather GatherElements GatherND Slice Concat Split Squeeze Unsqueeze Flatten Identity "
    "Cast CastLike Shape Size Constant ConstantOfShape Expand Tile Pad Dropout ScatterElements ScatterND "
    "Range DepthToSpace SpaceToDepth MaxUnpool Compress NonZero OneHot EyeLike Optional OptionalGetElement "
    "OptionalHasElement SequenceConstruct SequenceAt SplitToSequence ConcatFromSequence Unique TopK"
)
_PER_ELEMENT = {"Softmax": 3, "LogSoftmax": 3, "Hardmax": 1}
_NORM = names(
    "BatchNormalization LayerNormalization InstanceNormalization GroupNormalization LpNormalization "
    "MeanVarianceNormalization LRN"
)
_KNOWN_ELEMENTWISE = (UNARY | BINARY) - _MOVE - _NORM
_CONTROL = frozenset({"If", "Loop", "Scan"})


def _flops(node: Node, ins: list[Info | None], outs: list[Info]) -> int | None:
    """FLOPs of one node by the module's convention; None when a shape it needs is unknown."""
    op, at = node.op, node.attrs
    if op in _MOVE:
        return 0
    out = outs[0].shape if outs else None
    if out is None:
        return None
    n_out = math.prod(out)
    x = ins[0].shape if ins and ins[0] else None
    if op in ("MatMul", "MatMulInteger"):
        if x is None:
            return None
        return 2 * n_out * x[-1]
    if op == "Gemm":
        if x is None:
            return None
        k = x[0] if at.get("transA") else x[1]
        return 2 * n_out * k + (n_out if len(node.inputs) > 2 and node.inputs[2] else 0)
    if op in ("Conv", "ConvInteger", "ConvTranspose"):
        w = ins[1].shape if len(ins) > 1 and ins[1] else None
        if w is None or x is None:
            return None
        bias = n_out if op != "ConvInteger" and len(node.inputs) > 2 and node.inputs[2] else 0
        if op == "ConvTranspose":  # every input element meets C_out/group * kernel weights
            return 2 * math.prod(x) * math.prod(w[1:]) + bias
        return 2 * n_out * math.prod(w[1:]) + bias  # W is [C_out, C_in/group, *kernel]
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return n_out * math.prod(at.get("kernel_shape") or [1])
    if op in REDUCE or op in ("ArgMax", "ArgMin") or op.startswith("Global"):
        return math.prod(x) if x is not None else None
    if op in _NORM:
        return 5 * n_out
    return _PER_ELEMENT.get(op, 1) * n_out


@dataclass(frozen=True)
class Estimate:
    """FLOPs and peak memory of one run at ``shapes`` (see the module docstring for what is counted)."""

    shapes: dict[str, Dims | None]
    """The input shapes it was computed for (None: unknown, the plan declares no rank)."""
    flops: int
    flops_by_op: dict[str, int]
    initializer_bytes: int
    input_bytes: int
    intermediate_peak_bytes: int
    """The most bytes of values made by nodes alive at once (the outputs included)."""
    output_bytes: int
    unknown_values: int
    """Values made by nodes whose size stayed unknown (counted 0)."""
    uncounted: dict[str, int] = field(default_factory=dict)
    """Nodes whose FLOPs are not counted, by op: control-flow bodies, local functions, unknown shapes."""
    by_element: dict[str, int] = field(default_factory=dict)
    """Nodes of ops the table lacks, counted 1 FLOP per output element."""

    @property
    def peak_bytes(self) -> int:
        return self.initializer_bytes + self.input_bytes + self.intermediate_peak_bytes


def input_shapes(g: Graph, shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1) -> dict:
    """Concrete shapes of the plan's inputs: ``shapes`` where given, the rest from the declared dims with
    every dynamic axis (a symbol not bound by a given shape, or an unnamed one) set to ``batch``.
    ValueError names an unknown input or a shape that does not fit the plan."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(g.inputs))
    if unknown:
        raise ValueError(f"no input named {unknown[0]!r}; the plan's inputs are {', '.join(g.inputs) or 'none'}")
    if batch < 0:
        raise ValueError(f"batch must be 0 or more, got {batch}")
    env: dict[str, int] = {}
    out: dict[str, Dims | None] = {}
    for name, given in shapes.items():
        dims = g.inputs[name].dims
        given = tuple(int(d) for d in given)
        if any(d < 0 for d in given):
            raise ValueError(f"input {name!r}: sizes must be 0 or more, got {list(given)}")
        if dims is not None:
            if len(dims) != len(given):
                raise ValueError(f"input {name!r} has rank {len(dims)} {_show(dims)}, got shape {list(given)}")
            for axis, (d, n) in enumerate(zip(dims, given, strict=True)):
                if isinstance(d, int) and d != n:
                    raise ValueError(f"input {name!r} axis {axis} is fixed at {d}, got shape {list(given)}")
                if isinstance(d, str) and d:
                    env.setdefault(d, n)
        out[name] = given
    for name, vt in g.inputs.items():
        if name in out:
            continue
        if vt.dims is None:
            out[name] = None
            continue
        out[name] = tuple(d if isinstance(d, int) and d >= 0 else env.get(d, batch) if d else batch for d in vt.dims)
    return {n: out[n] for n in g.inputs}


def _show(dims: Declared) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in dims) + "]"


def walk(g: Graph, shapes: Mapping[str, Dims | None]) -> Iterator[tuple[Node, list[Info | None], list[Info]]]:
    """Each node of ``g`` in order with what is known of its inputs and outputs, on inputs of ``shapes`` (from
    :func:`input_shapes`): shapes inferred by rule, else declared (symbolic axes bound from the inputs)."""
    env: dict[str, int] = {}
    for name, vt in g.inputs.items():
        given = shapes.get(name)
        if given is not None and vt.dims is not None:
            for d, n in zip(vt.dims, given, strict=False):
                if isinstance(d, str) and d:
                    env.setdefault(d, n)
    info: dict[str, Info] = {}
    for name, t in g.initializers.items():
        info[name] = Info(t.elem, t.dims, t.values)
    for name, vt in g.inputs.items():
        info[name] = Info(vt.elem, shapes.get(name))
    for node in g.nodes:
        ins = [info.get(n) if n else None for n in node.inputs]
        try:
            inferred = infer(node, ins, g.functions)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError, StopIteration):
            inferred = None
        outs: list[Info] = []
        for k, name in enumerate(node.outputs):
            got = sane(inferred[k]) if inferred and k < len(inferred) else None
            decl = g.declared.get(name)
            shape = got.shape if got and got.shape is not None else bind(decl.dims if decl else None, env)
            elem = (decl.elem if decl and decl.elem else None) or (got.elem if got else None)
            elem = elem or (ins[0].elem if ins and ins[0] else FLOAT)
            outs.append(Info(elem, shape, got.values if got and got.shape == shape else None))
            if name:
                info[name] = outs[-1]
        yield node, ins, outs


def estimate(g: Graph, shapes: Mapping[str, Dims | None]) -> Estimate:
    """FLOPs and peak memory of ``g`` on inputs of ``shapes`` (from :func:`input_shapes`)."""
    info = {n: Info(t.elem, t.dims) for n, t in g.initializers.items()}
    info.update((n, Info(vt.elem, shapes.get(n))) for n, vt in g.inputs.items())

    def nbytes(i: Info | None) -> int | None:
        if i is None or i.shape is None:
            return None
        return math.prod(i.shape) * ELEM_TYPES.get(i.elem, (None, 4))[1]

    flops: dict[str, int] = {}
    uncounted: dict[str, int] = {}
    by_element: dict[str, int] = {}
    produced: dict[str, int | None] = {}
    last_use: dict[str, int] = {}
    for i, node in enumerate(g.nodes):
        for name in node.inputs:
            last_use[name] = i
    for name in g.outputs:
        last_use[name] = len(g.nodes)
    live = peak = 0
    alive: dict[str, int] = {}
    for i, (node, ins, outs) in enumerate(walk(g, shapes)):
        info.update((name, o) for name, o in zip(node.outputs, outs, strict=True) if name)
        key = f"{node.domain}::{node.op}" if node.domain else node.op
        if node.subgraphs or node.op in _CONTROL or node.domain or (node.domain, node.op) in g.functions:
            uncounted[key] = uncounted.get(key, 0) + 1
        else:
            try:
                f = _flops(node, ins, outs)
            except (ValueError, TypeError, IndexError, OverflowError):
                f = None
            if f is None:
                uncounted[key] = uncounted.get(key, 0) + 1
            elif f:
                flops[key] = flops.get(key, 0) + f
                if node.op not in _KNOWN_ELEMENTWISE and node.op not in _COUNTED:
                    by_element[key] = by_element.get(key, 0) + 1
        for name, o in zip(node.outputs, outs, strict=True):
            if name and name not in alive:
                size = nbytes(o)
                produced[name] = size
                alive[name] = size or 0
                live += size or 0
        peak = max(peak, live)
        for name in {*node.inputs, *node.outputs}:
            if name in alive and last_use.get(name, i) <= i:
                live -= alive.pop(name)
    init_bytes = sum(nbytes(info[n]) or 0 for n in g.initializers)
    input_bytes = sum(nbytes(info[n]) or 0 for n in g.inputs)
    output_bytes = sum(nbytes(info.get(n)) or 0 for n in g.outputs)
    return Estimate(
        dict(shapes),
        sum(flops.values()),
        dict(sorted(flops.items(), key=lambda kv: -kv[1])),
        init_bytes,
        input_bytes,
        peak,
        output_bytes,
        sum(1 for v in produced.values() if v is None),
        uncounted,
        by_element,
    )


_COUNTED = frozenset(
    {"MatMul", "MatMulInteger", "Gemm", "Conv", "ConvInteger", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}
    | REDUCE
    | _NORM
    | {"ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
