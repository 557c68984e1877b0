"""The direct lane (worker/direct.py): tiny runs of provably harmless plans run in the supervisor itself.

The rule is checked on graphs (each exclusion named), then on real plan-worker processes: an direct-safe
plan's small calls run in the worker (``direct_runs`` in plan-worker status) with the sandbox's results and
eager torch's; every exclusion goes to the sandbox (the SIGFPE plan among them: the worker survives it);
a failure in the lane is the sandbox's answer; order and ownership hold across both lanes.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper

from planwire.transport.graph import read_graph
from planwire.worker.admin import query
from planwire.worker.direct import MAX_NODES, DirectLane, _Variant, direct_safe
from planwire.worker.jobs import Plan
from tests.conformance.wire import encode
from tests.conftest import RawWorker
from tests.hostile import checked, f32, i64

F, I64 = TensorProto.FLOAT, TensorProto.INT64
BOUND = 8 << 20


def _io(name: str, dtype: int, shape: list) -> object:
    return helper.make_tensor_value_info(name, dtype, shape)


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


def add() -> bytes:
    """y = a + b (broadcasting)."""
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    return checked(nodes, [_io("a", F, ["n"]), _io("b", F, ["m"])], [_io("y", F, ["k"])])


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


# -- the rule, on graphs ------------------------------------------------------------------------------


def test_float_arithmetic_is_direct_safe() -> None:
    assert direct_safe(read_graph(affine()), BOUND) == ""
    assert direct_safe(read_graph(matmul()), BOUND) == ""
    assert direct_safe(read_graph(chain(MAX_NODES)), BOUND) == ""


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (int_div(), "not a float tensor"),
        (expand(), "op Expand is not in the direct allowlist"),
        (reshape(), "op Reshape is not in the direct allowlist"),
        (fill(), "op ConstantOfShape is not in the direct allowlist"),
        (loop(), "op Loop is not in the direct allowlist"),
        (chain(MAX_NODES + 1), f"{MAX_NODES + 1} nodes"),
    ],
    ids=["int-div", "expand", "reshape", "constant-of-shape", "loop", "too-many-nodes"],
)
def test_each_exclusion_is_named(data: bytes, why: str) -> None:
    assert why in direct_safe(read_graph(data), BOUND)


def test_initializers_past_the_bound_are_not_direct() -> None:
    assert "initializers take" in direct_safe(read_graph(affine(k=1000)), 1000 * 3 * 4 - 1)
    assert direct_safe(read_graph(affine(k=1000)), 1000 * 3 * 4 + 12) == ""


def test_a_call_is_small_by_its_shapes() -> None:
    lane = DirectLane(max_bytes=BOUND)
    g = read_graph(matmul())
    v = _Variant(g, Plan("mm", matmul(), None))  # type: ignore[arg-type]
    assert lane.small(v, ((4, 8), (8, 4)))
    assert not lane.small(v, ((200, 200), (200, 200)))  # 16e6 FLOPs, under a MiB: past the FLOP bound
    assert not lane.small(v, ((1, 3_000_000), (3_000_000, 1)))  # 6e6 FLOPs, 24 MB of arguments
    assert not lane.small(v, ((4, 8), (9, 4)))  # inconsistent: no shape inferred, so not small
    g = read_graph(add())
    assert not DirectLane(max_bytes=1000).small(_Variant(g, None), ((100,), (100,)))  # type: ignore[arg-type]
    assert DirectLane(max_bytes=1200).small(_Variant(g, None), ((100,), (100,)))  # type: ignore[arg-type]


def _model(nodes: list, inputs: list, outputs: list, inits: list = (), sparse: list = ()) -> bytes:
    """A plan made without onnx's checker (some of these it would refuse before the worker could)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), sparse_initializer=list(sparse))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_what_the_rule_cannot_see_or_count_is_not_direct() -> None:
    """float16 (computed through float32 copies onnxruntime inserts), attributes the shape rules do not read,
    sparse initializers (densified when the session is made) and inputs that are also initializers."""
    h16 = TensorProto.FLOAT16
    neg16 = _model([helper.make_node("Neg", ["x"], ["y"])], [_io("x", h16, ["n"])], [_io("y", h16, ["n"])])
    assert "not a float tensor" in direct_safe(read_graph(neg16), BOUND)
    gemm = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, bogus=3)
    odd = _model([gemm], [_io("a", F, [2, 2]), _io("b", F, [2, 2])], [_io("y", F, [2, 2])])
    assert "has attributes ['bogus', 'transB']" in direct_safe(read_graph(odd), BOUND)
    sparse = helper.make_sparse_tensor(f32("v", [1.0], [1]), i64("i", [0]), [1 << 20])
    add_s = helper.make_node("Add", ["x", "s"], ["y"])
    bomb = _model([add_s], [_io("x", F, [1 << 20])], [_io("y", F, [1 << 20])], sparse=[sparse])
    assert "sparse_initializer" in direct_safe(read_graph(bomb), BOUND)
    shadow = _model(
        [helper.make_node("Neg", ["x"], ["y"])], [_io("x", F, [1])], [_io("y", F, [1])], inits=[f32("x", [1.0])]
    )
    assert "an input that is also an initializer" in direct_safe(read_graph(shadow), BOUND)


