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

import ast
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from planwire.transport import protowire as pw

# ONNX TensorProto.DataType -> (wire name, bytes per element)
ELEM_TYPES: dict[int, tuple[str, int]] = {
    1: ("float", 4),
    2: ("uint8", 1),
    3: ("int8", 1),
    4: ("uint16", 2),
    5: ("int16", 2),
    6: ("int32", 4),
    7: ("int64", 8),
    8: ("string", 8),
    9: ("bool", 1),
    10: ("float16", 2),
    11: ("double", 8),
    12: ("uint32", 4),
    13: ("uint64", 8),
    14: ("complex64", 8),
    15: ("complex128", 16),
    16: ("bfloat16", 2),
}
_INT64, _BOOL, _FLOAT = 7, 9, 1
_RAW = {1: "<f", 2: "B", 3: "b", 4: "<H", 5: "<h", 6: "<i", 7: "<q", 9: "?", 11: "<d", 12: "<I", 13: "<Q"}
_SMALL = 64  # elements of a constant tensor whose values are read (shape arithmetic), never its weights

Dims = tuple[int, ...]
Declared = tuple[int | str | None, ...]


# --- reading the graph -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """An initializer or a constant attribute: element type, dims, and the values of small ones."""

    elem: int
    dims: Dims
    values: tuple | None = None


@dataclass(frozen=True)
class ValueType:
    """A declared tensor type: element type, dims (int, symbol, or None), None for an unknown rank."""

    elem: int
    dims: Declared | None


@dataclass(frozen=True)
class Node:
    op: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    subgraphs: bool


@dataclass(frozen=True)
class Graph:
    """The main graph of a plan as plain data: ports, declared types, initializers, nodes, metadata."""

    inputs: dict[str, ValueType]
    """Runtime inputs in order (graph inputs that are not initializers)."""
    outputs: dict[str, ValueType]
    declared: dict[str, ValueType]
    initializers: dict[str, Tensor]
    nodes: list[Node]
    metadata: dict[str, str]
    functions: frozenset[tuple[str, str]] = frozenset()


def read_graph(data: bytes | memoryview) -> Graph:
    """The :class:`Graph` of serialized ONNX ``data`` (ValueError if malformed)."""
    graph: memoryview | None = None
    metadata: dict[str, str] = {}
    functions: set[tuple[str, str]] = set()
    for num, v in pw.fields(data):
        if num == 7 and isinstance(v, memoryview):
            graph = v
        elif num == 14 and isinstance(v, memoryview):
            entry = dict(pw.fields(v))
            metadata[pw.text(entry.get(1, b""))] = pw.text(entry.get(2, b""))
        elif num == 25 and isinstance(v, memoryview):
            f = dict(pw.fields(v))  # FunctionProto: name 1, domain 10
            functions.add((pw.text(f.get(10, b"")), pw.text(f.get(1, b""))))
    if graph is None:
        raise ValueError("not an ONNX model: no graph")
    inputs: list[tuple[str, ValueType]] = []
    outputs: dict[str, ValueType] = {}
    declared: dict[str, ValueType] = {}
    initializers: dict[str, Tensor] = {}
    nodes: list[Node] = []
    for num, v in pw.fields(graph):
        if not isinstance(v, memoryview):
            continue
        if num == 1:
            nodes.append(_node(v))
        elif num == 5:
            name, tensor = _tensor(v)
            initializers[name] = tensor
        elif num in (11, 12, 13):
            name, vt = _value_info(v)
            declared[name] = vt
            if num == 11:
                inputs.append((name, vt))
            elif num == 12:
                outputs[name] = vt
    runtime_inputs = {n: t for n, t in inputs if n not in initializers}
    return Graph(runtime_inputs, outputs, declared, initializers, nodes, metadata, frozenset(functions))


