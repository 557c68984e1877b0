"""Tiny ONNX plans built with onnx.helper (PROTOCOL.md §7), and their plan ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper

OPSET = 18
IR_VERSION = 9

ONNX_TYPES = {
    "float": TensorProto.FLOAT,
    "double": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int16": TensorProto.INT16,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "bool": TensorProto.BOOL,
}


def plan_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model(
    nodes: list,
    inputs: Sequence[tuple[str, str, list | None]],
    outputs: Sequence[tuple[str, str, list | None]],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    metadata: dict[str, str] | None = None,
    opsets: Sequence[onnx.OperatorSetIdProto] = (),
) -> onnx.ModelProto:
    vi = lambda n, t, s: helper.make_tensor_value_info(n, ONNX_TYPES[t], s)  # noqa: E731
    graph = helper.make_graph(
        nodes, "plan", [vi(*i) for i in inputs], [vi(*o) for o in outputs], initializer=list(initializers)
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *opsets])
    m.ir_version = IR_VERSION
    if metadata:
        helper.set_model_props(m, metadata)
    return m


def serialize(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString(deterministic=True)


def identity(dtype: str = "float", shape: list | None = None) -> bytes:
    """y = x for any shape (by default rank 1, dynamic)."""
    shape = ["N"] if shape is None else shape
    return serialize(model([helper.make_node("Identity", ["x"], ["y"])], [("x", dtype, shape)], [("y", dtype, shape)]))


def double_abs() -> bytes:
    """abs(x + x), x float [N]."""
    return serialize(
        model(
            [helper.make_node("Add", ["x", "x"], ["s"]), helper.make_node("Abs", ["s"], ["y"])],
            [("x", "float", ["N"])],
            [("y", "float", ["N"])],
        )
    )


def sum_and_diff() -> bytes:
    """(x + y, x - y) for x, y float [N, 2]: two inputs, two outputs, one dynamic axis."""
    return serialize(
        model(
            [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Sub", ["x", "y"], ["d"])],
            [("x", "float", ["N", 2]), ("y", "float", ["N", 2])],
            [("s", "float", ["N", 2]), ("d", "float", ["N", 2])],
        )
    )


def matmul() -> bytes:
    """a @ b with a float [N, K], b float [K, M]: every axis dynamic."""
    return serialize(
        model(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            [("a", "float", ["N", "K"]), ("b", "float", ["K", "M"])],
            [("c", "float", ["N", "M"])],
        )
    )


def reshape_to_3() -> bytes:
    """Reshape float [N] to [3]: registers fine, fails at run time unless N == 3."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    return serialize(
        model(
            [helper.make_node("Reshape", ["x", "shape"], ["y"])],
            [("x", "float", ["N"])],
            [("y", "float", [3])],
            initializers=[shape],
        )
    )


def with_metadata() -> bytes:
    """A plan carrying planwire's metadata conventions (PROTOCOL.md §7.2): scale x by a stored state."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [2.0, 3.0])
    ports = lambda role, name: json.dumps([{"name": name, "role": role, "dtype": "float", "shape": ["N", 2]}])  # noqa: E731
    meta = {
        "planwire.format": "1",
        "planwire.name": "scale",
        "planwire.kind": "module",
        "planwire.inputs": ports("arg", "x"),
        "planwire.outputs": ports("output", "y"),
        "planwire.state": json.dumps(["w"]),
    }
    return serialize(
        model(
            [helper.make_node("Mul", ["x", "w"], ["y"])],
            [("x", "float", ["N", 2])],
            [("y", "float", ["N", 2])],
            initializers=[w],
            metadata=meta,
        )
    )


# -- hostile plans (PROTOCOL.md §7.3) -------------------------------------------------------------------


def external_initializer(location: str = "weights.bin") -> bytes:
    """An initializer whose data lives in a file next to the worker."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    return serialize(
        model(
            [helper.make_node("Add", ["x", "w"], ["y"])],
            [("x", "float", [4])],
            [("y", "float", [4])],
            initializers=[w],
        )
    )


def external_constant(location: str = "secret.txt") -> bytes:
    """A Constant node whose value tensor points at an external file."""
    t = helper.make_tensor("value", TensorProto.UINT8, [4], [0] * 4)
    t.ClearField("int32_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return serialize(model([helper.make_node("Constant", [], ["y"], value=t)], [], [("y", "uint8", [4])]))


def custom_domain() -> bytes:
    """A node in a custom op domain (would need a custom-op library)."""
    return serialize(
        model(
            [helper.make_node("Evil", ["x"], ["y"], domain="com.example.evil")],
            [("x", "float", ["N"])],
            [("y", "float", ["N"])],
            opsets=[helper.make_opsetid("com.example.evil", 1)],
        )
    )


def contrib_domain() -> bytes:
    """A node in onnxruntime's contrib domain com.microsoft (not in the default allow-list)."""
    return serialize(
        model(
            [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
            [("x", "float", ["N"])],
            [("y", "float", ["N"])],
            opsets=[helper.make_opsetid("com.microsoft", 1)],
        )
    )


def padded(size: int) -> bytes:
    """A valid plan of about ``size`` bytes (a big initializer)."""
    n = max(1, size // 4)
    w = helper.make_tensor("w", TensorProto.FLOAT, [n], b"\0" * (4 * n), raw=True)
    return serialize(
        model(
            [helper.make_node("Identity", ["x"], ["y"])],
            [("x", "float", ["N"])],
            [("y", "float", ["N"])],
            initializers=[w],
        )
    )


def any_rank(dtype: str = "float") -> bytes:
    """y = x where x and y have no shape at all in the graph: unknown rank (PROTOCOL.md §5, ports)."""
    return serialize(model([helper.make_node("Identity", ["x"], ["y"])], [("x", dtype, None)], [("y", dtype, None)]))


def endless_loop() -> bytes:
    """A Loop with neither a trip count nor a condition: it would never end (PROTOCOL.md §7.3)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
    )
    loop = helper.make_node("Loop", ["", ""], [], body=body)
    out = helper.make_node("Identity", ["x"], ["y"])
    return serialize(model([loop, out], [("x", "float", [1])], [("y", "float", [1])]))


def constant_of_shape_bomb() -> bytes:
    """About 100 bytes asking for a 4 TiB tensor of zeros with a constant shape."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1 << 20, 1 << 20])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Shape", ["big"], ["y"])]
    return serialize(model(nodes, [], [("y", "int64", [2])], [shape]))
