"""The Node.js worker keeps the data owner's rules as the Python plan-worker does (issue 12 through issue 13):
the same audit records for the same runs (fields, values, messages, epsilon), the Gaussian noise it names,
the --insecure rule, and CURVE clients kept apart. Real processes of both workers; the Node ones skip,
saying why, without node or worker/node/node_modules. (The protocol's rules themselves are checked by
tests/conformance against both workers, and tests/test_owners.py and tests/test_policy.py run their
--idle-ttl and SIGHUP tests on both.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from onnx import TensorProto as TP
from onnx import helper

import planwire
from planwire.transport import PrivateDataError, UnknownTensorError
from planwire.worker.flow import analyze
from tests import handmade
from tests.conformance import plans
from tests.conformance.workers import NODE_BIN, NODE_DIR, NodeWorkerProcess, node_missing, start
from tests.test_owners import two_curve_clients
from tests.test_policy import copy_plan, run_step, step_plan

pytestmark = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "")

SIGMA, CLIP = 1.1, 1.0


def policy_text() -> str:
    return f"""
[[plan]]
fingerprint = "{copy_plan().variants[0].id}"
name = "copy"
outputs.y = "as_is"

[[plan]]
fingerprint = "{step_plan().variants[0].id}"
name = "step"
outputs.new_w = {{ update = "w" }}
update = {{ clip_norm = {CLIP}, noise_multiplier = {SIGMA} }}
inputs.lr = {{ min = 0.0, max = 1.0 }}
"""


def audited_session(kind: str, tmp: Path) -> list[dict]:
    """The same client session against a worker of ``kind``: its audit records."""
    tmp.mkdir()
    np.save(tmp / "secret.npy", np.float32([0.5, -0.25, 2.0]))
    (tmp / "policy.toml").write_text(policy_text())
    audit = tmp / "audit.jsonl"
    extra = ["--policy", str(tmp / "policy.toml"), "--audit", str(audit), "--plans-dir", "none"]
    data = [f"{tmp / 'secret.npy'}:secret"]
    with start(kind, f"audit-{kind}", data=data, extra=extra) as proc, planwire.connect(proc.url, timeout=20) as c:
        (x,) = c.search("secret")
        run_step(c, copy_plan(), x, outputs=["copied"])
        assert c.fetch_arrays(["copied"])[0].tolist() == [0.5, -0.25, 2.0]  # released as_is
        run_step(c, handmade.double_abs(), x, outputs=["doubled"])
        with pytest.raises(PrivateDataError):
            c.fetch_arrays(["doubled"])  # no rule for this plan
        step = step_plan()
        with pytest.raises(PrivateDataError, match="'lr' in \\[0.0, 1.0\\]"):
            run_step(c, step, np.zeros(3, np.float32), x, np.float32(2.0), outputs=["w0", "l0"], fetch=[0])
        for i in (1, 2):  # two noised releases: the client's epsilon grows
            run_step(c, step, np.zeros(3, np.float32), x, np.float32(0.5), outputs=[f"w{i}", f"l{i}"])
            c.fetch_arrays([f"w{i}"], keep=True)
            c.fetch_arrays([f"w{i}"], keep=True)  # read twice: released (and accounted) once
    return [json.loads(line) for line in audit.read_text().splitlines()]


def test_the_audit_log_is_the_python_workers_record_for_record(tmp_path):
    python, node = (audited_session(kind, tmp_path / kind) for kind in ("python", "node"))
    assert [r["event"] for r in node] == ["released", "refused", "refused", "released", "released"]
    assert len(python) == len(node)
    for p, n in zip(python, node, strict=True):
        assert list(p) == list(n)  # the same fields in the same order
        for field in p:
            if field == "epsilon":
                assert n[field] == pytest.approx(p[field], rel=1e-9)
            elif field not in ("time", "client"):  # the client's label is its connection
                assert n[field] == p[field], field
        assert n["client"].startswith("conn:")
    accountant = rdp_privacy_accountant.RdpAccountant()
    for record in node[-2:]:  # the epsilon dp-accounting computes for 1, then 2 releases at this noise
        accountant.compose(dp_event.GaussianDpEvent(SIGMA))
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
        assert record["noise_multiplier"] == SIGMA and record["clip_norm"] == CLIP and record["delta"] == 1e-5


def test_the_node_worker_clips_and_noises_an_update_once_with_the_named_noise(tmp_path):
    plan = step_plan()
    n, clip, sigma = 20_000, 2.0, 0.5
    secret = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    np.save(tmp_path / "secret.npy", secret)
    (tmp_path / "policy.toml").write_text(
        f'[[plan]]\nfingerprint = "{plan.variants[0].id}"\noutputs.new_w = {{ update = "w" }}\n'
        f"update = {{ clip_norm = {clip}, noise_multiplier = {sigma} }}\n"
    )
    extra = ["--policy", str(tmp_path / "policy.toml"), "--plans-dir", "none"]
    data = [f"{tmp_path / 'secret.npy'}:secret"]
    with NodeWorkerProcess("noise", data=data, extra=extra) as proc, planwire.connect(proc.url, timeout=20) as c:
        (x,) = c.search("secret")
        run_step(c, plan, np.zeros(n, np.float32), x, np.float32(1.0), outputs=["w", "loss"])
        released = c.fetch_arrays(["w"], keep=True)[0]
        assert np.array_equal(c.fetch_arrays(["w"], keep=True)[0], released)  # noised once
        with pytest.raises(PrivateDataError):
            c.fetch_arrays(["loss"], keep=True)  # no rule releases it
    clipped = secret.astype(np.float64) * clip / np.linalg.norm(secret)
    noise = released.astype(np.float64) - clipped
    # Gaussian noise of std sigma * clip on every coordinate: 20k samples pin mean and std to within 5 sigma
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(n)
    assert abs(noise.std() / (sigma * clip) - 1) < 5 / np.sqrt(2 * n)


def test_a_network_address_without_curve_is_refused_with_the_python_workers_line(tmp_path):
    args = ["--listen", "tcp://0.0.0.0:0", "--admin", "none"]
    python = subprocess.run(
        [sys.executable, "-m", "planwire.worker", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    node = subprocess.run(["node", str(NODE_BIN), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert python.returncode == node.returncode == 2
    assert node.stderr == python.stderr
    assert "reachable from the network" in node.stderr and "plan-worker keys" in node.stderr
    with NodeWorkerProcess("open", listen="tcp://0.0.0.0:0", extra=["--insecure"]) as proc:
        assert "--insecure: tcp://0.0.0.0:0 reachable from the network without CURVE" in proc.log()


def test_curve_clients_see_only_their_own_and_keep_them_by_identity(tmp_path):
    extra, alice, bob = two_curve_clients(tmp_path)
    with NodeWorkerProcess("curve-owners", extra=extra) as proc:
        with planwire.connect(proc.url, timeout=10, curve=alice) as a:
            # zeromq.js does not expose ZAP's User-Id: the Node worker issues identities under CURVE too
            identity = a.identity
            assert len(identity) >= 32
            a.put_many({"x": np.arange(3)}, tags=["alice"], owned=False)  # stays when this connection closes
        with planwire.connect(proc.url, timeout=10, curve=bob) as b:
            assert b.search("alice") == []
            with pytest.raises(UnknownTensorError):
                b.fetch_arrays(["x"], keep=True)
        with planwire.connect(proc.url, timeout=10, curve=alice) as a2:
            assert a2.search("alice") == []  # the same key on a new connection is a new client (PROTOCOL.md §12)...
            a2.identity = identity
            a2.hello()  # ...until it presents its identity
            (p,) = a2.search("alice")
            assert p.get().tolist() == [0, 1, 2]


def _nested_control_flow() -> bytes:
    """(x, w, n, c) -> (y, z): y from a Loop whose body reads x and, inside an If, w; z = n + n."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TP.FLOAT, [3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["acc"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TP.FLOAT, [3])]
    )
    body = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["picked"], then_branch=then_g, else_branch=else_g),
            helper.make_node("Add", ["picked", "x"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TP.INT64, []),
            helper.make_tensor_value_info("cond_in", TP.BOOL, []),
            helper.make_tensor_value_info("acc", TP.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("acc_out", TP.FLOAT, [3]),
        ],
    )
    return plans.serialize(
        plans.model(
            [
                helper.make_node("Loop", ["n", "", "zeros"], ["y"], body=body),
                helper.make_node("Add", ["n", "n"], ["z"]),
            ],
            [("x", "float", [3]), ("w", "float", [3]), ("n", "int64", []), ("c", "bool", [])],
            [("y", "float", [3]), ("z", "int64", [])],
            [helper.make_tensor("zeros", TP.FLOAT, [3], [0.0, 0.0, 0.0])],
        )
    )


