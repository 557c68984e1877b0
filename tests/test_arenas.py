"""Which plans' sessions keep onnxruntime's CPU arena in the runner (worker/arenas.py ``Arenas``): only those
whose every value is sized by the arguments' shapes, so the first run of given shapes shows what a later one
takes (a ConstantOfShape sized by an input's value kept 400 MB for good after one big run); an If's bigger
branch taken later is counted or loads the plan again without an arena; and an arena goes with its session
even while the runner holds outputs of it (they are copied out: an output kept the whole arena alive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
from onnx import TensorProto, helper

from planwire.worker.arenas import Arenas, sizes_follow_shapes
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


def test_an_if_whose_branches_are_sized_by_shapes_gets_an_arena() -> None:
    """The guarded ReLU backward of an exported training step (If(not finite) {Where} else {mask multiply})
    gets an arena; an If with a branch sized by data (an argument's values), or a Loop in a branch, does not.
    Which branch runs depends on the data: the growth a bigger branch takes later is counted or gives the
    arena up (see the end-to-end test below)."""
    zero = helper.make_node("Constant", [], ["zero"], value=f32("z", [0.0], []))
    where = [zero, helper.make_node("IsInf", ["x"], ["inf"]), helper.make_node("Where", ["inf", "zero", "x"], ["w"])]
    assert sizes_follow_shapes(_guarded(where, "w"))
    assert Arenas(256 << 20, enabled=True).arena(_guarded(where, "w"))
    from_shape = [helper.make_node("Expand", ["x", "shape"], ["w"])]  # sized by Shape(x), outside the If
    assert sizes_follow_shapes(_guarded(from_shape, "w"))
    by_data = [helper.make_node("Tile", ["x", "k"], ["w"])]  # sized by the argument k's values
    assert not sizes_follow_shapes(_guarded(by_data, "w"))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "x"], ["acc_out"])],
        "body",
        [_io("i", I64, []), _io("cond", TensorProto.BOOL, []), _io("acc", F, ["n"])],
        [_io("cond_out", TensorProto.BOOL, []), _io("acc_out", F, ["n"])],
    )
    looped = [helper.make_node("Loop", ["k1", "", "x"], ["w"], body=body), helper.make_node("Squeeze", ["k"], ["k1"])]
    assert not sizes_follow_shapes(_guarded(looped[::-1], "w"))


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
    allows, and past it the plan is to be loaded again without an arena (its bytes are returned)."""
    mb = 1 << 20
    arenas = Arenas(100 * mb + 4, enabled=True)  # (+4: the plan's bytes, kept while it has an arena)
    key, other = ("p", ((4,),)), ("p", ((8,),))
    assert arenas.loaded("p", b"plan") > 0 and arenas.held == 4
    arenas.held -= 4
    assert arenas.shrink(key)  # the first run of these shapes gives back, and shows what it took
    assert arenas.ran(key, 10 * mb) is None
    assert not arenas.shrink(key) and arenas.held == 20 * mb
    assert arenas.ran(other, 1 * mb) is None and not arenas.shrink(other)
    arenas.kept_run(key, 10 * mb)  # the arena grows back to what the first run took: allowed for
    arenas.kept_run(key, mb // 2)  # stray pages
    arenas.kept_run(other, 8 * mb)  # 18 MB in all: still within what it may keep
    assert arenas.held == 20 * mb and not arenas.shrink(key)
    assert arenas.kept_run(key, 12 * mb) is None  # grew past it (30 MB): counted, within the budget
    assert arenas.held == 60 * mb and not arenas.shrink(key)
    # 61 MB: past what it may keep, and twice that past the budget: loaded again without an arena, now
    assert arenas.kept_run(other, 31 * mb) == b"plan"
    arenas.held += 4
    assert arenas.drop("p") > 0 and arenas.held == 0
    assert arenas.loaded("p", None) == 0 and arenas.drop("p") == 0


def _fill() -> bytes:
    """y = zeros(shape): a run that takes what its argument says."""

    return checked(
        [helper.make_node("ConstantOfShape", ["shape"], ["y"])], [_io("shape", I64, [1])], [_io("y", F, ["n"])]
    )


def _branchy(big: list, k: int, *consts: object) -> bytes:
    """y = If(sum(x) > 0, big, x * 2): the big branch's nodes ``big`` (output ``w``) read ``dims`` = (len(x), k)
    and the constants ``one`` (and ``consts``); the small branch follows x's shape."""
    then = helper.make_graph(big, "big", [], [_io("w", F, ["n"])])
    small = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"])], "small", [], [_io("m", F, ["n"])])
    return checked(
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
            *consts,
            helper.make_tensor("k", I64, [1], [k]),
            helper.make_tensor("one", I64, [1], [1]),
        ],
    )


def test_a_bigger_branch_taken_once_leaves_no_memory_held_in_the_runner(raw_worker) -> None:  # noqa: ANN001
    """A hostile client's plan: its first runs take an If's small branch, one run its big branch (160 MB of
    intermediates, sized by Shape(x)). Nothing of that run may stay held in the runner: a run that needs
    300 MB of the 400 MB bound afterwards still gets it (the plan is loaded again without an arena, and the
    outputs of its runs the runner holds are copied out of the arena first: they kept it alive, and the next
    run ran out of memory)."""
    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0", "--max-run-memory-mb", "400"])
    big = [
        helper.make_node("ConstantOfShape", ["dims"], ["c"]),
        helper.make_node("ReduceSum", ["c", "one"], ["w"], keepdims=0),
    ]
    plan = _branchy(big, 40_000_000)
    fill = _fill()
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


def _runner(proc) -> psutil.Process:  # noqa: ANN001
    (runner,) = psutil.Process(proc.proc.pid).children()
    return runner


def _faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (field 10 of /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_a_plan_with_an_if_keeps_its_arena_on_the_worker(raw_worker) -> None:  # noqa: ANN001
    """End to end: a repeated run of a plan whose If holds 16 MB intermediates (an exported training step's
    ReLU-backward guard has this form) faults in no new memory in the runner (with the If refused an arena, it
    mapped and faulted in its intermediates afresh: ~2,600 minor faults per run)."""
    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0", "--max-run-memory-mb", "256"])
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
    runner = _runner(proc)

    def run() -> None:
        (y,) = peer.run(pid, ["x"], ["y"], fetch=[0]).array_list()
        assert y == pytest.approx(6 * n, rel=1e-3)

    run()  # it shows what the run takes (and gives it back)
    run()  # the arena takes it again, and keeps it from now on
    before = _faults(runner.pid)
    for _ in range(3):
        run()
    assert (_faults(runner.pid) - before) / 3 < 2_000


def test_an_arena_goes_with_its_session_while_its_outputs_are_held(raw_worker) -> None:  # noqa: ANN001
    """A plan whose runs keep ~80 MB in their session's arena, and whose outputs (one of them 8 MB) the
    runner still holds when the plan is deleted: the runner gives the arena's memory back (the outputs are
    copied out of it first: each kept the whole arena alive), and the outputs still read right."""
    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0"])
    plan = checked(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("Mul", ["e", "e"], ["s"]),
            helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0),
            helper.make_node("Slice", ["s", "zero", "part"], ["head"]),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, []), _io("head", F, ["m"])],
        [helper.make_tensor("zero", I64, [1], [0]), helper.make_tensor("part", I64, [1], [2_000_000])],
    )
    tiny = checked([helper.make_node("Neg", ["x"], ["y"])], [_io("x", F, [1])], [_io("y", F, [1])])
    pid = peer.register(plan, name="big")["plan"]
    other = peer.register(tiny, name="tiny")["plan"]
    n = 10_000_000  # two 40 MB intermediates
    runner = _runner(proc)
    start = runner.memory_info().rss >> 20
    peer.put("x", np.zeros(n, np.float32))
    for i in range(4):  # the first shows what a run takes; the arena keeps it from the second on
        assert peer.run(pid, ["x"], [f"y{i}", f"head{i}"]).kind == "ok"
    peer.request({"type": "delete", "keys": ["x"]})
    held = runner.memory_info().rss >> 20
    assert held > start + 60  # the arena (40-80 MB) and the outputs (8 MB each)
    assert peer.ok({"type": "delete_plan", "plan": pid}).kind == "ok"
    assert peer.run(other, [np.ones(1, np.float32)], ["t"], fetch=[0]).array_list()[0].tolist() == [-1.0]
    after = runner.memory_info().rss >> 20
    assert after < start + 4 * 8 + 15, f"runner RSS {start} MB at start, {held} with the arena, {after} after"
    for i in range(4):
        assert float(peer.get1(f"y{i}")) == pytest.approx(n, rel=1e-3)
        head = peer.get1(f"head{i}")
        assert head.shape == (2_000_000,) and np.all(head == 1.0)