def _tensor(buf: memoryview) -> tuple[str, Tensor]:
    name, elem, dims = "", _FLOAT, []
    raw: memoryview | None = None
    listed: list = []
    for num, v in pw.fields(buf):
        if num == 1:
            dims += pw.ints(v)
        elif num == 2 and isinstance(v, int):
            elem = v
        elif num == 8:
            name = pw.text(v)
        elif num == 9 and isinstance(v, memoryview):
            raw = v
        elif num == 4:
            listed += pw.floats(v)
        elif num in (5, 7):
            listed += pw.ints(v)
        elif num == 10:
            listed += [struct.unpack("<d", x.to_bytes(8, "little"))[0] for x in _fixed64(v)]
    count = math.prod(dims)
    values: tuple | None = None
    if count <= _SMALL:
        if raw is not None and elem in _RAW:
            fmt = _RAW[elem]
            size = struct.calcsize(fmt)
            if len(raw) == size * count:
                values = tuple(v for (v,) in struct.iter_unpack(fmt, raw))
        elif len(listed) == count:
            values = tuple(listed)
    return name, Tensor(elem, tuple(dims), values)


def _fixed64(v: int | memoryview) -> list[int]:
    if isinstance(v, int):
        return [v]
    return [int.from_bytes(v[i : i + 8], "little") for i in range(0, len(v) - 7, 8)]


def _value_info(buf: memoryview) -> tuple[str, ValueType]:
    name, elem, dims = "", 0, None
    for num, v in pw.fields(buf):
        if num == 1:
            name = pw.text(v)
        elif num == 2 and isinstance(v, memoryview):
            for tnum, tv in pw.fields(v):
                if tnum == 1 and isinstance(tv, memoryview):  # tensor_type
                    for knum, kv in pw.fields(tv):
                        if knum == 1 and isinstance(kv, int):
                            elem = kv
                        elif knum == 2 and isinstance(kv, memoryview):
                            dims = tuple(_dim(d) for n, d in pw.fields(kv) if n == 1 and isinstance(d, memoryview))
    return name, ValueType(elem, dims)


def _dim(buf: memoryview) -> int | str | None:
    for num, v in pw.fields(buf):
        if num == 1 and isinstance(v, int):
            return pw.signed(v)
        if num == 2:
            return pw.text(v) or None
    return None


def _node(buf: memoryview) -> Node:
    ins: list[str] = []
    outs: list[str] = []
    op = domain = ""
    attrs: dict[str, Any] = {}
    sub = False
    for num, v in pw.fields(buf):
        if num == 1:
            ins.append(pw.text(v))
        elif num == 2:
            outs.append(pw.text(v))
        elif num == 4:
            op = pw.text(v)
        elif num == 7:
            domain = pw.text(v)
        elif num == 5 and isinstance(v, memoryview):
            name, value, has_graph = _attribute(v)
            attrs[name] = value
            sub = sub or has_graph
    return Node(op, "" if domain == "ai.onnx" else domain, tuple(ins), tuple(outs), attrs, sub)


def _attribute(buf: memoryview) -> tuple[str, Any, bool]:
    name = ""
    value: Any = None
    listed: list = []
    has_graph = False
    for num, v in pw.fields(buf):
        if num == 1:
            name = pw.text(v)
        elif num == 2 and isinstance(v, int):
            value = pw.floats(v)[0]
        elif num == 3 and isinstance(v, int):
            value = pw.signed(v)
        elif num == 4:
            value = pw.text(v)
        elif num == 5 and isinstance(v, memoryview):
            value = _tensor(v)[1]
        elif num in (6, 11):
            has_graph = True
        elif num == 7:
            listed += pw.floats(v)
        elif num == 8:
            listed += pw.ints(v)
    if value is None and listed:
        value = listed
    return name, value, has_graph


# --- shapes ----------------------------------------------------------------------------------------------


@dataclass
class _Info:
    elem: int
    shape: Dims | None
    values: tuple | None = None


def _eval_dim(d: int | str | None, env: Mapping[str, int]) -> int | None:
    """A declared dim with its symbols bound: an int, a known symbol, or an arithmetic expression of them
    (torch.export writes dims such as ``2*s0``); None when unknown."""
    if isinstance(d, int):
        return d if d >= 0 else None
    if not d:
        return None
    if d in env:
        return env[d]
    if len(d) > 200:
        return None
    try:
        tree = ast.parse(d, mode="eval")
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id in env:
            return env[n.id]
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if type(n.op) in ops:
                return ops[type(n.op)]
            if isinstance(n.op, (ast.FloorDiv, ast.Div)) and b:
                return a // b
            if isinstance(n.op, ast.Mod) and b:
                return a % b
        raise ValueError(d)

    try:
        value = ev(tree)
    except (ValueError, RecursionError):
        return None
    return value if value >= 0 else None


