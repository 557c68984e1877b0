"""Which plans' sessions keep onnxruntime's CPU arena in the runner (worker/runner.py ``Arenas``): only those
whose every value is sized by the arguments' shapes, so the first run of given shapes shows what every
later one takes (a ConstantOfShape sized by an input's value kept 400 MB for good after one big run)."""

from __future__ import annotations

import pytest
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


def _guarded(branch: list, out: str) -> bytes:
    """y = If(sum(x) is NaN) {branch} else {x * 2}: the shape of an exported training step's ReLU-backward guard."""
    then = helper.make_graph(branch, "then", [], [_io(out, F, ["n"])])
    twice = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"])], "else", [], [_io("m", F, ["n"])])
    return checked(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("IsNaN", ["s"], ["bad"]),
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("If", ["bad"], ["y"], then_branch=then, else_branch=twice),
        ],
        [_io("x", F, ["n"]), _io("k", I64, [1])],
        [_io("y", F, ["n"])],
        [f32("two", [2.0], [])],
    )


def test_if_with_branches_sized_by_shapes_gets_an_arena() -> None:
    """An If is judged by its branches (the same rule, in their scope): a branch whose sizes come from the outer
    graph's ``Shape`` is fine, one sized by an argument's values, a loop or a nested data-sized op is not."""
    zero = helper.make_node("Constant", [], ["zero"], value=f32("z", [0.0], []))
    where = [zero, helper.make_node("IsInf", ["x"], ["inf"]), helper.make_node("Where", ["inf", "zero", "x"], ["w"])]
    expand = [
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Expand", ["top", "shape"], ["w"]),
    ]
    by_arg = [helper.make_node("Expand", ["x", "k"], ["w"])]
    from_arg = [helper.make_node("Abs", ["k"], ["a"]), helper.make_node("ConstantOfShape", ["a"], ["w"])]
    assert sizes_follow_shapes(_guarded(where, "w"))
    assert sizes_follow_shapes(_guarded(expand, "w"))  # sized by Shape(x), computed outside the branch
    assert not sizes_follow_shapes(_guarded(by_arg, "w"))
    assert not sizes_follow_shapes(_guarded(from_arg, "w"))  # sized by a value computed in the branch from data
    inner = helper.make_graph(by_arg, "inner", [], [_io("w", F, ["n"])])
    nested = [helper.make_node("If", ["bad"], ["w2"], then_branch=inner, else_branch=inner)]
    assert not sizes_follow_shapes(_guarded(nested, "w2"))  # nested subgraphs are walked too
    assert Arenas(256 << 20, enabled=True).arena(_guarded(where, "w"))


def test_loops_get_no_arena() -> None:
    """A Loop's trip count is data: its memory does not follow the shapes, whatever its body holds."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "x"], ["acc_out"])],
        "body",
        [_io("i", I64, []), _io("cond", TensorProto.BOOL, []), _io("acc", F, ["n"])],
        [_io("cond_out", TensorProto.BOOL, []), _io("acc_out", F, ["n"])],
    )
    loop = checked(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        [_io("x", F, ["n"]), _io("trips", I64, [])],
        [_io("y", F, ["n"])],
    )
    assert not sizes_follow_shapes(loop)
    assert not Arenas(256 << 20, enabled=True).arena(loop)


def test_a_kept_arena_that_grows_is_counted_or_given_back() -> None:
    """A plan's first run of given shapes sets what its arena may keep (twice what it took); later runs that
    fault in more than that (an If that took its bigger branch) have the growth counted while the budget
    allows, and past it every run of the plan gives its memory back."""
    mb = 1 << 20
    arenas = Arenas(100 * mb, enabled=True)
    key, other = ("p", ((4,),)), ("p", ((8,),))
    arenas.loaded("p", b"plan")
    assert arenas.shrink(key)  # the first run of these shapes gives back, and shows what it took
    assert arenas.ran(key, 10 * mb) is None
    assert not arenas.shrink(key) and arenas.held == 20 * mb
    assert arenas.ran(other, 1 * mb) is None and not arenas.shrink(other)
    arenas.kept_run(key, 10 * mb)  # the arena grows back to what the first run took: allowed for
    arenas.kept_run(key, mb // 2)  # stray pages
    arenas.kept_run(other, 8 * mb)  # 18 MB in all: still within what it may keep
    assert arenas.held == 20 * mb and not arenas.shrink(key)
    arenas.kept_run(key, 12 * mb)  # grew past it (30 MB): counted, within the budget
    assert arenas.held == 60 * mb and not arenas.shrink(key)
    arenas.kept_run(other, 31 * mb)  # 61 MB: past what it may keep, and twice that past the budget: every run
    # of the plan gives its memory back from now on
    assert arenas.shrink(key) and arenas.shrink(other)
    arenas.drop("p")
    assert arenas.held == 0


def test_a_plan_with_an_if_keeps_its_arena_on_the_worker(raw_worker) -> None:  # noqa: ANN001
    """End to end: a repeated run of a plan whose If holds 16 MB intermediates (an exported training step's
    ReLU-backward guard has this form) faults in no new memory in the runner (with the If refused an arena, it
    mapped and faulted in its intermediates afresh: ~2,600 minor faults per run)."""
    import numpy as np
    import psutil

    proc, peer = raw_worker("arenas", kind="tcp", extra=["--max-run-memory-mb", "256"])
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["w"])], "then", [], [_io("w", F, ["n"])])
    chain = [helper.make_node("Mul", ["x", "two"], ["m0"])]
    chain += [helper.make_node("Add", [f"m{i}", "x"], [f"m{i + 1}"]) for i in range(4)]
    finite = helper.make_graph(chain, "else", [], [_io("m4", F, ["n"])])
    plan = checked(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("IsNaN", ["s"], ["bad"]),
            helper.make_node("If", ["bad"], ["g"], then_branch=then, else_branch=finite),
            helper.make_node("ReduceSum", ["g"], ["y"], keepdims=0),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, [])],
        [f32("two", [2.0], [])],
    )
    pid = peer.register(plan, name="guarded")["plan"]
    n = 4_000_000
    peer.put("x", np.ones(n, np.float32))
    (runner,) = psutil.Process(proc.proc.pid).children()

    def run() -> None:
        (y,) = peer.run(pid, ["x"], ["y"], fetch=[0]).array_list()
        assert y == pytest.approx(6 * n, rel=1e-3)

    run()  # it shows what the run takes (and gives it back)
    run()  # the arena takes it again, and keeps it from now on
    before = _faults(runner.pid)
    for _ in range(3):
        run()
    assert (_faults(runner.pid) - before) / 3 < 2_000


def _faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (field 10 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])
