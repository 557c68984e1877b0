"""Shapes of a plan's values, inferred by rules for the common ONNX ops from the shapes of its inputs.

The rules go by op family (creation, elementwise, contraction and pooling, reduction, data movement), and
follow the values of small integer tensors (a Reshape's target through Shape/Gather/Concat/...), so that a
shape computed inside the graph is known. Where no rule applies the caller uses the shape the plan declares
(transport/dims.py evaluates its symbolic dims). Used by the cost estimate (transport/estimate.py); the plan
has been checked by transport/plancheck.py first, and what a hostile graph makes of a rule is cut down by
:func:`sane`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planwire.transport.graph import BOOL, FLOAT, INT64, SMALL, Dims, Node, Tensor


@dataclass
class Info:
    """What is known of a value: element type, shape (None: unknown) and, for a small one, its values."""

    elem: int
    shape: Dims | None
    values: tuple | None = None


def broadcast(*shapes: Dims | None) -> Dims | None:
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


def names(text: str) -> frozenset[str]:
    return frozenset(text.split())


UNARY = names(
    "Abs Acos Acosh Asin Asinh Atan Atanh Ceil Celu Cos Cosh Elu Erf Exp Floor Gelu HardSigmoid HardSwish "
    "Hardmax LeakyRelu Log LogSoftmax Mish Neg Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh "
    "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Clip Identity Dropout CumSum "
    "BatchNormalization LayerNormalization InstanceNormalization GroupNormalization LpNormalization "
    "MeanVarianceNormalization LRN Trilu"
)
LOGIC = names("Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Not IsNaN IsInf")
BINARY = names("Add Sub Mul Div Pow Max Min Sum Mean Mod PRelu BitShift Where") | LOGIC
REDUCE = names(
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


class _Call:
    """One node and what is known of its inputs, as the rules read them."""

    __slots__ = ("node", "op", "at", "ins", "x", "xs", "elem", "rank")

    def __init__(self, node: Node, ins: list[Info | None]) -> None:
        self.node, self.op, self.at, self.ins = node, node.op, node.attrs, ins
        self.x = ins[0] if ins else None
        self.xs = self.x.shape if self.x else None
        self.elem = self.x.elem if self.x else FLOAT
        self.rank = len(self.xs) if self.xs is not None else 0

    def same(self, shape: Dims | None, e: int | None = None, values: tuple | None = None) -> list[Info]:
        return [Info(self.elem if e is None else e, shape, values)]

    def vals(self, i: int) -> tuple | None:
        ins = self.ins
        return ins[i].values if i < len(ins) and ins[i] is not None else None  # type: ignore[union-attr]

    def axes(self) -> list | None:
        """The ``axes`` attribute, or the values of input 1 (opset 13+)."""
        at = self.at
        return at.get("axes") if "axes" in at else (list(self.vals(1)) if self.vals(1) is not None else None)  # type: ignore[arg-type]


def _creation(c: _Call) -> list[Info] | None:
    """Constant, ConstantOfShape, Range, Shape, Size: values made from attributes or shapes."""
    op, at, xs = c.op, c.at, c.xs
    if op == "Constant":
        t = at.get("value")
        if isinstance(t, Tensor):
            return c.same(t.dims, t.elem, t.values)
        for key, e in (("value_int", INT64), ("value_float", FLOAT)):
            if key in at:
                return c.same((), e, (at[key],))
        for key, e in (("value_ints", INT64), ("value_floats", FLOAT)):
            if key in at:
                return c.same((len(at[key]),), e, tuple(at[key]))
        return None
    if op == "ConstantOfShape":
        target = c.vals(0)
        t = at.get("value")
        return c.same(tuple(int(v) for v in target), t.elem if isinstance(t, Tensor) else FLOAT) if target else None
    if op == "Range":
        s, lim, d = c.vals(0), c.vals(1), c.vals(2)
        if not (s and lim and d) or not d[0]:
            return None
        return c.same((max(math.ceil((lim[0] - s[0]) / d[0]), 0),))
    if xs is None:
        return None
    if op == "Shape":
        start, end = at.get("start", 0), at.get("end", c.rank)
        s = tuple(xs[slice(start, end)])
        return c.same((len(s),), INT64, s)
    return c.same((), INT64, (math.prod(xs),))  # Size


def _elementwise(c: _Call) -> list[Info] | None:
    """Unary, binary (broadcasting) and logic ops, Cast: the shape of the inputs; small values followed."""
    op, x, xs, ins = c.op, c.x, c.xs, c.ins
    if op in UNARY or op == "Cast":
        e = int(c.at.get("to", c.elem)) if op == "Cast" else c.elem
        out = c.same(xs, e, x.values if x and op in ("Identity", "Cast") else None)
        if op == "Dropout" and len(c.node.outputs) > 1:
            out.append(Info(BOOL, xs))
        return out  # other outputs (a normalization's saved statistics): their declared shapes
    shape = broadcast(*(i.shape if i else None for i in ins))
    e = BOOL if op in LOGIC else (ins[1].elem if op == "Where" and ins[1] else c.elem)
    values = None
    if len(ins) == 2 and c.vals(0) is not None and c.vals(1) is not None:
        values = _values_binary(op, c.vals(0), c.vals(1))  # type: ignore[arg-type]
    return c.same(shape, e, values)


def _contraction(c: _Call) -> list[Info] | None:
    """MatMul, Gemm, convolutions and pooling: shapes from the weights' and the windows' sizes."""
    op, at, xs, rank, ins = c.op, c.at, c.xs, c.rank, c.ins
    if xs is None:
        return None
    if op in ("MatMul", "MatMulInteger"):
        b = ins[1].shape if ins[1] else None
        if b is None:
            return None
        a2, b2 = (1, *xs) if rank == 1 else xs, (*b, 1) if len(b) == 1 else b
        if a2[-1] != b2[-2]:
            return None
        batch = broadcast(tuple(a2[:-2]), tuple(b2[:-2]))
        if batch is None:
            return None
        out = (*batch, *(() if rank == 1 else (a2[-2],)), *(() if len(b) == 1 else (b2[-1],)))
        return c.same(out, INT64 if op == "MatMulInteger" else c.elem)
    if op == "Gemm":
        b = ins[1].shape if ins[1] else None
        if b is None or rank != 2 or len(b) != 2:
            return None
        m = xs[1] if at.get("transA") else xs[0]
        n = b[0] if at.get("transB") else b[1]
        return c.same((m, n))
    if op in ("Conv", "ConvInteger"):
        w = ins[1].shape if ins[1] else None
        if w is None or rank < 3:
            return None
        kernel = at.get("kernel_shape") or list(w[2:])
        return c.same((xs[0], w[0], *_pool_dims(xs[2:], kernel, at)))
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
                st[i] * (xs[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 - pads[i] - pads[i + n]
                for i in range(n)
            ]
        return c.same((xs[0], w[1] * int(at.get("group", 1)), *spatial))
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = at.get("kernel_shape")
        if not kernel:
            return None
        shape = (xs[0], xs[1], *_pool_dims(xs[2:], kernel, at))
        return [Info(c.elem, shape), Info(INT64, shape)][: max(1, len(c.node.outputs))]
    return c.same((*xs[:2], *([1] * (rank - 2))))  # GlobalAveragePool, GlobalMaxPool, GlobalLpPool


def _reduction(c: _Call) -> list[Info] | None:
    """Reduce* and ArgMax/ArgMin: the reduced axes dropped, or kept as 1."""
    op, at, xs, rank = c.op, c.at, c.xs, c.rank
    if xs is None:
        return None
    if op in ("ArgMax", "ArgMin"):
        axes = [int(at.get("axis", 0))]
    else:
        axes = c.axes()
        if axes is None and len(c.ins) > 1 and c.ins[1] is not None and c.node.inputs[1]:
            return None
        if not axes:
            axes = [] if at.get("noop_with_empty_axes") else list(range(rank))
    reduced = {_axis(int(a), rank) for a in axes}
    keep = at.get("keepdims", 1)
    shape = tuple(1 if i in reduced else d for i, d in enumerate(xs) if keep or i not in reduced)
    return c.same(shape, INT64 if op.startswith("Arg") else c.elem)


def _movement(c: _Call) -> list[Info] | None:
    """Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Concat, Gather, Slice, Expand, Tile: shapes (and small
    values, for shape arithmetic) moved around."""
    op, at, x, xs, rank, ins = c.op, c.at, c.x, c.xs, c.rank, c.ins
    if xs is None:
        return None
    if op == "Reshape":
        target = c.vals(1)
        if target is None:
            return None
        out = [(xs[i] if d == 0 and not at.get("allowzero") and i < rank else int(d)) for i, d in enumerate(target)]
        if out.count(-1) == 1:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(xs) // known if known else 0
        return c.same(tuple(out), c.elem, x.values if x else None)
    if op == "Flatten":
        a = _axis(int(at.get("axis", 1)), rank)
        return c.same((math.prod(xs[:a]), math.prod(xs[a:])))
    if op == "Transpose":
        perm = at.get("perm") or list(range(rank))[::-1]
        return c.same(tuple(xs[p] for p in perm))
    if op in ("Squeeze", "Unsqueeze"):
        axes = c.axes()
        if op == "Squeeze":
            if axes is None and len(c.node.inputs) > 1 and c.node.inputs[1]:
                return None
            drop = {_axis(int(a), rank) for a in axes} if axes else {i for i, d in enumerate(xs) if d == 1}
            return c.same(tuple(d for i, d in enumerate(xs) if i not in drop), c.elem, x.values if x else None)
        if axes is None:
            return None
        out_rank = rank + len(axes)
        add = {_axis(int(a), out_rank) for a in axes}
        it = iter(xs)
        return c.same(tuple(1 if i in add else next(it) for i in range(out_rank)), c.elem, x.values if x else None)
    if op == "Concat":
        if any(i is None or i.shape is None for i in ins):
            return None
        a = _axis(int(at.get("axis", 0)), rank)
        shape = list(xs)
        shape[a] = sum(i.shape[a] for i in ins)  # type: ignore[union-attr,index]
        values = None
        if all(i.values is not None for i in ins) and rank == 1:  # type: ignore[union-attr]
            values = tuple(v for i in ins for v in i.values)  # type: ignore[union-attr]
        return c.same(tuple(shape), c.elem, values)
    if op == "Gather":
        idx = ins[1] if len(ins) > 1 else None
        if idx is None or idx.shape is None:
            return None
        a = _axis(int(at.get("axis", 0)), rank)
        shape = (*xs[:a], *idx.shape, *xs[a + 1 :])
        values = None
        if x and x.values is not None and idx.values is not None and rank == 1:
            try:
                values = tuple(x.values[int(i)] for i in idx.values)
            except IndexError:
                values = None
        return c.same(shape, c.elem, values)
    if op == "Slice":
        starts, ends = c.vals(1), c.vals(2)
        if starts is None or ends is None:
            return None
        inputs = c.node.inputs
        axes = c.vals(3) if len(inputs) > 3 and inputs[3] else tuple(range(len(starts)))
        steps = c.vals(4) if len(inputs) > 4 and inputs[4] else (1,) * len(starts)
        if axes is None or steps is None:
            return None
        shape = list(xs)
        slices = [slice(None)] * rank
        for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
            a = _axis(int(a), rank)
            sl = slice(int(s), int(e), int(st))
            slices[a] = sl
            shape[a] = len(range(*sl.indices(xs[a])))
        values = tuple(x.values[slices[0]]) if x and x.values is not None and rank == 1 else None
        return c.same(tuple(shape), c.elem, values)
    if op == "Expand":
        target = c.vals(1)
        return c.same(broadcast(xs, tuple(int(v) for v in target))) if target is not None else None
    reps = c.vals(1)  # Tile
    return c.same(tuple(d * int(r) for d, r in zip(xs, reps, strict=True))) if reps is not None else None


_RULES = {  # op -> the rule of its family
    **dict.fromkeys(names("Constant ConstantOfShape Range Shape Size"), _creation),
    **dict.fromkeys(UNARY | BINARY | {"Cast"}, _elementwise),
    **dict.fromkeys(
        names(
            "MatMul MatMulInteger Gemm Conv ConvInteger ConvTranspose MaxPool AveragePool LpPool "
            "GlobalAveragePool GlobalMaxPool GlobalLpPool"
        ),
        _contraction,
    ),
    **dict.fromkeys(REDUCE | {"ArgMax", "ArgMin"}, _reduction),
    **dict.fromkeys(names("Reshape Flatten Transpose Squeeze Unsqueeze Concat Gather Slice Expand Tile"), _movement),
}


def infer(node: Node, ins: list[Info | None], functions: frozenset) -> list[Info] | None:
    """Output infos of ``node`` from its input infos, or None where no rule applies (a custom domain, a
    plan-local function, an op no family has, or an input whose shape the rule needs is unknown)."""
    if node.domain or (node.domain, node.op) in functions:
        return None
    rule = _RULES.get(node.op)
    return rule(_Call(node, ins)) if rule is not None else None


def sane(info: Info) -> Info:
    """An inferred value as kept: no negative dims (a hostile Reshape), values only of small tensors (a chain
    of Concats must not grow them without bound)."""
    shape = info.shape if info.shape is None or all(d >= 0 for d in info.shape) else None
    values = info.values if info.values is not None and len(info.values) <= SMALL and shape is not None else None
    return Info(info.elem, shape, values)