def test_a_plan_whose_first_run_is_too_big_to_keep_gives_it_all_back(raw_worker) -> None:  # noqa: ANN001
    """A plan whose first run takes ~170 MB (more than half of KEEP_MB) is loaded again without an arena as
    that run ends; its outputs the runner holds (8 MB) are copied out of the arena first, so none of the
    arena's memory stays, and they still read right."""
    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0"])
    plan = checked(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("Mul", ["e", "e"], ["s"]),
            helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0),
            helper.make_node("Slice", ["s", "zero", "part"], ["head"]),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, []), _io("head", F, ["m"])],
        [helper.make_tensor("zero", I64, [1], [0]), helper.make_tensor("part", I64, [1], [2_000_000])],
    )
    tiny = checked([helper.make_node("Neg", ["x"], ["y"])], [_io("x", F, [1])], [_io("y", F, [1])])
    pid = peer.register(plan, name="big")["plan"]
    other = peer.register(tiny, name="tiny")["plan"]
    n = 20_000_000  # two 80 MB intermediates
    runner = _runner(proc)
    start = runner.memory_info().rss >> 20
    peer.put("x", np.zeros(n, np.float32))
    for i in range(2):
        assert peer.run(pid, ["x"], [f"y{i}", f"head{i}"]).kind == "ok"
    peer.request({"type": "delete", "keys": ["x"]})
    assert peer.run(other, [np.ones(1, np.float32)], ["t"], fetch=[0]).array_list()[0].tolist() == [-1.0]
    after = runner.memory_info().rss >> 20
    assert after < start + 2 * 8 + 15, f"runner RSS {start} MB at start, {after} after"
    for i in range(2):
        assert float(peer.get1(f"y{i}")) == pytest.approx(n, rel=1e-3)
        assert np.all(peer.get1(f"head{i}") == 1.0)


