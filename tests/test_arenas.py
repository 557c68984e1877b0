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
    from_shape = checked(  # a training step's gradient broadcast: Expand(g, Shape(x))
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("ReduceSum", ["x"], ["g"], keepdims=0),
            helper.make_node("Expand", ["g", "s"], ["y"]),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, ["n"])],
    )
    sized_by_arg = checked(  # the same Expand, its shape an argument's values
        [helper.make_node("Expand", ["x", "s"], ["y"])],
        [_io("x", F, [1]), _io("s", I64, [1])],
        [_io("y", F, ["n"])],
    )
    assert sizes_follow_shapes(by_shapes)
    assert sizes_follow_shapes(from_shape)
    assert not sizes_follow_shapes(by_data)
    assert not sizes_follow_shapes(sized_by_arg)
    arenas = Arenas(256 << 20, enabled=True)
    assert arenas.arena(by_shapes)
    assert not arenas.arena(by_data)
    assert not Arenas(256 << 20, enabled=False).arena(by_shapes)