def test_the_node_worker_computes_the_python_workers_data_flow(tmp_path):
    """src/flow.js against planwire.worker.flow, plan for plan: which outputs depend on which inputs."""
    corpus = {name: data for name, (data, _) in plans.LEAKS.items()}
    corpus |= {
        "training_trick": plans.training_trick(),
        "sum_and_diff": plans.sum_and_diff(),
        "with_metadata": plans.with_metadata(),
        "step": step_plan().variants[0].data,
        "nested_control_flow": _nested_control_flow(),
    }
    cases = []
    for name, data in corpus.items():
        graph = onnx.load_from_string(data).graph
        init = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in init]
        outputs = [o.name for o in graph.output]
        (tmp_path / f"{name}.onnx").write_bytes(data)
        expected = [sorted(d) for d in analyze(data, inputs, outputs).deps]
        cases.append({"file": str(tmp_path / f"{name}.onnx"), "inputs": inputs, "outputs": outputs, "want": expected})
    script = (
        f"import {{ analyze }} from {json.dumps((NODE_DIR / 'src' / 'flow.js').as_uri())};"
        "import { readFileSync } from 'node:fs';"
        "const cases = JSON.parse(readFileSync(0, 'utf8'));"
        "console.log(JSON.stringify(cases.map((c) => analyze(readFileSync(c.file), c.inputs, c.outputs)"
        ".deps.map((d) => [...d].sort((a, b) => a - b)))));"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert {c["file"]: g for c, g in zip(cases, got, strict=True)} == {c["file"]: c["want"] for c in cases}
    nested = next(g for c, g in zip(cases, got, strict=True) if c["file"].endswith("nested_control_flow.onnx"))
    assert nested == [[0, 1, 2, 3], [2]]  # the Loop's body reads x, and w inside its If; z only n


def test_the_node_workers_budget_composes_every_clients_releases_from_a_running_total():
    """As the Python Releaser (tests/test_policy.py): max_epsilon over 200 clients' noised releases, checked
    against a running total kept as each client's releases change (restored ones included)."""
    noise, allowed, clients = 2.0, 300, 200

    def epsilon(count: int) -> float:
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_event.GaussianDpEvent(noise), count)
        return acc.get_epsilon(1e-5)

    budget = (epsilon(allowed) + epsilon(allowed + 1)) / 2
    script = (
        f"import {{ Releaser }} from {json.dumps((NODE_DIR / 'src' / 'release.js').as_uri())};"
        f"const noise = {noise}, budget = {float(budget)!r}, n = {clients}, allowed = {allowed};"
        "const r = new Releaser({ rules: new Map(), delta: 1e-5, maxEpsilon: budget }, null);"
        "const spent = new Map();"
        "for (let i = 0; i < n; i++) spent.set(`c${i}`, new Map([[noise, i < allowed - n ? 2 : 1]]));"
        "r.restore(spent);"
        "const rule = { name: 'step', fingerprint: 'f'.repeat(64), describe: () => 'w: update' };"
        "const pending = { rule, output: 'w' };"
        "const entry = { tensor: { dtype: 'float', shape: [3] } };"
        "let refused = '';"
        "try { r.charge('new', 'w', entry, pending, noise); } catch (e) { refused = e.message; }"
        "r.account('c0', new Map([[noise, 1]]));"  # one client's count goes down: room for one more
        "const events = r.charge('new', 'w', entry, pending, noise);"
        "console.log(JSON.stringify({ total: [...r.total], refused, events: [...events] }));"
    )
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["total"] == [[noise, allowed - 1]]
    assert "all clients' noised releases" in got["refused"] and "max_epsilon" in got["refused"]
    assert got["events"] == [[noise, 1]]