def test_evacuated_values_keep_their_handles_data_and_reuse() -> None:
    """``DeviceStore.evacuate``: every held value in the arena of the session that goes (and one sharing its
    memory, though held under another token) gets one copy of its own under the same handle, with the same
    data; once freed, it is a buffer a later run writes into (a training step's state: no copy per step)."""
    from planwire.worker.device import Device
    from planwire.worker.devstore import DeviceStore
    from planwire.worker.runtime import OrtPlan

    data = checked(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [_io("x", F, ["n"])],
        [_io("y", F, ["n"])],
        [f32("two", [2.0], [])],
    )
    plan = OrtPlan(data, arena=True)
    store = DeviceStore(Device("cpu"))
    x, keep = store.upload(np.arange(4, dtype=np.float32))
    (y,) = plan.run_bound([x])
    store.hold(1, y, own=True, arena=7)
    store.hold(2, y, arena=8)  # the same memory (an Identity of it, by another plan)
    other, _ = store.upload(np.ones(4, np.float32))
    store.hold(3, other, keep)
    store.evacuate(7)
    assert store.get(1).data_ptr() == store.get(2).data_ptr() != y.data_ptr()
    assert store.get(3).data_ptr() == other.data_ptr()
    assert store.get(1).numpy().tolist() == [0.0, 2.0, 4.0, 6.0]
    del y
    store.free([2, 1])
    (reuse,) = store.buffers([("tensor(float)", (4,))]) or [None]
    assert reuse is not None  # the copy went to the pool
    (z,) = plan.run_bound([x], [reuse])
    assert z.data_ptr() == reuse.data_ptr() and z.numpy().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert store.lent == {}  # a copy is in no arena


