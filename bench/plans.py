"""Plans built by hand with onnx.helper (independent of the exporter) and their torch twins.

tiny:     y = x * 2 + 1                       (the latency and pipelining plan)
chain(n): n elementwise ops cycling mul 0.5, add 1, tanh   (the communication plans)
single:   one plan per op of the cycle, run one by one on pointers
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from planwire.transport.spec import PlanVariant, TensorSpec

OPSET = 18
SHAPE = (16,)  # 64 bytes of float32: a "tiny" tensor
OPS = ("mul", "add", "tanh")  # the cycle of elementwise ops
CONST = {"mul": 0.5, "add": 1.0}


class HandPlan:
    """A minimal PlanSource: a name and fixed variants."""

    def __init__(self, name: str, variant: PlanVariant) -> None:
        self.name = name
        self.variants = [variant]

    def variant_for(self, args: Sequence[tuple[str, Sequence[int]]]) -> PlanVariant:
        v = self.variants[0]
        why = v.mismatch(args)
        if why:
            raise TypeError(f"plan {self.name!r}: {why}")
        return v


def _model(nodes: list, inits: list, n: int | str = "N") -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    graph = helper.make_graph(nodes, "plan", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model.SerializeToString()


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _variant(data: bytes) -> PlanVariant:
    return PlanVariant(data, (TensorSpec("x", "float", ("N",)),), (TensorSpec("y", "float", ("N",)),))


def tiny() -> HandPlan:
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])]
    return HandPlan("tiny", _variant(_model(nodes, [_const("two", 2.0), _const("one", 1.0)])))


def _op(op: str, src: str, out: str, i: int, inits: list) -> onnx.NodeProto:
    if op == "tanh":
        return helper.make_node("Tanh", [src], [out])
    inits.append(_const(f"c{i}", CONST[op]))
    return helper.make_node(op.capitalize(), [src, f"c{i}"], [out])


def chain(n: int) -> HandPlan:
    """n elementwise ops in one graph."""
    nodes: list = []
    inits: list = []
    for i in range(n):
        nodes.append(_op(OPS[i % len(OPS)], "x" if i == 0 else f"t{i - 1}", "y" if i == n - 1 else f"t{i}", i, inits))
    return HandPlan(f"chain{n}", _variant(_model(nodes, inits)))


def single(op: str) -> HandPlan:
    """A plan of one op of the cycle."""
    inits: list = []
    return HandPlan(op, _variant(_model([_op(op, "x", "y", 0, inits)], inits)))


# -- torch twins (also what the torch.rpc peer runs) -------------------------------------------------


def tiny_torch(x):  # noqa: ANN001, ANN201 - torch tensors
    return x * 2.0 + 1.0


def chain_torch(x, n: int):  # noqa: ANN001, ANN201
    import torch

    for i in range(n):
        op = OPS[i % len(OPS)]
        x = torch.tanh(x) if op == "tanh" else (x * CONST[op] if op == "mul" else x + CONST[op])
    return x