def _bind(declared: Declared | None, env: Mapping[str, int]) -> Dims | None:
    if declared is None:
        return None
    dims = [_eval_dim(d, env) for d in declared]
    return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[misc]


def _broadcast(*shapes: Dims | None) -> Dims | None:
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes if s is not None), default=0)
    out = []
    for i in range(rank):
        seen = {s[i - rank + len(s)] for s in shapes if s is not None and i - rank + len(s) >= 0} - {1}
        if len(seen) > 1:
            return None
        out.append(seen.pop() if seen else 1)
    return tuple(out)


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _pool_dims(spatial: Sequence[int], kernel: Sequence[int], attrs: Mapping[str, Any]) -> list[int]:
    n = len(spatial)
    strides = attrs.get("strides") or [1] * n
    dil = attrs.get("dilations") or [1] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    auto = attrs.get("auto_pad") or "NOTSET"
    ceil = bool(attrs.get("ceil_mode", 0))
    out = []
    for i in range(n):
        eff = dil[i] * (kernel[i] - 1) + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
        else:
            total = spatial[i] - eff + (0 if auto == "VALID" else pads[i] + pads[i + n])
            out.append((-(-total // strides[i]) if ceil else total // strides[i]) + 1)
    return out


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_UNARY = _names(
    "Abs Acos Acosh Asin Asinh Atan Atanh Ceil Celu Cos Cosh Elu Erf Exp Floor Gelu HardSigmoid HardSwish "
    "Hardmax LeakyRelu Log LogSoftmax Mish Neg Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh "
    "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Clip Identity Dropout CumSum "
    "BatchNormalization LayerNormalization InstanceNormalization GroupNormalization LpNormalization "
    "MeanVarianceNormalization LRN Trilu"
)
_LOGIC = _names("Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Not IsNaN IsInf")
_BINARY = _names("Add Sub Mul Div Pow Max Min Sum Mean Mod PRelu BitShift Where") | _LOGIC
_REDUCE = _names(
    "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare"
)


def _values_binary(op: str, a: tuple, b: tuple) -> tuple | None:
    if not (len(a) == len(b) or len(a) == 1 or len(b) == 1) or not a or not b:
        return None
    n = max(len(a), len(b))
    a = a * n if len(a) == 1 else a
    b = b * n if len(b) == 1 else b
    fn = {
        "Add": lambda x, y: x + y,
        "Sub": lambda x, y: x - y,
        "Mul": lambda x, y: x * y,
        "Div": lambda x, y: (int(x / y) if isinstance(x, int) and isinstance(y, int) else x / y) if y else None,
        "Max": max,
        "Min": min,
        "Equal": lambda x, y: x == y,
    }.get(op)
    if fn is None:
        return None
    out = tuple(fn(x, y) for x, y in zip(a, b, strict=True))
    return None if any(v is None for v in out) else out


def _infer(node: Node, ins: list[_Info | None], functions: frozenset) -> list[_Info] | None:
    """Output infos of ``node`` from its input infos, or None where no rule applies."""
    op, at = node.op, node.attrs
    if node.domain or (node.domain, op) in functions:
        return None
    x = ins[0] if ins else None
    xs = x.shape if x else None
    elem = x.elem if x else _FLOAT

    def same(shape: Dims | None, e: int = elem, values: tuple | None = None) -> list[_Info]:
        return [_Info(e, shape, values)]

    def vals(i: int) -> tuple | None:
        return ins[i].values if i < len(ins) and ins[i] is not None else None  # type: ignore[union-attr]

    if op == "Constant":
        t = at.get("value")
        if isinstance(t, Tensor):
            return same(t.dims, t.elem, t.values)
        for key, e in (("value_int", _INT64), ("value_float", _FLOAT)):
            if key in at:
                return same((), e, (at[key],))
        for key, e in (("value_ints", _INT64), ("value_floats", _FLOAT)):
            if key in at:
                return same((len(at[key]),), e, tuple(at[key]))
        return None
    if op in _UNARY or op == "Cast":
        e = int(at.get("to", elem)) if op == "Cast" else elem
        out = same(xs, e, x.values if x and op in ("Identity", "Cast") else None)
        if op == "Dropout" and len(node.outputs) > 1:
            out.append(_Info(_BOOL, xs))
        return out  # other outputs (a normalization's saved statistics): their declared shapes
    if op in _BINARY:
        shape = _broadcast(*(i.shape if i else None for i in ins))
        e = _BOOL if op in _LOGIC else (ins[1].elem if op == "Where" and ins[1] else elem)
        values = None
        if len(ins) == 2 and vals(0) is not None and vals(1) is not None:
            values = _values_binary(op, vals(0), vals(1))  # type: ignore[arg-type]
        return same(shape, e, values)
    if xs is None and op not in ("ConstantOfShape", "Range"):
        return None
    rank = len(xs) if xs is not None else 0
    if op == "Shape":
        start, end = at.get("start", 0), at.get("end", rank)
        s = tuple(xs[slice(start, end)])  # type: ignore[index]
        return same((len(s),), _INT64, s)
    if op == "Size":
        return same((), _INT64, (math.prod(xs),))  # type: ignore[arg-type]
    if op in ("MatMul", "MatMulInteger"):
        b = ins[1].shape if ins[1] else None
        if b is None:
            return None
        a2, b2 = (1, *xs) if rank == 1 else xs, (*b, 1) if len(b) == 1 else b  # type: ignore[misc]
        if a2[-1] != b2[-2]:
            return None
        batch = _broadcast(tuple(a2[:-2]), tuple(b2[:-2]))
        if batch is None:
            return None
        out = (*batch, *(() if rank == 1 else (a2[-2],)), *(() if len(b) == 1 else (b2[-1],)))
        return same(out, _INT64 if op == "MatMulInteger" else elem)
    if op == "Gemm":
        b = ins[1].shape if ins[1] else None
        if b is None or rank != 2 or len(b) != 2:
            return None
        m = xs[1] if at.get("transA") else xs[0]  # type: ignore[index]
        n = b[0] if at.get("transB") else b[1]
        return same((m, n))
    if op in ("Conv", "ConvInteger"):
        w = ins[1].shape if ins[1] else None
        if w is None or rank < 3:
            return None
        kernel = at.get("kernel_shape") or list(w[2:])
        return same((xs[0], w[0], *_pool_dims(xs[2:], kernel, at)))  # type: ignore[index]
    if op == "ConvTranspose":
        w = ins[1].shape if ins[1] else None
        if w is None or rank < 3:
            return None
        n = rank - 2
        kernel = at.get("kernel_shape") or list(w[2:])
        if at.get("output_shape"):
            spatial = list(at["output_shape"])
        else:
            st, dil = at.get("strides") or [1] * n, at.get("dilations") or [1] * n
            pads, opad = at.get("pads") or [0] * (2 * n), at.get("output_padding") or [0] * n
            spatial = [
                st[i] * (xs[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 - pads[i] - pads[i + n]  # type: ignore[index]
                for i in range(n)
            ]
        return same((xs[0], w[1] * int(at.get("group", 1)), *spatial))  # type: ignore[index]
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = at.get("kernel_shape")
        if not kernel:
            return None
        shape = (xs[0], xs[1], *_pool_dims(xs[2:], kernel, at))  # type: ignore[index]
        return [_Info(elem, shape), _Info(_INT64, shape)][: max(1, len(node.outputs))]
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        return same((*xs[:2], *([1] * (rank - 2))))  # type: ignore[index]
    if op in _REDUCE or op in ("ArgMax", "ArgMin"):
        if op in ("ArgMax", "ArgMin"):
            axes = [int(at.get("axis", 0))]
        else:
            axes = at.get("axes") if "axes" in at else (list(vals(1)) if vals(1) is not None else None)  # type: ignore[arg-type]
            if axes is None and len(ins) > 1 and ins[1] is not None and node.inputs[1]:
                return None
            if not axes:
                axes = [] if at.get("noop_with_empty_axes") else list(range(rank))
        axes = {_axis(int(a), rank) for a in axes}
        keep = at.get("keepdims", 1)
        shape = tuple(1 if i in axes else d for i, d in enumerate(xs) if keep or i not in axes)  # type: ignore[arg-type]
        return same(shape, _INT64 if op.startswith("Arg") else elem)
    if op == "Reshape":
        target = vals(1)
        if target is None:
            return None
        out = [
            (xs[i] if d == 0 and not at.get("allowzero") and i < rank else int(d))  # type: ignore[index]
            for i, d in enumerate(target)
        ]
        if out.count(-1) == 1:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(xs) // known if known else 0  # type: ignore[arg-type]
        return same(tuple(out), elem, x.values if x else None)
    if op == "Flatten":
        a = _axis(int(at.get("axis", 1)), rank)
        return same((math.prod(xs[:a]), math.prod(xs[a:])))  # type: ignore[index]
    if op == "Transpose":
        perm = at.get("perm") or list(range(rank))[::-1]
        return same(tuple(xs[p] for p in perm))  # type: ignore[index]
    if op in ("Squeeze", "Unsqueeze"):
        axes = at.get("axes") if "axes" in at else (list(vals(1)) if vals(1) is not None else None)  # type: ignore[arg-type]
        if op == "Squeeze":
            if axes is None and len(node.inputs) > 1 and node.inputs[1]:
                return None
            drop = {_axis(int(a), rank) for a in axes} if axes else {i for i, d in enumerate(xs) if d == 1}  # type: ignore[arg-type]
            return same(tuple(d for i, d in enumerate(xs) if i not in drop), elem, x.values if x else None)  # type: ignore[arg-type]
        if axes is None:
            return None
        out_rank = rank + len(axes)
        add = {_axis(int(a), out_rank) for a in axes}
        it = iter(xs)  # type: ignore[arg-type]
        return same(tuple(1 if i in add else next(it) for i in range(out_rank)), elem, x.values if x else None)
    if op == "Concat":
        if any(i is None or i.shape is None for i in ins):
            return None
        a = _axis(int(at.get("axis", 0)), rank)
        shape = list(xs)  # type: ignore[arg-type]
        shape[a] = sum(i.shape[a] for i in ins)  # type: ignore[union-attr,index]
        values = None
        if all(i.values is not None for i in ins) and rank == 1:  # type: ignore[union-attr]
            values = tuple(v for i in ins for v in i.values)  # type: ignore[union-attr]
        return same(tuple(shape), elem, values)
    if op == "Gather":
        idx = ins[1] if len(ins) > 1 else None
        if idx is None or idx.shape is None:
            return None
        a = _axis(int(at.get("axis", 0)), rank)
        shape = (*xs[:a], *idx.shape, *xs[a + 1 :])  # type: ignore[index]
        values = None
        if x and x.values is not None and idx.values is not None and rank == 1:
            try:
                values = tuple(x.values[int(i)] for i in idx.values)
            except IndexError:
                values = None
        return same(shape, elem, values)
    if op == "Slice":
        starts, ends = vals(1), vals(2)
        if starts is None or ends is None:
            return None
        axes = vals(3) if len(node.inputs) > 3 and node.inputs[3] else tuple(range(len(starts)))
        steps = vals(4) if len(node.inputs) > 4 and node.inputs[4] else (1,) * len(starts)
        if axes is None or steps is None:
            return None
        shape = list(xs)  # type: ignore[arg-type]
        slices = [slice(None)] * rank
        for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
            a = _axis(int(a), rank)
            sl = slice(int(s), int(e), int(st))
            slices[a] = sl
            shape[a] = len(range(*sl.indices(xs[a])))  # type: ignore[index]
        values = tuple(x.values[slices[0]]) if x and x.values is not None and rank == 1 else None
        return same(tuple(shape), elem, values)
    if op == "Expand":
        target = vals(1)
        return same(_broadcast(xs, tuple(int(v) for v in target))) if target is not None else None
    if op == "Tile":
        reps = vals(1)
        return same(tuple(d * int(r) for d, r in zip(xs, reps, strict=True))) if reps is not None else None  # type: ignore[arg-type]
    if op == "ConstantOfShape":
        target = vals(0)
        t = at.get("value")
        return same(tuple(int(v) for v in target), t.elem if isinstance(t, Tensor) else _FLOAT) if target else None
    if op == "Range":
        s, lim, d = vals(0), vals(1), vals(2)
        if not (s and lim and d) or not d[0]:
            return None
        return same((max(math.ceil((lim[0] - s[0]) / d[0]), 0),))
    return None


def _sane(info: _Info) -> _Info:
    """An inferred value as kept: no negative dims (a hostile Reshape), values only of small tensors (a chain
    of Concats must not grow them without bound)."""
    shape = info.shape if info.shape is None or all(d >= 0 for d in info.shape) else None
    values = info.values if info.values is not None and len(info.values) <= _SMALL and shape is not None else None
    return _Info(info.elem, shape, values)


# --- FLOPs and memory ----------------------------------------------------------------------------------

_MOVE = _names(
    "Reshape Transpose Gather GatherElements GatherND Slice Concat Split Squeeze Unsqueeze Flatten Identity "
    "Cast CastLike Shape Size Constant ConstantOfShape Expand Tile Pad Dropout ScatterElements ScatterND "
    "Range DepthToSpace SpaceToDepth MaxUnpool Compress NonZero OneHot EyeLike Optional OptionalGetElement "
    "OptionalHasElement SequenceConstruct SequenceAt SplitToSequence ConcatFromSequence Unique TopK"
)
_PER_ELEMENT = {"Softmax": 3, "LogSoftmax": 3, "Hardmax": 1}
_NORM = _names(
    "BatchNormalization LayerNormalization InstanceNormalization GroupNormalization LpNormalization "
    "MeanVarianceNormalization LRN"
)
_KNOWN_ELEMENTWISE = (_UNARY | _BINARY) - _MOVE - _NORM
_CONTROL = frozenset({"If", "Loop", "Scan"})


def _flops(node: Node, ins: list[_Info | None], outs: list[_Info]) -> int | None:
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
    if op in _REDUCE or op in ("ArgMax", "ArgMin") or op.startswith("Global"):
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


def estimate(g: Graph, shapes: Mapping[str, Dims | None]) -> Estimate:
    """FLOPs and peak memory of ``g`` on inputs of ``shapes`` (from :func:`input_shapes`)."""
    env: dict[str, int] = {}
    for name, vt in g.inputs.items():
        given = shapes.get(name)
        if given is not None and vt.dims is not None:
            for d, n in zip(vt.dims, given, strict=False):
                if isinstance(d, str) and d:
                    env.setdefault(d, n)
    info: dict[str, _Info] = {}
    for name, t in g.initializers.items():
        info[name] = _Info(t.elem, t.dims, t.values)
    for name, vt in g.inputs.items():
        info[name] = _Info(vt.elem, shapes.get(name))

    def nbytes(i: _Info | None) -> int | None:
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
    for i, node in enumerate(g.nodes):
        ins = [info.get(n) if n else None for n in node.inputs]
        try:
            inferred = _infer(node, ins, g.functions)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError, StopIteration):
            inferred = None
        outs: list[_Info] = []
        for k, name in enumerate(node.outputs):
            got = _sane(inferred[k]) if inferred and k < len(inferred) else None
            decl = g.declared.get(name)
            shape = got.shape if got and got.shape is not None else _bind(decl.dims if decl else None, env)
            elem = (decl.elem if decl and decl.elem else None) or (got.elem if got else None)
            elem = elem or (ins[0].elem if ins and ins[0] else _FLOAT)
            outs.append(_Info(elem, shape, got.values if got and got.shape == shape else None))
            if name:
                info[name] = outs[-1]
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
    | _REDUCE
    | _NORM
    | {"ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