def test_a_freed_buffer_of_a_dropped_plans_arena_is_not_lent_to_another_plan(raw_worker) -> None:  # noqa: ANN001
    """Found by review: buffers freed in the runner message that drops their plan went to the pool, were lent
    to another plan's run and kept the dropped session's arena alive, uncounted."""

    extra = ["--direct-max-mb", "0", "--host-copy-after", "0", "--max-run-memory-mb", "256"]
    proc, peer = raw_worker("arenas", kind="tcp", extra=extra)
    plan = checked(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("Mul", ["e", "e"], ["s"]),
            helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0),
            helper.make_node("Slice", ["s", "zero", "part"], ["head"]),
        ],
        [_io("x", F, ["n"])],
        [_io("y", F, []), _io("head", F, ["m"])],
        [helper.make_tensor("zero", I64, [1], [0]), helper.make_tensor("part", I64, [1], [2_000_000])],
    )
    neg = checked([helper.make_node("Neg", ["x"], ["y"])], [_io("x", F, ["n"])], [_io("y", F, ["n"])])
    pid = peer.register(plan, name="big")["plan"]
    q = peer.register(neg, name="neg")["plan"]
    (runner,) = psutil.Process(proc.proc.pid).children()
    start = runner.memory_info().rss >> 20
    peer.put("x", np.zeros(10_000_000, np.float32))
    peer.put("x2", np.ones(2_000_000, np.float32))
    assert peer.run(q, ["x2"], ["t0"], fetch=[0]).kind == "tensors"  # Q's output shapes are known from now on
    for _ in range(5):  # the same keys: the state stays in the runner, in P's arena
        assert peer.run(pid, ["x"], ["y", "head"]).kind == "ok"
    peer.request({"type": "delete", "keys": ["x", "y", "head"]})
    assert peer.ok({"type": "delete_plan", "plan": pid}).kind == "ok"
    assert peer.run(q, ["x2"], ["t"]).kind == "ok"  # one runner message: free, drop, run
    for _ in range(6):  # t = -t, Q's buffers passed back and forth
        assert peer.run(q, ["t"], ["t"]).kind == "ok"
    after = runner.memory_info().rss >> 20
    f = peer.register(_fill(), name="fill")["plan"]
    reply = peer.request(*peer.run_header(f, [np.array([50_000_000], np.int64)], ["big"]))  # 200 of 256 MB
    assert reply.kind == "ok", reply
    assert np.all(peer.get1("t") == -1.0)
    assert after < start + 40, f"runner RSS {start} MB at start, {after} MB after P's arena went"


def test_a_run_that_fails_in_a_bigger_branch_leaves_no_memory_held_in_the_runner(raw_worker) -> None:  # noqa: ANN001
    """A plan with an arena whose first runs take an If's small branch; one run takes its big branch (200 MB,
    sized by Shape(x)) and then fails on the data (a Gather out of bounds). Nothing of that run may stay held in
    the runner: three runs of another plan that need 400 MB of the 512 MB bound still get it. (Its arena kept
    the 200 MB, uncounted: the failed plan's session gets a new arena; and a small output of the plan's last
    good run, sent inline, was still referenced by the runner's loop, which kept the old arena alive.)"""
    proc, peer = raw_worker("arenas", kind="tcp", extra=["--direct-max-mb", "0", "--max-run-memory-mb", "512"])
    big = [
        helper.make_node("ConstantOfShape", ["dims"], ["c"], value=f32("v", [1.0], [1])),
        helper.make_node("ReduceSum", ["c", "one"], ["r"], keepdims=0),
        helper.make_node("Mul", ["x", "thousand"], ["xi"]),
        helper.make_node("Cast", ["xi"], ["idx"], to=I64),
        helper.make_node("Gather", ["r", "idx"], ["w"]),  # index 1000 of a 1-element tensor: fails, on the data
    ]
    plan = _branchy(big, 50_000_000, f32("thousand", [1000.0], []))
    fill = _fill()
    p = peer.register(plan, name="branchy")["plan"]
    f = peer.register(fill, name="fill")["plan"]

    def fill_ok(key: str) -> str:  # 400 MB of the 512 MB a run may take
        reply = peer.request(*peer.run_header(f, [np.array([100_000_000], np.int64)], [key]))
        peer.request({"type": "delete", "keys": [key]})
        return f"{reply.kind} {reply.get('code')}"

    assert fill_ok("a") == "ok None"
    for i in range(3):
        assert peer.run(p, [np.full(1, -1.0, np.float32)], [f"s{i}"], fetch=[0]).array_list()[0].tolist() == [-2.0]
    reply = peer.request(*peer.run_header(p, [np.full(1, 1.0, np.float32)], ["b"]))
    assert (reply.kind, reply.get("code")) == ("error", "run_failed"), reply
    results = [fill_ok(f"a{i}") for i in range(3)]
    assert results == ["ok None"] * 3, f"the failed branch's memory stayed held in the runner: {results}"
    # the plan still runs, and keeps an arena (its new session's)
    assert peer.run(p, [np.full(1, -1.0, np.float32)], ["s9"], fetch=[0]).array_list()[0].tolist() == [-2.0]
