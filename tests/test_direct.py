"""The direct lane (worker/direct.py): tiny runs of provably harmless plans run in the supervisor itself.

The rule is checked on graphs (each exclusion named; every case of tests/direct_cases.json, the table the
Node.js worker's lane is checked against too), then on real plan-worker processes: an direct-safe
plan's small calls run in the worker (``direct_runs`` in plan-worker status) with the sandbox's results and
eager torch's; every exclusion goes to the sandbox (the SIGFPE plan among them: the worker survives it);
a failure in the lane is the sandbox's answer; order and ownership hold across both lanes.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from planwire.transport import messages as m
from planwire.transport.graph import read_graph
from planwire.worker.admin import query
from planwire.worker.direct import MAX_NODES, DirectLane, _Variant, direct_safe
from planwire.worker.jobs import Plan, RunJob
from tests.conformance.wire import encode
from tests.conftest import RawWorker
from tests.direct_plans import (
    Case,
    add,
    affine,
    batched,
    cases,
    chain,
    expand,
    fill,
    gemm,
    int_div,
    loop,
    matmul,
    neg16,
    reshape,
    shadow,
    softmax,
    sparse,
)

BOUND = 8 << 20


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


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c.id)
def test_the_rule_decides_each_case_of_the_shared_table(case: Case) -> None:
    """The same decision as worker/node/src/direct.js on every case (tests/test_node_direct.py)."""
    g = read_graph(case.data())
    why = direct_safe(g, case.max_bytes)
    small = not why and DirectLane(max_bytes=case.max_bytes).small(_Variant(g, None), case.shapes)  # type: ignore[arg-type]
    assert ("plan" if why else "direct" if small else "call") == case.decision, (why, case.why)


def test_what_the_rule_cannot_see_or_count_is_not_direct() -> None:
    """float16 (computed through float32 copies onnxruntime inserts), attributes the shape rules do not read,
    sparse initializers (densified when the session is made) and inputs that are also initializers."""
    assert "not a float tensor" in direct_safe(read_graph(neg16()), BOUND)
    assert "has attributes ['bogus', 'transB']" in direct_safe(read_graph(gemm(trans_b=1, bogus=3)), BOUND)
    assert "sparse_initializer" in direct_safe(read_graph(sparse()), BOUND)
    assert "an input that is also an initializer" in direct_safe(read_graph(shadow()), BOUND)


def test_batched_matmul_is_not_small() -> None:
    """MatMul over batch dimensions: onnxruntime's per-matrix work and offsets are not in the bytes or FLOPs
    counted (a [1000,1,1,1] x [1000,1,1] call passed both bounds and took 0.3 s and +88 MB in the supervisor)."""
    g = read_graph(batched())
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


def test_a_call_whose_shapes_do_not_fit_gets_the_sandboxes_answer(pair) -> None:
    """Softmax(axis=1) of a vector: onnxruntime would refuse it as it runs, so the rule gives it to the sandbox
    up front (as the Node.js worker's does), whose answer (and failed output) is the one a worker without
    the lane gives; a call that fits runs direct."""
    answers = []
    for proc, peer in pair:
        pid = peer.register(softmax())["plan"]
        peer.put("y", np.zeros(1, np.float32))
        reply = peer.error(*peer.run_header(pid, [np.ones(3, np.float32)], ["y"]), code="run_failed")
        failed = peer.error({"type": "get", "keys": ["y"]}, code="run_failed")
        answers.append([text.replace(repr(proc.id), "W") for text in (reply["message"], failed["message"])])
        (y,) = peer.run(pid, [np.ones((2, 4), np.float32)], ["z"], fetch=[0]).array_list()  # good shapes
        np.testing.assert_allclose(y, np.full((2, 4), 0.25, np.float32))
    assert answers[0] == answers[1]
    counts = _counts(pair[0][0])
    assert counts["direct_fallbacks"] == 0 and counts["direct_runs"] == 1, counts


def test_a_run_that_fails_in_the_lane_goes_to_the_sandbox() -> None:
    """What onnxruntime refuses in the lane (here: a session it cannot make, from an IR version it does not
    know) is handed back (None: the sandbox runs it and answers as it would anyway), counted as a fallback,
    and those shapes are not tried in the lane again."""
    odd = onnx.load_from_string(softmax())
    odd.ir_version = 99
    data = odd.SerializeToString()
    lane = DirectLane(max_bytes=BOUND)
    job = RunJob(
        m.Run(id=1, plan="odd", args=[], outputs=["y"]), Plan("odd", data, None), [np.ones((2, 4), np.float32)], [None]
    )  # type: ignore[arg-type]
    assert lane.run(job) is None
    assert lane.counts == {"direct_runs": 0, "direct_fallbacks": 1}
    assert lane.run(job) is None
    assert lane.counts == {"direct_runs": 0, "direct_fallbacks": 1}  # not tried again


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