def test_the_node_workers_status_rows_stay_bounded_as_connections_come_and_go():
    """As worker/stats.py: past max_rows the least recently seen connection rows are folded (counted in
    clients_folded), and a row not seen for fold_after goes too."""
    script = (
        f"import {{ Metrics }} from {json.dumps((NODE_DIR / 'src' / 'metrics.js').as_uri())};"
        "const m = new Metrics({ plans: new Map() }, { maxRows: 4 });"
        "m.byPlan.set('p', { runs: 0, failed: 0, clients: new Set(['c0', 'c9']) });"
        "for (let i = 0; i < 10; i++) m.observe(null, 'invalid', `c${i}`, 0);"
        "m.observe(null, 'invalid', 'c7', 0);"  # seen again: the most recent
        "const rows = [...m.byClient.keys()], afterRows = m.folded;"
        "const stale = new Metrics({ plans: new Map() }, { foldAfterMs: 0 });"
        "stale.observe(null, '', 'a', 0); stale.byClient.get('a').last -= 5; stale.observe(null, '', 'b', 0);"
        "console.log(JSON.stringify({ rows, folded: afterRows, plan: [...m.byPlan.get('p').clients],"
        " stale: [...stale.byClient.keys()] }));"
    )
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["rows"] == ["c6", "c8", "c9", "c7"]
    assert got["folded"] == 6
    assert got["plan"] == ["c9"]  # c0's row was folded: no row of a closed connection is kept anywhere
    assert got["stale"] == ["b"]
