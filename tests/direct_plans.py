"""Plans for the direct lane's rule, and the case table both workers' tests check it against.

``tests/direct_cases.json`` lists calls (a plan built here by name, the arguments' shapes, the byte bound)
and the one decision both lanes must reach: ``direct`` (the worker runs it itself), ``plan`` (the plan is
never direct: refused from its bytes) or ``call`` (the plan is direct-safe, this call is not small, or its
shapes do not fit an op: the runner runs it and says so). tests/test_direct.py asks worker/direct.py,
tests/test_node_direct.py asks worker/node/src/direct.js (through tests/direct_rule.mjs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.hostile import checked, f32, i64

F, I64 = TensorProto.FLOAT, TensorProto.INT64
CASES = Path(__file__).with_name("direct_cases.json")


def _io(name: str, dtype: int, shape: Sequence | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def model(nodes: list, inputs: list, outputs: list, inits: Sequence = (), sparse: Sequence = ()) -> bytes:
    """A plan made without onnx's checker (some of these it would refuse before the worker could)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), sparse_initializer=list(sparse))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def affine(k: int = 4) -> bytes:
    """y = relu(x @ w + b), softmax over the last axis: x [n, k]."""
    w = f32("w", [float(i % 7 - 3) / 4 for i in range(k * 3)], [k, 3])
    b = f32("b", [0.5, -0.25, 0.0], [3])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], axis=-1),
    ]
    return checked(nodes, [_io("x", F, ["n", k])], [_io("y", F, ["n", 3])], [w, b])


def int_div() -> bytes:
    """Integer Div: INT64_MIN / -1 traps (SIGFPE) inside onnxruntime."""
    nodes = [helper.make_node("Div", ["a", "b"], ["y"])]
    return checked(nodes, [_io("a", I64, [1]), _io("b", I64, [1])], [_io("y", I64, [1])])


def expand() -> bytes:
    """y = x + Expand(one, shape): the output's size comes from a tensor's values."""
    nodes = [helper.make_node("Expand", ["one", "shape"], ["e"]), helper.make_node("Add", ["x", "e"], ["y"])]
    return checked(nodes, [_io("x", F, ["n"]), _io("shape", I64, [1])], [_io("y", F, ["n"])], [f32("one", [1.0])])


def reshape() -> bytes:
    """y = Reshape(x + 1, [-1])."""
    nodes = [helper.make_node("Add", ["x", "one"], ["t"]), helper.make_node("Reshape", ["t", "flat"], ["y"])]
    return checked(nodes, [_io("x", F, ["n"])], [_io("y", F, ["m"])], [f32("one", [1.0]), i64("flat", [-1])])


def fill() -> bytes:
    """y = x + ConstantOfShape(shape)."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])]
    return checked(nodes, [_io("x", F, ["n"]), _io("shape", I64, [1])], [_io("y", F, ["n"])])


def matmul() -> bytes:
    """y = a @ b, any sizes."""
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    return checked(nodes, [_io("a", F, ["n", "k"]), _io("b", F, ["k", "m"])], [_io("y", F, ["n", "m"])])


def weights(k: int = 128) -> bytes:
    """y = x @ W for x [N, k], W [k, k]: 2*N*k*k FLOPs, so N decides whether a call is small."""
    w = onnx.numpy_helper.from_array(np.eye(k, dtype=np.float32) * 2, "w")
    return model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_io("x", F, ["N", k])], [_io("y", F, ["N", k])], [w])


def batched() -> bytes:
    """MatMul over batch axes: onnxruntime's per-matrix work and offsets are not in what the rule counts."""
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    return model(nodes, [_io("a", F, [1000, 1, 1, 1]), _io("b", F, [1000, 1, 1])], [_io("y", F, [1000, 1000, 1, 1])])


def add() -> bytes:
    """y = a + b (broadcasting)."""
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    return checked(nodes, [_io("a", F, ["n"]), _io("b", F, ["m"])], [_io("y", F, ["k"])])


def halve() -> bytes:
    """y = x / -2 (float Div: inf or NaN, never a trap) over x [N]."""
    nodes = [helper.make_node("Div", ["x", "two"], ["y"])]
    return model(nodes, [_io("x", F, ["N"])], [_io("y", F, ["N"])], [f32("two", [-2.0])])


def most() -> bytes:
    """max(a, b, c) over three broadcasting inputs."""
    nodes = [helper.make_node("Max", ["a", "b", "c"], ["y"])]
    return model(nodes, [_io(n, F, None) for n in "abc"], [_io("y", F, None)])


