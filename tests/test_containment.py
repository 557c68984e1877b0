"""Containment and control while busy (issue 11, items 1 and 3), on real plan-worker processes.

Plans run in a sandboxed runner process (the Python worker's worker/runner.py, the Node.js worker's
src/runner.js: the same tests run against both): a plan that crashes it (SIGFPE), exhausts its memory bound or
runs past --run-timeout costs that run only, and the worker answers ping, hello, describe and cancel
while a run executes. Raw frames (tests/conformance/wire.py) so each reply is checked exactly.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper

from planwire.worker.admin import query
from planwire.worker.process import NodeWorkerProcess, WorkerProcess
from tests.conformance.wire import Peer
from tests.conformance.workers import node_missing
from tests.conftest import RawWorker
from tests.hostile import checked

INT64_MIN = np.iinfo(np.int64).min
INT32_MIN = np.iinfo(np.int32).min


_model = checked  # a well-formed plan (tests/hostile.py)


def _io(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def div_plan(dtype: int) -> bytes:
    """y = a / b: integer division of INT_MIN by -1 traps (SIGFPE) inside onnxruntime."""
    return _model(
        [helper.make_node("Div", ["a", "b"], ["y"])],
        [_io("a", dtype, [1]), _io("b", dtype, [1])],
        [_io("y", dtype, [1])],
    )


def add_plan() -> bytes:
    """y = x + 1 over float32 of any length."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    return _model(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [_io("x", TensorProto.FLOAT, ["n"])],
        [_io("y", TensorProto.FLOAT, ["n"])],
        [one],
    )


FOREVER = np.array(10**12, np.int64)  # loop_plan's trips: hours