def test_batched_matmul_is_not_small() -> None:
    """MatMul over batch dimensions: onnxruntime's per-matrix work and offsets are not in the bytes or FLOPs
    counted (a [1000,1,1,1] x [1000,1,1] call passed both bounds and took 0.3 s and +88 MB in the supervisor)."""
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    data = _model(nodes, [_io("a", F, [1000, 1, 1, 1]), _io("b", F, [1000, 1, 1])], [_io("y", F, [1000, 1000, 1, 1])])
    g = read_graph(data)
    assert direct_safe(g, BOUND) == ""
    assert not DirectLane(max_bytes=BOUND).small(_Variant(g, None), ((1000, 1, 1, 1), (1000, 1, 1)))  # type: ignore[arg-type]
    assert not DirectLane(max_bytes=BOUND).small(_Variant(g, None), ((2, 1, 1, 1), (2, 1, 1)))  # type: ignore[arg-type]


def test_a_plan_nobody_holds_any_more_is_forgotten_by_the_runner_and_the_lane() -> None:
    """delete_plan and --idle-ttl alike: Service.unloaded hooks (the supervisor hangs Sandbox.forget and
    DirectLane.forget there) are told of every plan nobody holds, and only of those."""
    from planwire import load_plan
    from planwire.worker import VirtualWorker

    w = VirtualWorker("unload")
    told: list[str] = []
    w.service.unloaded.append(told.append)
    one, two = (w.plan_pointer(load_plan(affine(k))) for k in (4, 5))
    pids = sorted(w.service.plans)
    assert len(pids) == 2 and not told
    (owner,) = w.service.holders._holders[pids[0]]
    w.service._free(owner)  # what --idle-ttl does to a client not seen for that long
    assert sorted(told) == pids and not w.service.plans


# -- on real workers ----------------------------------------------------------------------------------


def _counts(proc) -> dict[str, int]:  # noqa: ANN001
    return query(re.search(r"admin on (\S+)", proc.log()).group(1)).device_copies


@pytest.fixture(params=["tcp", "ipc"])
def pair(request: pytest.FixtureRequest, raw_worker: RawWorker):  # noqa: ANN201
    """A worker with the direct lane (the default) and one without (every run in the sandbox)."""
    extra = ["--run-timeout", "5", "--max-run-memory-mb", "256"]
    lane = raw_worker("lane", kind=request.param, extra=extra)
    sandbox = raw_worker("sandbox", kind=request.param, extra=[*extra, "--direct-max-mb", "0"])
    return lane, sandbox