def chain(n: int) -> bytes:
    nodes = [
        helper.make_node("Neg", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}" if i < n - 1 else "y"]) for i in range(n)
    ]
    return checked(nodes, [_io("x", F, ["n"])], [_io("y", F, ["n"])])


def loop() -> bytes:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Neg", ["v"], ["v_out"])],
        "body",
        [_io("i", I64, []), _io("c", TensorProto.BOOL, []), _io("v", F, [1])],
        [_io("c_out", TensorProto.BOOL, []), _io("v_out", F, [1])],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)]
    return checked(nodes, [_io("trips", I64, []), _io("x", F, [1])], [_io("y", F, [1])])


def gemm(trans_a: int = 0, trans_b: int = 0, c: bool = False, **extra: int) -> bytes:
    """y = Gemm(a, b[, c]) on inputs of any shape (the call's shapes decide whether K and C fit)."""
    ins = ["a", "b", *(["c"] if c else [])]
    flags = {k: v for k, v in (("transA", trans_a), ("transB", trans_b)) if v}
    node = helper.make_node("Gemm", ins, ["y"], **flags, **extra)
    return model([node], [_io(n, F, None) for n in ins], [_io("y", F, None)])


def transpose(perm: list[int] | None = None) -> bytes:
    """y = Transpose(x, perm) on an input of any rank (the call's rank decides whether ``perm`` fits)."""
    node = helper.make_node("Transpose", ["x"], ["y"], **({} if perm is None else {"perm": perm}))
    return model([node], [_io("x", F, None)], [_io("y", F, None)])


def softmax(axis: int = 1, op: str = "Softmax") -> bytes:
    """Softmax (or LogSoftmax) over ``axis`` of an input of any rank: the call's rank decides whether it fits."""
    return model([helper.make_node(op, ["x"], ["y"], axis=axis)], [_io("x", F, None)], [_io("y", F, None)])


def neg16() -> bytes:
    """float16: onnxruntime computes it through float32 copies it inserts, memory the rule would not count."""
    h16 = TensorProto.FLOAT16
    return model([helper.make_node("Neg", ["x"], ["y"])], [_io("x", h16, ["n"])], [_io("y", h16, ["n"])])


def sparse() -> bytes:
    """A sparse initializer: densified (to 4 MiB here) when the session is made."""
    s = helper.make_sparse_tensor(f32("v", [1.0], [1]), i64("i", [0]), [1 << 20])
    add_s = helper.make_node("Add", ["x", "s"], ["y"])
    return model([add_s], [_io("x", F, [1 << 20])], [_io("y", F, [1 << 20])], sparse=[s])


def shadow() -> bytes:
    """An input that is also an initializer."""
    nodes = [helper.make_node("Neg", ["x"], ["y"])]
    return model(nodes, [_io("x", F, [1])], [_io("y", F, [1])], inits=[f32("x", [1.0])])


def constant() -> bytes:
    """erf(log_softmax(x) * c) - x with c a Constant node, for x [N, 3]."""
    c = onnx.numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32))
    nodes = [
        helper.make_node("Constant", [], ["c"], value=c),
        helper.make_node("LogSoftmax", ["x"], ["l"], axis=1),
        helper.make_node("Mul", ["l", "c"], ["t"]),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Sub", ["e", "x"], ["y"]),
    ]
    return model(nodes, [_io("x", F, ["N", 3])], [_io("y", F, ["N", 3])])


PLANS: dict[str, Callable[..., bytes]] = {
    f.__name__: f
    for f in (
        affine,
        int_div,
        expand,
        reshape,
        fill,
        matmul,
        weights,
        batched,
        add,
        halve,
        most,
        chain,
        loop,
        gemm,
        transpose,
        softmax,
        neg16,
        sparse,
        shadow,
        constant,
    )
}


@dataclass(frozen=True)
class Case:
    """One call of the table: ``plan(**kwargs)`` on arguments of ``shapes``, under a byte bound of ``max_bytes``."""

    plan: str
    kwargs: dict
    shapes: tuple[tuple[int, ...], ...]
    max_bytes: int
    decision: str  # "direct", "plan" or "call"
    why: str

    @property
    def id(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.plan}({args})@{'x'.join(map(str, self.shapes))}->{self.decision}"

    def data(self) -> bytes:
        return PLANS[self.plan](**self.kwargs)


def cases() -> Iterator[Case]:
    table = json.loads(CASES.read_text())
    default_mb = table["max_mb"]
    for c in table["cases"]:
        yield Case(
            c["plan"],
            c.get("kwargs", {}),
            tuple(tuple(s) for s in c["shapes"]),
            int(c.get("max_mb", default_mb) * (1 << 20)),
            c["decision"],
            c.get("why", ""),
        )
