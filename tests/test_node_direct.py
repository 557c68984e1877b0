"""The Node.js worker's direct lane (worker/node/src/direct.js): a small run of a plan of float ops that cannot
trap or allocate by data runs in the worker itself, without the sandboxed runner's hop; anything else still
goes to the runner. Which lane ran a run is read from the worker's debug log (one line per direct run; one
line per plan the lane refuses, saying why). Real worker processes, real onnxruntime."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from planwire.worker.admin import query
from tests.conformance.wire import SIGNATURE, Peer
from tests.conformance.workers import NodeWorkerProcess, WorkerProcess, node_missing
from tests.direct_plans import cases, constant, halve, weights
from tests.test_containment import INT64_MIN, div_plan

pytestmark = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "")
DIRECT = re.compile(r"run #(\d+) of plan '([^']*)': direct")
RNG = np.random.default_rng(13)


def _model(nodes: list, inputs: list, outputs: list, inits: list = ()) -> bytes:
    graph = helper.make_graph(nodes, "plan", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _io(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name: str, a: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(a, name)


W1 = RNG.standard_normal((8, 16)).astype(np.float32)
B1 = RNG.standard_normal(16).astype(np.float32)
W2 = RNG.standard_normal((16, 4)).astype(np.float32)
B2 = RNG.standard_normal(4).astype(np.float32)


def mlp_plan() -> bytes:
    """softmax(relu(x @ W1 + b1) @ W2^T^T + b2) over a batch axis N, through every shape rule the lane has:
    broadcasting Add, MatMul, Gemm with transB, Transpose, Softmax, Sigmoid and Max."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("Gemm", ["h", "w2t", "b2"], ["z"], transB=1),
        helper.make_node("Softmax", ["z"], ["p"], axis=-1),
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("Max", ["s", "p"], ["m"]),
    ]
    inits = [_const("w1", W1), _const("b1", B1), _const("w2", W2), _const("b2", B2)]
    return _model(nodes, [_io("x", ["N", 8])], [_io("p", ["N", 4]), _io("m", ["N", 4])], inits)


def mlp_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.maximum(x @ W1 + B1, 0) @ W2 + B2
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return p, np.maximum(1 / (1 + np.exp(-z)), p)


def reshape_plan() -> bytes:
    """Reshape [N] to [N/2, 2] then abs: a shape read from a tensor's values is not direct."""
    shape = _const("shape", np.array([-1, 2], np.int64))
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Abs", ["r"], ["y"])]
    return _model(nodes, [_io("x", ["N"])], [_io("y", ["M", 2])], [shape])


def expand_plan() -> bytes:
    """x expanded to [3, N]: Expand allocates by a tensor's values."""
    shape = _const("shape", np.array([3, 1], np.int64))
    return _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [_io("x", ["N"])], [_io("y", [3, "N"])], [shape])


