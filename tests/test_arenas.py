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


def test_plans_with_an_if_get_no_arena() -> None:
    """An If gets no arena, whatever its branches hold: which branch runs depends on the data, so the first
    runs of given shapes need not show what a later one takes (see the end-to-end test below)."""
    zero = helper.make_node("Constant", [], ["zero"], value=f32("z", [0.0], []))
    where = [zero, helper.make_node("IsInf", ["x"], ["inf"]), helper.make_node("Where", ["inf", "zero", "x"], ["w"])]
    assert not sizes_follow_shapes(_guarded(where, "w"))
    assert not Arenas(256 << 20, enabled=True).arena(_guarded(where, "w"))


def test_signal_windows_and_unpooling_sized_by_data_get_no_arena() -> None:
    """Ops that size their output from an input's value (a window's length, DFT's length, MaxUnpool's
    output_shape) are sized by data: a run at n=40M after runs at n=10 would pin its memory in the arena."""
    window = checked(
        [helper.make_node("HannWindow", ["n"], ["w"]), helper.make_node("ReduceSum", ["w"], ["y"])],
        [_io("n", I64, [])],
        [_io("y", F, [1])],
    )
    assert not sizes_follow_shapes(window)


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


def test_a_bigger_branch_taken_once_leaves_no_memory_held_in_the_runner(raw_worker) -> None:  # noqa: ANN001
    """A hostile client's plan: its first runs take an If's small branch, one run its big branch (160 MB of
    intermediates, sized by Shape(x)). Nothing of that run may stay held in the runner: a run that needs
    300 MB of the 400 MB bound afterwards still gets it (with the If given an arena, it ran out of memory)."""
    import numpy as np

    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0", "--max-run-memory-mb", "400"])
    big = [
        helper.make_node("ConstantOfShape", ["dims"], ["c"]),
        helper.make_node("ReduceSum", ["c", "one"], ["w"], keepdims=0),
    ]
    then = helper.make_graph(big, "big", [], [_io("w", F, ["n"])])
    small = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"])], "small", [], [_io("m", F, ["n"])])
    plan = checked(
        [
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Concat", ["sx", "k"], ["dims"], axis=0),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["pos"]),
            helper.make_node("If", ["pos"], ["y"], then_branch=then, else_branch=small),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, ["n"])],
        [
            f32("two", [2.0], []),
            f32("zero", [0.0], []),
            helper.make_tensor("k", I64, [1], [40_000_000]),
            helper.make_tensor("one", I64, [1], [1]),
        ],
    )
    fill = checked(
        [helper.make_node("ConstantOfShape", ["shape"], ["y"])], [_io("shape", I64, [1])], [_io("y", F, ["n"])]
    )
    p = peer.register(plan, name="branchy")["plan"]
    f = peer.register(fill, name="fill")["plan"]
    size = np.array([75_000_000], np.int64)  # 300 MB

    def fill_ok(key: str) -> bool:
        reply = peer.request(*peer.run_header(f, [size], [key]))
        peer.request({"type": "delete", "keys": [key]})
        return reply.kind == "ok"

    assert fill_ok("a")
    for i in range(3):
        assert peer.run(p, [np.full(1, -1.0, np.float32)], [f"s{i}"], fetch=[0]).array_list()[0].tolist() == [-2.0]
    assert peer.run(p, [np.full(1, 1.0, np.float32)], ["b"], fetch=[0]).array_list()[0].tolist() == [0.0]
    assert fill_ok("a2"), "the big branch's memory stayed held in the runner"