def loop_plan() -> bytes:
    """A Loop adding 1 to x as many times as its first argument says. The trip count is data: a constant
    one this large is refused at registration (plan_too_large), so only the sandbox can stop the run."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Add", ["v", "one"], ["v_out"]),
        ],
        "body",
        [_io("i", TensorProto.INT64, []), _io("cond", TensorProto.BOOL, []), _io("v", TensorProto.FLOAT, [1])],
        [_io("cond_out", TensorProto.BOOL, []), _io("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    return _model(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        [_io("trips", TensorProto.INT64, []), _io("x", TensorProto.FLOAT, [1])],
        [_io("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("go", TensorProto.BOOL, [], [True])],
    )


def fill_plan() -> bytes:
    """ConstantOfShape(shape): as large as the caller asks."""
    return _model(
        [helper.make_node("ConstantOfShape", ["shape"], ["y"])],
        [_io("shape", TensorProto.INT64, [1])],
        [_io("y", TensorProto.FLOAT, ["n"])],
    )


def folding_bomb_plan() -> bytes:
    """x + Expand(ConstantOfShape([1]), [2**28]): 1 GiB of constants, folded while the session loads."""
    return _model(
        [
            helper.make_node("ConstantOfShape", ["one_shape"], ["c"]),
            helper.make_node("Expand", ["c", "big"], ["e"]),
            helper.make_node("ReduceSum", ["e"], ["s"], keepdims=1),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [_io("x", TensorProto.FLOAT, [1])],
        [_io("y", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor("one_shape", TensorProto.INT64, [1], [1]),
            helper.make_tensor("big", TensorProto.INT64, [1], [1 << 28]),
        ],
    )


@pytest.fixture(params=["tcp", "ipc", "node"])
def worker(request: pytest.FixtureRequest, raw_worker: RawWorker) -> tuple[WorkerProcess, Peer]:
    """A contained worker: the Python plan-worker over tcp and ipc, and the Node.js one (src/sandbox.js)."""
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    return raw_worker("contained", kind=request.param, extra=["--run-timeout", "2", "--max-run-memory-mb", "256"])


@pytest.fixture(params=["tcp", "ipc", "node"])
def sandboxed(request: pytest.FixtureRequest, raw_worker: RawWorker) -> tuple[WorkerProcess, Peer]:
    """``worker`` with every run in the sandbox: tiny float plans too (the Python worker's --direct-max-mb 0;
    the Node.js worker has no direct lane)."""
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    extra = ["--run-timeout", "2", "--max-run-memory-mb", "256"]
    if request.param != "node":
        extra += ["--direct-max-mb", "0"]
    return raw_worker("contained", kind=request.param, extra=extra)


def _stored(peer: Peer) -> dict[str, np.ndarray]:
    """Tensors put before a hostile plan, small and large (a large one lives in shared memory)."""
    data = {
        "small": np.arange(7, dtype=np.float32),
        "large": np.arange(1 << 18, dtype=np.float32),  # 1 MiB: over the inline size, shared with the runner
    }
    for key, arr in data.items():
        peer.put(key, arr)
    return data


def _still_holds(peer: Peer, data: dict[str, np.ndarray]) -> None:
    """The worker answers ping at once and still has every tensor it was given."""
    assert peer.request({"type": "ping"}, ()).kind == "ok"
    for key, arr in data.items():
        np.testing.assert_array_equal(peer.get1(key, keep=True), arr)


@pytest.mark.parametrize(("dtype", "np_dtype"), [(TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32)])
def test_integer_division_trap_is_contained(worker, dtype: int, np_dtype: type) -> None:
    proc, peer = worker
    data = _stored(peer)
    add = peer.register(add_plan(), name="add")["plan"]
    # a result made by the runner before the crash, large enough to live in shared memory
    peer.run(add, ["large"], ["plus1"])
    data["plus1"] = data["large"] + 1
    plan = peer.register(div_plan(dtype), name="div")["plan"]
    lo = np.iinfo(np_dtype).min
    np.testing.assert_array_equal(
        peer.run(plan, [np.array([lo], np_dtype), np.array([2], np_dtype)], ["q"], fetch=[0]).array_list()[0],
        [lo // 2],
    )
    reply = peer.error(
        peer.run_header(plan, [np.array([lo], np_dtype), np.array([-1], np_dtype)], ["q"])[0],
        peer.run_header(plan, [np.array([lo], np_dtype), np.array([-1], np_dtype)], ["q"])[1],
        code="plan_crashed",
    )
    assert "'div'" in reply["message"] and "SIGFPE" in reply["message"], reply["message"]
    _still_holds(peer, data)
    failed = peer.error({"type": "get", "keys": ["q"]}, code="run_failed")
    assert "plan_crashed" in failed["message"] and "SIGFPE" in failed["message"], failed["message"]
    # registered plans survive: the fresh runner re-creates their sessions from the kept bytes
    out = peer.run(add, ["large"], ["plus1again"], fetch=[0]).array_list()[0]
    np.testing.assert_array_equal(out, data["large"] + 1)
    assert peer.ok({"type": "has_plan", "plan": plan}).kind == "plan"
    assert proc.proc.poll() is None


def test_endless_loop_times_out_and_ping_is_answered_while_it_runs(worker) -> None:
    _, peer = worker
    data = _stored(peer)
    plan = peer.register(loop_plan(), name="forever")["plan"]
    run_id = peer.send(*peer.run_header(plan, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    ping_id = peer.send({"type": "ping"})
    hello_id = peer.send({"type": "hello"})
    describe_id = peer.send({"type": "describe", "keys": ["small"]})
    first = [peer.recv() for _ in range(3)]  # answered while the run executes: before its reply
    assert [r["re"] for r in first] == [ping_id, hello_id, describe_id]
    assert [r.kind for r in first] == ["ok", "welcome", "found"]
    reply = peer.recv()
    assert reply["re"] == run_id and reply["code"] == "plan_timeout", reply
    assert "'forever'" in reply["message"] and "--run-timeout" in reply["message"]
    failed = peer.error({"type": "get", "keys": ["y"]}, code="run_failed")
    assert "plan_timeout" in failed["message"]
    _still_holds(peer, data)


def test_requests_after_a_running_run_keep_their_order(worker) -> None:
    """A get (or a describe of its output) sent behind a run waits for it: pipelining is unchanged."""
    _, peer = worker
    plan = peer.register(add_plan(), name="add")["plan"]
    peer.put("x", np.arange(3, dtype=np.float32))
    r1 = peer.send(*peer.run_header(plan, ["x"], ["x1"]))
    r2 = peer.send(*peer.run_header(plan, ["x1"], ["x2"]))
    d = peer.send({"type": "describe", "keys": ["x2"]})
    g = peer.send({"type": "get", "keys": ["x2"]})
    replies = [peer.recv() for _ in range(4)]
    assert [r["re"] for r in replies] == [r1, r2, d, g]
    assert replies[2]["tensors"][0]["shape"] == [3]
    np.testing.assert_array_equal(replies[3].array_list()[0], [2, 3, 4])


def test_memory_bomb_at_run_is_out_of_memory(worker) -> None:
    _, peer = worker
    data = _stored(peer)
    plan = peer.register(fill_plan(), name="fill")["plan"]
    np.testing.assert_array_equal(
        peer.run(plan, [np.array([3], np.int64)], ["z"], fetch=[0]).array_list()[0], np.zeros(3, np.float32)
    )
    header, frames = peer.run_header(plan, [np.array([1 << 32], np.int64)], ["z"])  # 16 GiB
    reply = peer.request(header, frames)
    assert reply.kind == "error" and reply["code"] in ("out_of_memory", "plan_crashed"), reply
    assert "'fill'" in reply["message"]
    _still_holds(peer, data)
    # the runner is usable again
    assert peer.run(plan, [np.array([2], np.int64)], ["z"], fetch=[0]).array_list()[0].shape == (2,)


def test_constant_folding_bomb_at_registration_is_contained(worker) -> None:
    _, peer = worker
    data = _stored(peer)
    reply = peer.request({"type": "register_plan", "name": "bomb"}, [folding_bomb_plan()])
    if reply.kind == "plan":  # onnxruntime gave up folding at the memory bound: the run then hits it
        header, frames = peer.run_header(reply["plan"], [np.ones(1, np.float32)], ["b"])
        reply = peer.request(header, frames)
    assert reply.kind == "error" and reply["code"] in ("out_of_memory", "plan_crashed", "bad_plan"), reply
    assert "'bomb'" in reply["message"], reply["message"]
    _still_holds(peer, data)
    plan = peer.register(add_plan(), name="add")["plan"]
    np.testing.assert_array_equal(peer.run(plan, ["small"], ["s1"], fetch=[0]).array_list()[0], data["small"] + 1)


def test_cancel_a_running_and_a_queued_run(worker) -> None:
    _, peer = worker
    data = _stored(peer)
    forever = peer.register(loop_plan(), name="forever")["plan"]
    add = peer.register(add_plan(), name="add")["plan"]
    running = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    queued = peer.send(*peer.run_header(add, ["small"], ["s1"]))
    after = peer.send(*peer.run_header(add, ["small"], ["s2"], fetch=[0]))
    cancel_q = peer.send({"type": "cancel", "run": queued})
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (queued, "cancelled"), reply
    assert peer.recv()["re"] == cancel_q
    with Peer(peer.url, timeout=30) as other:  # another connection cannot cancel this one's runs
        reply = other.error({"type": "cancel", "id": running, "run": running}, code="bad_argument")
        assert f"no run #{running} " in reply["message"]
    cancel_r = peer.send({"type": "cancel", "run": running})
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (running, "cancelled"), reply
    assert "'forever'" in reply["message"]
    assert peer.recv()["re"] == cancel_r
    reply = peer.recv()  # the run queued behind the cancelled one goes on
    assert reply["re"] == after
    np.testing.assert_array_equal(reply.array_list()[0], data["small"] + 1)
    for key in ("y", "s1"):
        failed = peer.error({"type": "get", "keys": [key]}, code="run_failed")
        assert "cancelled" in failed["message"], failed["message"]
    peer.error({"type": "cancel", "run": running}, code="bad_argument")  # nothing left to cancel
    _still_holds(peer, data)


def test_a_crash_among_pipelined_runs_costs_that_run_only(worker) -> None:
    """A burst of runs with a trapping one in the middle (the Python worker has many in flight to its
    runner): only that run fails; those before it keep their results (a large one the runner held, too),
    those behind it go to a fresh runner and answer correctly, in order."""
    _, peer = worker
    data = _stored(peer)
    add = peer.register(add_plan(), name="add")["plan"]
    div = peer.register(div_plan(TensorProto.INT64), name="div")["plan"]
    sent: list[tuple[int, int | None]] = [(peer.send(*peer.run_header(add, ["large"], ["plus1"])), None)]
    for i in range(24):
        if i == 12:
            crash = peer.run_header(div, [np.array([INT64_MIN]), np.array([-1])], ["q"])
            sent.append((peer.send(*crash), -1))
        sent.append((peer.send(*peer.run_header(add, [np.full(3, i, np.float32)], [f"a{i}"], fetch=[0])), i))
    for rid, i in sent:
        reply = peer.recv()
        assert reply["re"] == rid, (reply, rid)
        if i == -1:
            assert reply["code"] == "plan_crashed" and "'div'" in reply["message"], reply
        elif i is None:
            assert reply.kind == "ok", reply
        else:
            np.testing.assert_array_equal(reply.array_list()[0], np.full(3, i + 1, np.float32))
    np.testing.assert_array_equal(peer.get1("plus1", keep=True), data["large"] + 1)
    np.testing.assert_array_equal(peer.get1("a20", keep=True), np.full(3, 21, np.float32))
    _still_holds(peer, data)


def test_a_timeout_ahead_of_pipelined_runs_costs_that_run_only(worker) -> None:
    _, peer = worker
    data = _stored(peer)
    forever = peer.register(loop_plan(), name="forever")["plan"]
    add = peer.register(add_plan(), name="add")["plan"]
    head = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    behind = [peer.send(*peer.run_header(add, ["small"], [f"s{i}"], fetch=[0])) for i in range(5)]
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (head, "plan_timeout"), reply
    for rid in behind:
        reply = peer.recv()
        assert reply["re"] == rid, reply
        np.testing.assert_array_equal(reply.array_list()[0], data["small"] + 1)
    _still_holds(peer, data)


@pytest.mark.parametrize("forever_first", [False, True], ids=["burst", "burst-behind-endless"])
def test_a_burst_of_runs_with_large_inline_arguments_and_results_is_answered(sandboxed, forever_first) -> None:
    """Pipelined runs whose arguments and fetched results are each just under the inline size fill the pipe
    to the runner both ways (the Python worker once deadlocked here, supervisor and runner each blocked
    writing to the other); behind an endless run the burst must not keep --run-timeout from firing."""
    proc, peer = sandboxed
    data = _stored(peer)
    add = peer.register(add_plan(), name="add")["plan"]
    head = None
    if forever_first:
        forever = peer.register(loop_plan(), name="forever")["plan"]
        head = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    big = [np.full(15_000, i, np.float32) for i in range(31)]  # 60 KB each, inline both ways
    behind = [peer.send(*peer.run_header(add, [b], [f"b{i}"], fetch=[0])) for i, b in enumerate(big)]
    if head is not None:
        reply = peer.recv()
        assert (reply["re"], reply["code"]) == (head, "plan_timeout"), reply
    for rid, b in zip(behind, big, strict=True):
        reply = peer.recv()
        assert reply["re"] == rid, reply
        np.testing.assert_array_equal(reply.array_list()[0], b + 1)
    _still_holds(peer, data)
    if not isinstance(proc, NodeWorkerProcess):  # the runs really were in flight together (the window)
        status = query(re.search(r"admin on (\S+)", proc.log()).group(1))
        assert status.device_copies["in_flight_max"] > 1, status.device_copies


def test_cancel_of_runs_pipelined_behind_a_running_one(worker) -> None:
    """Runs sent in one burst behind an endless one (the Python worker has them in its runner's pipe): one
    is cancelled (it answers cancelled at once and its output is failed), then the endless one; the others
    answer correctly, in order."""
    _, peer = worker
    data = _stored(peer)
    forever = peer.register(loop_plan(), name="forever")["plan"]
    add = peer.register(add_plan(), name="add")["plan"]
    running = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    behind = [peer.send(*peer.run_header(add, ["small"], [f"s{i}"], fetch=[0])) for i in range(4)]
    cancel = peer.send({"type": "cancel", "run": behind[1]})
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (behind[1], "cancelled"), reply
    assert peer.recv()["re"] == cancel
    cancel = peer.send({"type": "cancel", "run": running})
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (running, "cancelled"), reply
    assert peer.recv()["re"] == cancel
    for rid in (behind[0], behind[2], behind[3]):
        reply = peer.recv()
        assert reply["re"] == rid, reply
        np.testing.assert_array_equal(reply.array_list()[0], data["small"] + 1)
    failed = peer.error({"type": "get", "keys": ["s1"]}, code="run_failed")
    assert "cancelled" in failed["message"], failed["message"]
    np.testing.assert_array_equal(peer.get1("s2", keep=True), data["small"] + 1)
    _still_holds(peer, data)


def test_cancel_of_a_run_behind_one_that_finishes(worker) -> None:
    """A run cancelled while it waits behind a running one (the Node worker has sent it to its runner
    already, which then skips it) answers cancelled at once and its output is failed; the running one and
    the others finish with their results, in order, and the runner is the same process throughout."""
    proc, peer = worker
    data = _stored(peer)
    loop = peer.register(loop_plan(), name="loop")["plan"]
    add = peer.register(add_plan(), name="add")["plan"]
    peer.run(add, ["small"], ["warm"])  # the runner is up and holds both sessions
    runners = [c.pid for c in psutil.Process(proc.proc.pid).children()]
    trips = np.array(30_000, np.int64)  # a few tenths of a second: the cancel comes while it runs
    head = peer.send(*peer.run_header(loop, [trips, np.zeros(1, np.float32)], ["y"], fetch=[0]))
    behind = [peer.send(*peer.run_header(add, ["small"], [f"s{i}"], fetch=[0])) for i in range(3)]
    cancel = peer.send({"type": "cancel", "run": behind[1]})
    reply = peer.recv()
    assert (reply["re"], reply["code"]) == (behind[1], "cancelled"), reply
    assert peer.recv()["re"] == cancel
    reply = peer.recv()
    assert reply["re"] == head, reply
    np.testing.assert_array_equal(reply.array_list()[0], [30_000.0])
    for rid in (behind[0], behind[2]):
        reply = peer.recv()
        assert reply["re"] == rid, reply
        np.testing.assert_array_equal(reply.array_list()[0], data["small"] + 1)
    failed = peer.error({"type": "get", "keys": ["s1"]}, code="run_failed")
    assert "cancelled" in failed["message"], failed["message"]
    assert [c.pid for c in psutil.Process(proc.proc.pid).children()] == runners
    _still_holds(peer, data)


def test_sigterm_stops_the_worker_mid_run(worker) -> None:
    proc, peer = worker
    plan = peer.register(loop_plan(), name="forever")["plan"]
    peer.send(*peer.run_header(plan, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    assert peer.request({"type": "ping"}).kind == "ok"  # the run has started
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=20) == 0
    assert "stopped" in proc.log()


def _shm_dirs(pid: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"planwire-{pid}-*")) if Path("/dev/shm").is_dir() else []


def test_runner_and_shared_memory_go_with_the_worker(tmp_path: Path) -> None:
    """The runner is a child of the worker and goes with it (stopped, or killed with -9): no process
    left behind; a stopped worker removes its shared memory, a killed one's goes at the next start."""
    for how in ("stop", "kill"):
        with WorkerProcess("w", listen=f"ipc://{tmp_path}/{how}.ipc", extra=["--direct-max-mb", "0"]) as proc:
            with Peer(proc.url, timeout=30) as peer:
                peer.register(add_plan())
                peer.put("big", np.zeros(1 << 18, np.float32))
                peer.run(peer.register(add_plan())["plan"], ["big"], ["big1"])  # segments exist now
            (runner,) = psutil.Process(proc.proc.pid).children()
            assert "planwire.worker.runner" in runner.cmdline()
            assert any(d.is_dir() and any(d.iterdir()) for d in _shm_dirs(proc.proc.pid))
            if how == "kill":
                proc.proc.kill()
                proc.proc.wait()
        psutil.wait_procs([runner], timeout=20)
        assert not runner.is_running()
        if how == "stop":
            assert _shm_dirs(proc.proc.pid) == []
    killed = proc.proc.pid
    with WorkerProcess("w", listen=f"ipc://{tmp_path}/next.ipc") as proc, Peer(proc.url, timeout=30) as peer:
        assert peer.request({"type": "ping"}).kind == "ok"
        assert _shm_dirs(killed) == []


def nested_functions_plan(depth: int = 18) -> bytes:
    """f_i(x) = f_(i-1)(x) + f_(i-1)(x), 1 KiB of model: onnxruntime inlines 2**depth nodes while loading."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [
        helper.make_function("local", "f0", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], opsets)
    ]
    for i in range(1, depth + 1):
        nodes = [
            helper.make_node(f"f{i - 1}", ["x"], ["a"], domain="local"),
            helper.make_node(f"f{i - 1}", ["x"], ["b"], domain="local"),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ]
        functions.append(helper.make_function("local", f"f{i}", ["x"], ["y"], nodes, opsets))
    graph = helper.make_graph(
        [helper.make_node(f"f{depth}", ["x"], ["y"], domain="local")],
        "g",
        [_io("x", TensorProto.FLOAT, [1])],
        [_io("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        functions=functions,
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_registration_that_would_never_end_is_refused_up_front(worker) -> None:
    """Functions nested 18 deep (onnxruntime would inline 2**18 nodes for minutes) are refused by the static
    check before any runner sees them; a registration that still ran past --run-timeout would be stopped
    with plan_timeout (supervisor._overdue), but no plan that passes the static checks is known to load
    that slowly."""
    _, peer = worker
    data = _stored(peer)
    plan = nested_functions_plan()
    reply = peer.error({"type": "register_plan", "name": "nested"}, [plan], code="plan_too_large")
    assert "nests" in reply["message"] and "levels" in reply["message"], reply["message"]
    assert peer.ok({"type": "has_plan", "plan": hashlib.sha256(plan).hexdigest()}).kind == "missing"
    _still_holds(peer, data)


def _runner_rss_mb(proc: WorkerProcess) -> int:
    (runner,) = psutil.Process(proc.proc.pid).children()
    return runner.memory_info().rss >> 20


def test_memory_of_a_big_run_is_given_back(worker) -> None:
    """200 MB of intermediates do not stay held after the run (nor after the next: worker/runner.py's Arenas)."""
    proc, peer = worker
    plan = peer.register(
        _model(
            [
                helper.make_node("ConstantOfShape", ["shape"], ["c"]),
                helper.make_node("Exp", ["c"], ["e"]),
                helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0),
            ],
            [_io("shape", TensorProto.INT64, [1])],
            [_io("y", TensorProto.FLOAT, [])],
        ),
        name="sum_of_exp",
    )["plan"]
    n = 25_000_000  # two 100 MB float32 intermediates inside the run
    before = _runner_rss_mb(proc)
    for _ in range(2):  # the first run, and a run of the plan as the runner keeps it after such a run
        (y,) = peer.run(plan, [np.array([n], np.int64)], ["y"], fetch=[0]).array_list()
        assert y == pytest.approx(n, rel=1e-3)
        assert _runner_rss_mb(proc) < before + 50


def _runner_faults(proc: WorkerProcess) -> int:
    """Minor page faults of the worker's runner so far (field 10 of /proc/PID/stat)."""
    (runner,) = psutil.Process(proc.proc.pid).children()
    return int(Path(f"/proc/{runner.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_a_repeated_run_reuses_the_memory_its_last_run_freed(worker) -> None:
    """Within worker/runner.py's KEEP_MB, what a run freed stays with the runner for its next run: a run with
    80 MB of intermediates, repeated, faults in no new memory (given back at once, it mapped and faulted in
    its intermediates afresh each time: ~20,000 minor faults per run). The plan's values are sized by its
    argument's shape (a plan sized by data gets no arena: tests/test_arenas.py)."""
    proc, peer = worker
    if isinstance(proc, NodeWorkerProcess):
        pytest.skip("the Node worker's runner allocates through onnxruntime-node, not this runner")
    plan = peer.register(
        _model(
            [
                helper.make_node("Exp", ["x"], ["e"]),
                helper.make_node("Mul", ["e", "e"], ["s"]),
                helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0),
            ],
            [_io("x", TensorProto.FLOAT, ["n"])],
            [_io("y", TensorProto.FLOAT, [])],
        ),
        name="sum_of_exp2",
    )["plan"]
    n = 10_000_000  # two 40 MB float32 intermediates inside the run
    peer.put("x", np.zeros(n, np.float32))

    def run() -> None:
        (y,) = peer.run(plan, ["x"], ["y"], fetch=[0]).array_list()
        assert y == pytest.approx(n, rel=1e-3)

    run()  # it shows what the run takes (and gives it back)
    run()  # onnxruntime lays the run's memory out in one block from now on
    before = _runner_faults(proc)
    for _ in range(3):
        run()
    assert (_runner_faults(proc) - before) / 3 < 2_000


def test_plan_that_crashes_while_loading_is_not_registered(worker) -> None:
    """Div(INT64_MIN, -1) over constants traps while onnxruntime folds it, i.e. at registration."""
    _, peer = worker
    data = _stored(peer)
    plan = _model(
        [helper.make_node("Div", ["lo", "minus1"], ["q"]), helper.make_node("Add", ["x", "q"], ["y"])],
        [_io("x", TensorProto.INT64, [1])],
        [_io("y", TensorProto.INT64, [1])],
        [
            helper.make_tensor("lo", TensorProto.INT64, [1], [int(INT64_MIN)]),
            helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
        ],
    )
    reply = peer.request({"type": "register_plan", "name": "folds_to_a_trap"}, [plan])
    assert reply.kind == "error" and reply["code"] == "plan_crashed", reply
    assert "'folds_to_a_trap' (registering)" in reply["message"] and "not registered" in reply["message"]
    assert peer.ok({"type": "has_plan", "plan": hashlib.sha256(plan).hexdigest()}).kind == "missing"
    _still_holds(peer, data)


def test_large_arguments_and_results_cross_by_shared_memory(worker) -> None:
    """Inline and stored arguments over 64 KiB, and results over it, are exact (shared segments)."""
    _, peer = worker
    plan = peer.register(add_plan(), name="add")["plan"]
    x = np.random.default_rng(0).random(1 << 18, dtype=np.float32)  # 1 MiB
    peer.put("x", x)
    for i in range(10):
        inline = x + i
        (y,) = peer.run(plan, [inline], [f"y{i}"], fetch=[0]).array_list()
        np.testing.assert_array_equal(y, inline + 1)
        (z,) = peer.run(plan, ["x"], ["z"], fetch=[0]).array_list()
        np.testing.assert_array_equal(z, x + 1)
    np.testing.assert_array_equal(peer.get1("y9"), x + 10)


def test_no_sandbox_runs_plans_in_the_worker_process(tmp_path: Path) -> None:
    """--no-sandbox (trusted plans): no runner process, plans run in the worker itself."""
    with WorkerProcess("w", listen=f"ipc://{tmp_path}/w.ipc", extra=["--no-sandbox"]) as proc:
        with Peer(proc.url, timeout=30) as peer:
            plan = peer.register(add_plan(), name="add")["plan"]
            out = peer.run(plan, [np.arange(3, dtype=np.float32)], ["y"], fetch=[0]).array_list()[0]
            np.testing.assert_array_equal(out, [1, 2, 3])
            assert psutil.Process(proc.proc.pid).children() == []
        assert "--no-sandbox" in proc.log()


def test_delete_plan_waits_for_the_running_run_and_the_runner_forgets_the_session(worker) -> None:
    """delete_plan is a mutation: it executes after the run ahead of it. The runner is told to drop the
    session (with its next request), and a plan registered again loads afresh."""
    _, peer = worker
    forever = peer.register(loop_plan(), name="forever")["plan"]
    add = peer.register(add_plan(), name="add")["plan"]
    peer.put("x", np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(peer.run(add, ["x"], ["x1"], fetch=[0]).array_list()[0], [1, 2, 3])
    running = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    deleted = peer.send({"type": "delete_plan", "plan": forever})
    has = peer.send({"type": "has_plan", "plan": forever})
    replies = [peer.recv() for _ in range(3)]
    assert [r["re"] for r in replies] == [running, deleted, has]
    assert replies[0]["code"] == "plan_timeout"  # it ran (and was stopped) before the delete
    assert (replies[1].kind, replies[2].kind) == ("ok", "missing")
    np.testing.assert_array_equal(peer.run(add, ["x"], ["x1"], fetch=[0]).array_list()[0], [1, 2, 3])
    peer.ok({"type": "delete_plan", "plan": add})  # the (fresh) runner holds its session: dropped with
    peer.register(fill_plan(), name="fill")  # this next request
    np.testing.assert_array_equal(peer.get1("x1"), [1, 2, 3])
    peer.error(*peer.run_header(add, ["x"], ["x2"]), code="unknown_plan")
    assert peer.register(add_plan(), name="add")["plan"] == add
    np.testing.assert_array_equal(peer.run(add, ["x"], ["x3"], fetch=[0]).array_list()[0], [1, 2, 3])


def test_the_data_bound_follows_what_the_runner_holds_a_mebibyte_at_a_time() -> None:
    """The runner's RLIMIT_DATA is what it used at start plus --max-run-memory-mb plus what it holds, rounded up
    to a MiB, and set again only when that rounded figure changes (a training step's loss held until the
    client's frees come in a batch grows what it holds by a few bytes per step). In a child process: the
    bound is real."""
    code = (
        "import resource\n"
        "from planwire.worker.runner import SLACK, DataBound, bound\n"
        "limit = bound(64)\n"
        "b = DataBound(limit)\n"
        "seen = []\n"
        "for held in (0, 4, 8, SLACK, SLACK + 1, 5 * SLACK, 4, 0):\n"
        "    b.hold(held)\n"
        "    seen.append((resource.getrlimit(resource.RLIMIT_DATA)[0] - limit) // SLACK)\n"
        "print(seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["[0,", "1,", "1,", "1,", "2,", "5,", "1,", "0]"]
