"""Which plans' sessions keep onnxruntime's CPU arena in the runner (worker/runner.py ``Arenas``): only those
whose every value is sized by the arguments' shapes, so the first run of given shapes shows what every
later one takes (a ConstantOfShape sized by an input's value kept 400 MB for good after one big run)."""

from __future__ import annotations

from onnx import TensorProto, helper

from planwire.worker.runner import Arenas, sizes_follow_shapes
from tests.hostile import checked, f32

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _io(name: str, dtype: int, shape: list) -> object:
    return helper.make_tensor_value_info(name, dtype, shape)


def test_plans_sized_by_data_get_no_arena() -> None:
    by_shapes = checked(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        [_io("x", F, ["n", 2])],
        [_io("y", F, ["n", 2])],
        [f32("w", [1.0, 0.0, 0.0, 1.0], [2, 2])],
    )
    by_data = checked(
        [helper.make_node("ConstantOfShape", ["n"], ["c"]), helper.make_node("ReduceSum", ["c"], ["y"])],
        [_io("n", I64, [1])],
        [_io("y", F, [1])],
    )
    assert sizes_follow_shapes(by_shapes)
    assert not sizes_follow_shapes(by_data)
    arenas = Arenas(256 << 20, enabled=True)
    assert arenas.arena(by_shapes)
    assert not arenas.arena(by_data)
    assert not Arenas(256 << 20, enabled=False).arena(by_shapes)