def test_an_direct_safe_plan_runs_in_the_worker_with_the_sandboxes_results(pair) -> None:
    (lane, peer), (boxed, other) = pair
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 5, 64)]
    outs = []
    for p in (peer, other):
        plan = p.register(affine(), name="affine")["plan"]
        got = []
        for i, x in enumerate(xs):
            p.put(f"x{i}", x)
            got.append(p.run(plan, [f"x{i}"], [f"y{i}"], fetch=[0]).array_list()[0])
            got.append(p.get1(f"y{i}"))
        outs.append(got)
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)  # the same kernels and options: the same bits
    x = xs[2]
    want = np.maximum(
        x @ np.array([float(i % 7 - 3) / 4 for i in range(12)], np.float32).reshape(4, 3) + [0.5, -0.25, 0], 0
    )
    want = np.exp(want - want.max(-1, keepdims=True))
    np.testing.assert_allclose(outs[0][-1], want / want.sum(-1, keepdims=True), rtol=1e-5)
    counts, sandboxed = _counts(lane), _counts(boxed)
    assert counts["direct_runs"] == 3, counts
    assert counts["uploads"] == 0 and counts["held"] == 0, counts  # nothing crossed to the runner
    assert "direct_runs" not in sandboxed and sandboxed["uploads"] == 3, sandboxed


def test_an_exported_mlp_runs_direct_and_matches_eager_torch(raw_worker: RawWorker) -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    import planwire as sy
    from planwire.transport import connect

    class Net(sy.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):  # noqa: ANN001, ANN201
            return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)

    torch.manual_seed(0)
    net = Net()
    net.build(torch.randn(3, 8), dynamic_axes=[{0}])
    proc, _ = raw_worker("mlp", kind="tcp")
    w = connect(proc.url, timeout=30)
    try:
        ptr = net.send(w)
        for n in (1, 2, 7, 100):
            x = torch.randn(n, 8)
            want = F.softmax(net.fc2(F.relu(net.fc1(x))), dim=-1).detach()
            torch.testing.assert_close(ptr(w.put(x)).get(), want)
    finally:
        w.close()
    assert _counts(proc)["direct_runs"] == 4


@pytest.mark.parametrize(
    ("plan", "args"),
    [
        (expand, [np.ones(4, np.float32), np.array([4], np.int64)]),
        (reshape, [np.ones(4, np.float32)]),
        (fill, [np.ones(4, np.float32), np.array([4], np.int64)]),
        (matmul, [np.ones((300, 300), np.float32), np.ones((300, 300), np.float32)]),  # 54e6 FLOPs
    ],
    ids=["expand", "reshape", "constant-of-shape", "big-matmul"],
)
def test_excluded_plans_and_big_calls_run_in_the_sandbox(pair, plan, args) -> None:  # noqa: ANN001
    (lane, peer), _ = pair
    pid = peer.register(plan())["plan"]
    peer.put("x", args[0])
    (y,) = peer.run(pid, ["x", *args[1:]], ["y"], fetch=[0]).array_list()
    want = args[0] @ args[1] if plan is matmul else args[0] + (0 if plan is fill else 1)
    np.testing.assert_allclose(y, want)
    counts = _counts(lane)
    assert counts["direct_runs"] == 0 and counts["uploads"] >= 1, counts


def test_the_integer_division_trap_goes_to_the_sandbox_and_the_worker_survives(pair) -> None:
    (lane, peer), _ = pair
    safe = peer.register(affine())["plan"]
    peer.put("x", np.ones((2, 4), np.float32))
    peer.run(safe, ["x"], ["y"])
    pid = peer.register(int_div(), name="div")["plan"]
    header, frames = peer.run_header(pid, [np.array([np.iinfo(np.int64).min]), np.array([-1])], ["q"])
    reply = peer.error(header, frames, code="plan_crashed")
    assert "div" in reply["message"], reply
    assert peer.ok({"type": "ping"})["type"] == "ok"
    np.testing.assert_array_equal(peer.get1("x"), np.ones((2, 4), np.float32))
    assert peer.get1("y").shape == (2, 3)
    assert _counts(lane)["direct_runs"] == 1