def test_the_rule_decides_each_case_of_the_shared_table():
    """The Python worker's decision (tests/test_direct.py) on every case of tests/direct_cases.json: the rule
    of src/direct.js asked directly, through tests/direct_rule.mjs."""
    table = list(cases())
    calls = [
        {"data": base64.b64encode(c.data()).decode(), "shapes": [list(s) for s in c.shapes], "max_bytes": c.max_bytes}
        for c in table
    ]
    driver = Path(__file__).with_name("direct_rule.mjs")
    out = subprocess.run(
        [shutil.which("node") or "node", str(driver)],
        input=json.dumps(calls).encode(),
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    got = json.loads(out.stdout)
    assert len(got) == len(table)
    wrong = [f"{c.id} ({c.why}): {d}" for c, d in zip(table, got, strict=True) if d != c.decision]
    assert not wrong, wrong


def direct_runs(w: NodeWorkerProcess, plan: str) -> list[int]:
    """The ids of the runs of plan (by name) the worker ran direct, from its debug log."""
    return [int(m.group(1)) for m in DIRECT.finditer(w.log()) if m.group(2) == plan]


def node(*extra: str) -> NodeWorkerProcess:
    return NodeWorkerProcess("direct", extra=list(extra), log_level="debug")


def test_an_direct_safe_plan_gives_the_sandboxs_numbers_and_the_python_workers():
    """The lane changes where a run executes, nothing else: the same outputs, bit for bit, as the runner of a
    worker without the lane (--direct-max-mb 0), close to the Python worker's and to numpy; stored outputs,
    ``fetch`` and ``inline_max`` as on the sandboxed path; several batch sizes through one plan."""
    data = mlp_plan()
    xs = [RNG.standard_normal((n, 8)).astype(np.float32) for n in (1, 5, 32)]
    got: dict[str, list] = {}
    workers = {
        "direct": lambda: node(),
        "sandbox": lambda: node("--direct-max-mb", "0"),
        "python": lambda: WorkerProcess("py"),
    }
    for side, start in workers.items():
        with start() as w, Peer(w.url) as p:
            pid = p.register(data, name="mlp")["plan"]
            got[side] = []
            for i, x in enumerate(xs):
                p.put(f"x{i}", x)
                got[side].append(p.run(pid, [f"x{i}"], [f"p{i}", f"m{i}"], fetch=[0]).array_list()[0])
                got[side].append(p.get1(f"m{i}"))  # stored as the run left it
            header, frames = p.run_header(pid, [xs[0]], ["q", "r"])
            reply = p.request({**header, "inline_max": 1024}, frames)  # small outputs come back unasked
            got[side] += reply.array_list()
            more = p.register(constant(), name="more")["plan"]
            got[side] += p.run(more, [xs[1][:, :3]], ["y"], fetch=[0]).array_list()
            if isinstance(w, NodeWorkerProcess):
                with Peer(w.url):
                    status = query(re.search(r"admin on (\S+)", w.log()).group(1))
                direct = side == "direct"
                assert len(direct_runs(w, "mlp")) == (len(xs) + 1 if direct else 0), w.log()
                assert len(direct_runs(w, "more")) == (1 if direct else 0), w.log()
                if direct:
                    assert status.device_copies == {"direct_runs": len(xs) + 2, "direct_fallbacks": 0}
                else:
                    assert status.device_copies.get("direct_runs", 0) == 0
    for a, b, c in zip(got["direct"], got["sandbox"], got["python"], strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    for i, x in enumerate(xs):
        p_ref, m_ref = mlp_reference(x)
        np.testing.assert_allclose(got["direct"][2 * i], p_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["direct"][2 * i + 1], m_ref, rtol=1e-4, atol=1e-6)


def test_integer_division_goes_to_the_runner_and_its_trap_costs_that_run_only():
    """Div of INT64_MIN by -1 traps (SIGFPE): an integer plan is never direct, so the runner takes the crash
    and the worker answers plan_crashed, keeps its tensors and runs a float plan direct afterwards."""
    with node() as w, Peer(w.url) as p:
        p.put("keep", np.arange(3, dtype=np.float32))
        div = p.register(div_plan(TensorProto.INT64), name="div")["plan"]
        reply = p.error(*p.run_header(div, [np.array([INT64_MIN]), np.array([-1])], ["q"]), code="plan_crashed")
        assert "'div'" in reply["message"] and "SIGFPE" in reply["message"], reply["message"]
        assert "plan 'div' runs in the runner: value a is not float32 or float64" in w.log()
        assert not direct_runs(w, "div")
        assert p.run(div, [np.array([7]), np.array([-2])], ["q"], fetch=[0]).array_list()[0].tolist() == [
            -3
        ]  # C division
        mlp = p.register(mlp_plan(), name="mlp")["plan"]
        p.run(mlp, [np.ones((2, 8), np.float32)], ["p", "m"])
        assert len(direct_runs(w, "mlp")) == 1
        np.testing.assert_array_equal(p.get1("keep"), np.arange(3, dtype=np.float32))
        assert w.proc.poll() is None


@pytest.mark.parametrize(("plan", "op"), [(reshape_plan, "Reshape"), (expand_plan, "Expand")])
def test_plans_that_size_values_from_tensor_contents_go_to_the_runner(plan, op):
    with node() as w, Peer(w.url) as p:
        pid = p.register(plan(), name=op.lower())["plan"]
        y = p.run(pid, [np.array([-1.0, 2.0, -3.0, 4.0], np.float32)], ["y"], fetch=[0]).array_list()[0]
        assert y.shape == ((2, 2) if op == "Reshape" else (3, 4))
        assert f"plan '{op.lower()}' runs in the runner: op {op} is not in the direct allowlist" in w.log()
        assert not direct_runs(w, op.lower())


def test_a_call_past_the_flop_or_byte_bound_goes_to_the_runner():
    """The per-call check: the same MatMul plan is direct on 8 rows (262,144 FLOPs) and not on 128 rows
    (4,194,304 FLOPs, past 2e6); an elementwise call of 2 MiB is direct under the default bound (8 MiB)
    and not under --direct-max-mb 1."""
    with node() as w, Peer(w.url) as p:
        mm = p.register(weights(), name="mm")["plan"]
        small, big = (np.full((n, 128), 0.5, np.float32) for n in (8, 128))
        r_small = p.send(*p.run_header(mm, [small], ["s"], fetch=[0]))
        assert p.recv().array_list()[0].tolist() == (small * 2).tolist()
        r_big = p.send(*p.run_header(mm, [big], ["b"], fetch=[0]))
        assert p.recv().array_list()[0].tolist() == (big * 2).tolist()
        assert direct_runs(w, "mm") == [r_small], (direct_runs(w, "mm"), r_small, r_big)
    wide = np.linspace(-1, 1, 1 << 19, dtype=np.float32)  # 2 MiB in, 2 MiB out: 524,288 FLOPs
    for bound, direct in (("8", True), ("1", False)):
        with node("--direct-max-mb", bound) as w, Peer(w.url) as p:
            pid = p.register(halve(), name="fdiv")["plan"]
            p.put("a", wide)
            y = p.run(pid, ["a"], ["y"], fetch=[0]).array_list()[0]
            np.testing.assert_array_equal(y, wide / -2)
            assert bool(direct_runs(w, "fdiv")) == direct, (bound, w.log()[-2000:])


def test_runs_pipelined_behind_a_runner_run_keep_their_order_and_outputs():
    """A run behind one still in the runner is not direct, even when it is small: it would overtake it.
    Here a small MLP run writing the same key as a big MatMul sent before it: the key holds the MLP's
    result; a chained run waits for its argument; the replies come in the order of the requests."""
    with node() as w, Peer(w.url) as p:
        mm = p.register(weights(), name="mm")["plan"]
        mlp = p.register(mlp_plan(), name="mlp")["plan"]
        big = np.full((128, 128), 0.25, np.float32)
        ones = np.ones((3, 8), np.float32)
        sent = [p.send(*p.run_header(mm, [big], ["y"]))]  # past the FLOP bound: the runner
        sent.append(p.send(*p.run_header(mlp, [ones], ["y", "m"], fetch=[1])))  # small, but behind it
        sent.append(p.send(*p.run_header(mm, [big], ["z"])))
        sent.append(p.send(*p.run_header(mm, ["z"], ["z"])))  # reads and rewrites z: after the one before
        sent.append(p.send({"type": "get", "keys": ["y", "z"]}))
        replies = [p.recv() for _ in sent]
        assert [r["re"] for r in replies] == sent
        p_ref, m_ref = mlp_reference(ones)
        np.testing.assert_allclose(replies[1].array_list()[0], m_ref, rtol=1e-4, atol=1e-6)
        y, z = replies[4].array_list()
        np.testing.assert_allclose(y, p_ref, rtol=1e-4, atol=1e-6)  # the later write wins
        np.testing.assert_array_equal(z, big * 4)
        assert direct_runs(w, "mlp") == [], w.log()[-3000:]
        alone = p.send(*p.run_header(mlp, [ones], ["y", "m"]))  # nothing in flight now: direct
        p.recv()
        assert direct_runs(w, "mlp") == [alone]


def test_direct_results_are_kept_under_state_dir_across_kill_9(tmp_path):
    """An direct run's outputs are written through to --state-dir before its reply, as the runner's are."""
    state = str(tmp_path / "state")
    with node("--state-dir", state) as w, Peer(w.url) as p:
        identity = p.request({"type": "hello", "version": 1})["identity"]
        pid = p.register(mlp_plan(), name="mlp")["plan"]
        p.run(pid, [np.ones((2, 8), np.float32)], ["p", "m"])
        assert len(direct_runs(w, "mlp")) == 1
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        session = p.session
    with node("--state-dir", state) as w, Peer(w.url) as p:
        p.request({"type": "hello", "version": 1, "identity": identity})
        assert p.session == session
        np.testing.assert_allclose(p.get1("p"), mlp_reference(np.ones((2, 8), np.float32))[0], rtol=1e-4, atol=1e-6)
        p.run(pid, [np.ones((2, 8), np.float32)], ["p", "m"])  # the restored plan runs direct too
        assert len(direct_runs(w, "mlp")) == 1


@pytest.mark.parametrize("key", ["__proto__", "constructor", "toString", "hasOwnProperty"])
def test_header_keys_named_like_object_prototype_members_are_unknown_fields(key):
    """The Node worker parses headers into plain objects (fast to read, src/json.js): a key named like a
    member of Object.prototype is still an own field of the header, refused as unknown as the Python worker
    refuses it; written twice it is a duplicate key (the Python worker names the unknown field first)."""
    for start in (lambda: node(), lambda: WorkerProcess("py")):
        with start() as w, Peer(w.url) as p:
            reply = p.error({"type": "ping", key: {"type": "put"}}, code="invalid_message")
            assert f"unknown field `{key}`" in reply["message"], reply["message"]
            if isinstance(w, NodeWorkerProcess):
                p.send_frames([SIGNATURE, f'{{"type": "ping", "id": 7, "{key}": 1, "{key}": 2}}'.encode()])
                reply = p.recv()
                assert reply["code"] == "bad_header" and "duplicate key" in reply["message"], reply
            assert p.request({"type": "ping"}).kind == "ok"
