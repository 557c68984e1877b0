"""Small ONNX plans built by hand with onnx.helper, for tests that must not depend on the exporter."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper

from planwire.transport.spec import PlanVariant, TensorSpec

ONNX_TYPES = {
    "float": TensorProto.FLOAT,
    "double": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


class HandPlan:
    """A minimal PlanSource: fixed variants, no Python function to build new ones."""

    def __init__(self, name: str, *variants: PlanVariant) -> None:
        self.name = name
        self.variants = list(variants)

    def variant_for(self, args: Sequence[tuple[str, Sequence[int]]]) -> PlanVariant:
        for v in self.variants:
            if v.mismatch(args) is None:
                return v
        raise TypeError(f"plan {self.name!r}: {self.variants[0].mismatch(args)}")


def variant(
    nodes: list,
    inputs: list[tuple[str, str, list]],
    outputs: list[tuple[str, str, list]],
    initializers: Sequence[onnx.TensorProto] = (),
) -> PlanVariant:
    vi = lambda n, t, s: helper.make_tensor_value_info(n, ONNX_TYPES[t], s)  # noqa: E731
    graph = helper.make_graph(
        nodes, "plan", [vi(*i) for i in inputs], [vi(*o) for o in outputs], initializer=list(initializers)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec = lambda n, t, s: TensorSpec(n, t, tuple(d if isinstance(d, int) else str(d) for d in s))  # noqa: E731
    return PlanVariant(model.SerializeToString(), tuple(spec(*i) for i in inputs), tuple(spec(*o) for o in outputs))


def double_abs(dtype: str = "float") -> HandPlan:
    """abs(x + x) on any shape [N]."""
    v = variant(
        [helper.make_node("Add", ["x", "x"], ["s"]), helper.make_node("Abs", ["s"], ["y"])],
        [("x", dtype, ["N"])],
        [("y", dtype, ["N"])],
    )
    return HandPlan("double_abs", v)


def sum_and_diff() -> HandPlan:
    """(x + y, x - y) for x, y of shape [N, 2]: two inputs, two outputs, a dynamic axis."""
    v = variant(
        [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Sub", ["x", "y"], ["d"])],
        [("x", "float", ["N", 2]), ("y", "float", ["N", 2])],
        [("s", "float", ["N", 2]), ("d", "float", ["N", 2])],
    )
    return HandPlan("sum_and_diff", v)


def reshape_to_3() -> HandPlan:
    """Reshape [N] to [3]: fails at run time unless N == 3 (a plan whose run can fail)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    v = variant(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [("x", "float", ["N"])],
        [("y", "float", [3])],
        initializers=[shape],
    )
    return HandPlan("reshape_to_3", v)