def softmax_any() -> bytes:
    """Softmax over axis 1 of an input of unknown rank: onnxruntime can check the axis only when it runs."""
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=1)]
    io = [helper.make_tensor_value_info(n, F, None) for n in ("x", "y")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", io[:1], io[1:]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_a_run_that_fails_in_the_lane_gets_the_sandboxes_answer(pair) -> None:
    """Softmax(axis=1) of a vector: onnxruntime refuses it as it runs; the lane hands it to the sandbox,
    whose answer (and failed output) is the one a worker without the lane gives."""
    answers = []
    for proc, peer in pair:
        pid = peer.register(softmax_any())["plan"]
        peer.put("y", np.zeros(1, np.float32))
        reply = peer.error(*peer.run_header(pid, [np.ones(3, np.float32)], ["y"]), code="run_failed")
        failed = peer.error({"type": "get", "keys": ["y"]}, code="run_failed")
        answers.append([text.replace(repr(proc.id), "W") for text in (reply["message"], failed["message"])])
        (y,) = peer.run(pid, [np.ones((2, 4), np.float32)], ["z"], fetch=[0]).array_list()  # good shapes
        np.testing.assert_allclose(y, np.full((2, 4), 0.25, np.float32))
    assert answers[0] == answers[1]
    counts = _counts(pair[0][0])
    assert counts["direct_fallbacks"] == 1 and counts["direct_runs"] == 1, counts


def test_order_holds_across_the_lanes(pair) -> None:
    """One burst: a sandboxed run, an direct-safe run that reads its output (it waits for it, and goes to
    the sandbox: only the runner holds that output), a put, an direct run on what was put, a get: every
    reply in order, every value the one its predecessors left."""
    (lane, peer), _ = pair
    slow = peer.register(reshape())["plan"]
    fast = peer.register(add())["plan"]
    desc, data = encode(np.full(2, 5, np.float32))
    sent = [
        peer.send(*peer.run_header(slow, [np.arange(4, dtype=np.float32)], ["a"])),
        peer.send(*peer.run_header(fast, ["a", np.ones(1, np.float32)], ["b"])),
        peer.send({"type": "put", "tensors": [{"key": "c", **desc, "frame": 0}]}, [data]),
        peer.send(*peer.run_header(fast, ["c", np.ones(1, np.float32)], ["d"], fetch=[0])),
        peer.send({"type": "get", "keys": ["b"]}),
    ]
    replies = [peer.recv() for _ in sent]
    assert [r["re"] for r in replies] == sent
    assert [r.kind for r in replies] == ["ok", "ok", "ok", "tensors", "tensors"], replies
    np.testing.assert_array_equal(replies[3].array_list()[0], np.full(2, 6, np.float32))
    np.testing.assert_array_equal(replies[4].array_list()[0], np.arange(4, dtype=np.float32) + 2)
    assert _counts(lane)["direct_runs"] >= 1


def test_ownership_and_quotas_hold_in_the_lane(raw_worker: RawWorker) -> None:
    from tests.conformance.wire import Peer

    proc, peer = raw_worker("own", kind="tcp", extra=["--max-client-store-mb", "1"])
    pid = peer.register(add())["plan"]
    peer.put("x", np.ones(4, np.float32))
    with Peer(proc.url, timeout=30) as other:  # another client: x is not its key, the plan not its plan
        other.register(add())
        other.error(*other.run_header(pid, ["x", np.ones(1, np.float32)], ["y"]), code="unknown_tensor")
    big = np.ones(200_000, np.float32)  # 0.8 MB stored: the output would pass the client's 1 MB quota
    peer.put("big", big)
    peer.error(*peer.run_header(pid, ["big", np.ones(1, np.float32)], ["y2"]), code="quota_exceeded")
    peer.error({"type": "get", "keys": ["y2"]}, code="run_failed")
    assert _counts(proc)["direct_runs"] == 1, _counts(proc)
