"""Seeing a worker: `plan-worker status` over the admin socket, Prometheus metrics, and logs that name the
client and plan of every refused request (peer strings escaped) and every refused CURVE key. Real workers."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import planwire
from planwire.transport import CurveRefused
from planwire.transport.auth import client_keys, public_key
from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.server import Server
from planwire.worker import Service
from planwire.worker.admin import ADMIN_SIGNATURE, Status, format_status, query
from planwire.worker.peers import clean
from planwire.worker.process import WorkerProcess
from planwire.worker.stats import Stats
from tests import handmade
from tests.conformance.wire import Peer
from tests.conformance.workers import kinds, node_missing, start

INFO = {  # what plan-worker adds to Stats.snapshot() for a Status (worker/serve.py)
    "worker": "folding",
    "version": "0",
    "protocol": PROTOCOL_VERSION,
    "session": "s",
    "pid": 1,
    "providers": [],
    "endpoints": [],
    "curve": "off",
}
SCRIPT = str(Path(sys.executable).parent / "plan-worker")


def admin_of(w: WorkerProcess) -> str:
    return re.search(r"admin on (\S+)", w.log()).group(1)


def status(addr: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, "status", addr, *extra], capture_output=True, text=True, timeout=60)


def busy_client(url: str, curve=None) -> tuple[Peer, str]:
    """A raw client that stores 2 tensors (12 + 40 bytes), registers double_abs, runs it once fine and once
    on a missing tensor (refused). Returns the peer and the plan id."""
    p = Peer(url, curve=curve)
    p.put("a", np.arange(3, dtype=np.float32))
    p.put("b", np.zeros(5, dtype=np.float64))
    plan = p.register(handmade.double_abs().variants[0].data, name="double_abs")["plan"]
    p.run(plan, [np.ones(4, np.float32)], ["y"])  # stores y: 16 bytes
    p.error(*p.run_header(plan, ["nope"], ["z"]), code="unknown_tensor")
    return p, plan


@pytest.fixture
def own_data(tmp_path) -> str:
    path = tmp_path / "own.npy"
    np.save(path, np.arange(8, dtype=np.float32))  # 32 bytes
    return f"{path}:secret"


def test_status_shows_what_the_worker_holds_for_whom_and_what_ran(own_data):
    with WorkerProcess("ward-7", data=[own_data]) as w:
        addr = admin_of(w)
        path = Path(addr.removeprefix("ipc://"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the operator's only
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        peer, plan = busy_client(w.url)
        with planwire.connect(w.url, timeout=10):  # a second client, that only says hello
            done = status(addr, "--json")
        assert done.returncode == 0, done.stderr
        st = json.loads(done.stdout)
        assert (st["worker"], st["version"], st["protocol"], st["pid"]) == (
            "ward-7",
            planwire.__version__,
            1,
            w.proc.pid,
        )
        assert st["session"] == peer.session and st["providers"] == ["CPUExecutionProvider"]
        assert st["endpoints"] == [w.url] and st["curve"] == "off" and st["uptime_s"] > 0
        assert st["own_data"] == {"tensors": 1, "tensor_bytes": 32, "plans": 0, "plan_bytes": 0}
        assert (st["runs"], st["runs_failed"], st["private_releases"]) == (2, 1, 0)
        assert 0 < st["run_p50_ms"] <= st["run_p99_ms"]
        assert st["requests"] == {"put": 2, "register_plan": 1, "run": 2, "hello": 1}
        busy = next(c for c in st["clients"] if c["requests"] == 5)
        assert re.fullmatch(r"127\.0\.0\.1/fd\d+", busy["client"])
        plan_bytes = len(handmade.double_abs().variants[0].data)
        assert (busy["tensors"], busy["tensor_bytes"], busy["plans"], busy["plan_bytes"]) == (3, 68, 1, plan_bytes)
        assert busy["refused"] == 1
        hello = next(c for c in st["clients"] if c is not busy)
        assert (hello["name"], hello["requests"], hello["tensors"]) == ("planwire", 1, 0)
        assert st["plans"] == [{"plan": plan, "name": "double_abs", "bytes": plan_bytes, "runs": 2, "failed": 1}]

        # a get moves a tensor out; a delete frees one: the view follows
        peer.get1("a")
        peer.ok({"type": "delete", "keys": ["b"]})
        busy_now = next(c for c in query(addr).clients if c.client == busy["client"])
        assert (busy_now.tensors, busy_now.tensor_bytes) == (1, 16)
        # a run refused for writing over the worker's own data changes nobody's holdings
        peer.error(*peer.run_header(plan, [np.ones(8, np.float32)], ["data:own.npy"]), code="forbidden")
        after = query(addr)
        assert after.own_data.tensors == 1 and after.own_data.tensor_bytes == 32
        assert next(c for c in after.clients if c.client == busy["client"]).tensors == 1

        text = status(addr)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0] == f"worker    ward-7 (planwire {planwire.__version__}, protocol 1, pid {w.proc.pid})"
        assert "runs      3 served, 2 failed, p50 " in text.stdout
        assert "own data  1 tensors, 32 B; 0 released to clients (private data gets)" in text.stdout
        assert re.search(rf"  {plan[:12]}  'double_abs' +{plan_bytes} B  3 runs, 2 failed", text.stdout)
        peer.close()
    assert not path.exists()  # removed when the worker stops


def test_gets_of_the_workers_own_data_are_counted_as_releases(own_data):
    with WorkerProcess("public", data=[own_data], extra=["--public"]) as w:
        p = Peer(w.url)
        key = p.ok({"type": "search", "tags": ["secret"]})["tensors"][0]["key"]
        assert p.get1(key, keep=True).tolist() == list(range(8))
        p.get1(key)  # a move of own data is a copy: still there, released twice
        assert query(admin_of(w)).private_releases == 2
        assert query(admin_of(w)).own_data.tensors == 1
        p.close()


def test_the_main_socket_never_answers_admin_requests():
    with WorkerProcess("w") as w:
        p = Peer(w.url)
        reply = p.error({"type": "status"}, code="unknown_type")
        assert "status" in reply["message"]
        p.send_frames([ADMIN_SIGNATURE, b'{"type":"status"}'])
        assert p.recv()["code"] == "bad_signature"
        p.close()


def test_admin_on_loopback_tcp_and_status_of_nothing(tmp_path):
    with WorkerProcess("w", extra=["--admin", "tcp://127.0.0.1:0"]) as w:
        addr = admin_of(w)
        assert addr.startswith("tcp://127.0.0.1:") and not addr.endswith(":0")
        assert query(addr).worker == "w"
    gone = f"ipc://{tmp_path}/none.admin"
    done = status(gone)
    assert done.returncode == 1
    assert done.stderr == (
        f"plan-worker status: no admin socket at '{gone}': is the worker running? "
        "(its log says 'admin on ...' at start)\n"
    )


@pytest.mark.parametrize("kind", kinds())
def test_metrics_in_prometheus_text_format(own_data, kind):
    """The same metrics from both workers (the Node.js one: src/metrics.js)."""
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    with start(kind, "m", data=[own_data], extra=["--metrics", "127.0.0.1:0"]) as w:
        url = re.search(r"metrics on (http://\S+)", w.log()).group(1)
        peer, plan = busy_client(w.url)
        peer.close()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = (("plan", "double_abs"), ("plan_id", plan[:12]))
    assert samples["planwire_runs_total", labels] == 2
    assert samples["planwire_runs_failed_total", labels] == 1
    assert samples["planwire_run_duration_seconds_count", ()] == 2
    assert samples["planwire_run_duration_seconds_bucket", (("le", "+Inf"),)] == 2
    assert samples["planwire_tensors", ()] == 4  # own + a, b, y
    assert samples["planwire_tensor_bytes", ()] == 32 + 12 + 40 + 16
    assert samples["planwire_plans", ()] == 1
    assert samples["planwire_plan_bytes", ()] == len(handmade.double_abs().variants[0].data)
    assert samples["planwire_clients", ()] == 1
    assert samples["planwire_requests_total", (("code", ""), ("type", "put"))] == 2
    assert samples["planwire_requests_total", (("code", "unknown_tensor"), ("type", "run"))] == 1
    assert samples["planwire_private_releases_total", ()] == 0


@pytest.mark.parametrize("kind", kinds())
def test_status_text_says_what_each_workers_runner_and_lane_reported(kind):
    """The device line gives the runner's counts where the worker reports them (the Python worker's runner
    holds tensors between runs); the direct line, the lane's, from either worker. A Node worker reports only
    its lane's counts: its status does not say its runner holds tensors."""
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    with start(kind, "lanes") as w:
        peer, _ = busy_client(w.url)
        peer.close()
        st = query(admin_of(w))
    text = format_status(st)
    assert st.device_copies["direct_runs"] == 1, st.device_copies  # double_abs on 4 floats: the direct lane
    assert "direct    1 tiny runs in the worker process (direct lane), 0 handed to the runner" in text, text
    if kind == "python":
        assert re.search(r"device    \d+ tensors held by the runner; \d+ uploads", text), text
    else:
        assert "held by the runner" not in text and "\ndevice " not in text, text


def test_logs_name_client_and_plan_of_refused_requests_with_peer_strings_escaped():
    with WorkerProcess("w") as w:
        p, plan = busy_client(w.url)
        p.error({"type": "register_plan", "name": "evil\nINFO forged line"}, [b"not onnx"], code="bad_plan")
        p.error({"type": "ping\nFORGED"}, code="unknown_type")
        p.close()
        log = w.log()
    client = r"127\.0\.0\.1/fd\d+"
    assert re.search(
        rf"request #\d+ run from {client} plan 'double_abs' \({plan[:12]}\) refused: .*\[unknown_tensor\]", log
    )
    assert re.search(rf"request #\d+ register_plan from {client} plan 'evil\\nINFO forged line' refused: ", log)
    assert re.search(rf"request #\d+ from {client} refused: .*ping\\nFORGED.*\[unknown_type\]", log)
    assert not any(line.startswith(("INFO forged", "FORGED")) for line in log.splitlines())


def test_curve_clients_are_named_by_key_and_refused_keys_are_logged(tmp_path):
    keys = tmp_path / "keys"
    for args in (
        [str(keys)],
        [str(keys / "clients"), "--name", "alice"],
        [str(tmp_path / "other"), "--name", "mallory"],
    ):
        assert subprocess.run([SCRIPT, "keys", *args], capture_output=True, timeout=60).returncode == 0
    (keys / "clients" / "alice.key_secret").rename(tmp_path / "alice.key_secret")
    extra = ["--curve-secret", str(keys / "worker.key_secret"), "--curve-clients", str(keys / "clients")]
    with WorkerProcess("curve", extra=extra) as w:
        alice = client_keys(str(tmp_path / "alice.key_secret"), str(keys / "worker.key"))
        with planwire.connect(w.url, timeout=10, curve=alice) as c:
            c.put(np.ones(2, np.float32))
            st = query(admin_of(w))
        alice_key = public_key(str(keys / "clients" / "alice.key")).decode()
        assert st.curve == "listed clients"
        assert [(c.client, c.tensors, c.tensor_bytes) for c in st.clients] == [(f"curve:{alice_key}", 1, 8)]
        mallory = client_keys(str(tmp_path / "other" / "mallory.key_secret"), str(keys / "worker.key"))
        with pytest.raises(CurveRefused):  # told at once, not after the timeout
            planwire.connect(w.url, timeout=10, curve=mallory)
        mallory_key = public_key(str(tmp_path / "other" / "mallory.key")).decode()
        log = w.log()
    assert re.search(rf"WARNING planwire.auth: refused CURVE client {re.escape(mallory_key)} from '127\.0\.0\.1'", log)
    assert alice_key not in log.split("refused CURVE", 1)[-1]


def test_admin_socket_of_a_live_worker_is_not_taken_over(tmp_path):
    addr = f"ipc://{tmp_path}/a.admin"
    with WorkerProcess("first", extra=["--admin", addr]):
        done = subprocess.run(
            [SCRIPT, "--listen", "tcp://127.0.0.1:0", "--admin", addr], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2
        assert done.stderr.splitlines()[0] == (
            f"plan-worker: --admin '{addr}': a live process (another worker?) answers there: "
            "stop it or choose another path"
        )
        assert query(addr).worker == "first"


def test_clean_escapes_control_characters_only():
    assert clean("plain name ü") == "plain name ü"
    assert clean("a\nb\r\x1b[31m\u2028") == "a\\nb\\r\\x1b[31m\\u2028"


def test_status_text_escapes_what_clients_chose():
    with WorkerProcess("w") as w:
        p = Peer(w.url)
        p.ok({"type": "hello", "version": 1, "client": "evil\nworker    forged\x1b[2J"})
        done = status(admin_of(w))
        p.close()
    assert done.returncode == 0, done.stderr
    assert "evil\\nworke" in done.stdout  # the NAME column is 12 characters wide
    assert "\x1b" not in done.stdout and not any(ln.startswith("worker    forged") for ln in done.stdout.splitlines())


def test_status_per_owner_shows_holdings_last_seen_releases_and_privacy_budget(tmp_path):
    """Two clients of a worker with private data and a policy that releases a noised update: each owner's
    row has its own tensors and plans, when it was last seen, its releases, and the epsilon the audit log
    recorded for it (only the client that got a noised release has spent any)."""
    from tests.test_policy import rules, step_plan

    n = 32
    data = tmp_path / "secret.npy"
    np.save(data, np.random.default_rng(0).standard_normal(n).astype(np.float32))
    plan = step_plan()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        rules(
            'outputs.new_w = { update = "w" }\nupdate = { clip_norm = 1.0, noise_multiplier = 2.0 }',
            plan.variants[0].id,
        )
    )
    audit = tmp_path / "audit.jsonl"
    extra = ["--policy", str(policy), "--audit", str(audit), "--plans-dir", str(tmp_path / "plans")]
    with (
        WorkerProcess("owners", data=[f"{data}:secret"], extra=extra) as w,
        planwire.connect(w.url, timeout=60) as a,  # the first noised release imports dp-accounting
        planwire.connect(w.url, timeout=60) as b,
    ):
        (x,) = a.search("secret")
        a.ensure_plan(plan.variants[0], plan.name)
        w_ptr, _ = a.run(plan.variants[0], [np.zeros(n, np.float32), x, np.float32(0.1)], outputs=["w", "loss"])
        a.fetch_arrays(["w"], keep=True)  # the noised update leaves: epsilon spent by a
        b.put(np.ones(3, np.float32), key="w")  # the same key as a's: each owner's own
        st = query(admin_of(w))
    (epsilon,) = [line["epsilon"] for line in map(json.loads, audit.read_text().splitlines())]
    assert epsilon > 0
    rows = {o.connections[0]: o for o in st.owners}
    conn_a = next(c.client for c in st.clients if c.tensors == 2)
    conn_b = next(c.client for c in st.clients if c.tensors == 1)
    oa, ob = rows[conn_a], rows[conn_b]
    assert oa.owner.startswith("conn:") and oa.owner != ob.owner
    plan_bytes = len(plan.variants[0].data)
    assert (oa.tensors, oa.tensor_bytes, oa.plans, oa.plan_bytes, oa.releases) == (2, 4 * n + 4, 1, plan_bytes, 1)
    assert oa.epsilon == pytest.approx(epsilon) and oa.delta == 1e-5
    assert (ob.tensors, ob.tensor_bytes, ob.plans, ob.releases, ob.epsilon) == (1, 12, 0, 0, None)
    assert 0 <= oa.idle_s < 60 and abs(ob.last_seen - time.time()) < 60
    text = format_status(st)
    assert "owners    2 (privacy budget" in text
    assert re.search(rf"  {re.escape(oa.owner)} +planwire +2 +132 B +1 +1 +{oa.epsilon:.3g} \(1e-05\) ", text)
    assert re.search(rf"  {re.escape(ob.owner)} +planwire +1 +12 B +0 +0 +- ", text)


def test_status_rows_of_gone_connections_fold_into_their_owner_row(tmp_path):
    """A client that reconnects again and again (one owner, many connections) keeps status bounded: beyond
    ``max_rows`` the least recently seen connections' rows are folded into the owner's row, which still counts
    every request and tensor; a connection not seen for ``fold_after`` seconds is folded too."""
    service = Service("folding")
    stats = service.stats = Stats(service, max_rows=3)
    server = Server(service.handle, [f"ipc://{tmp_path}/w.ipc"], max_message_bytes=1 << 20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    peers: list[Peer] = []
    try:
        token = ""
        for i in range(8):  # all open at once: each its own connection (a closed one's fd is reused)
            peers.append(p := Peer(server.endpoints[0]))
            welcome = p.ok({"type": "hello", "version": PROTOCOL_VERSION, "client": "again", "identity": token})
            token = welcome["identity"]
            p.put(f"t{i}", np.arange(3, dtype=np.float32))
        st = msgspec.convert({**INFO, **stats.snapshot()}, Status)
        assert [(c.requests, c.tensors, c.tensor_bytes) for c in st.clients] == [(2, 1, 12)] * 3
        assert st.clients_folded == 5
        (owner,) = st.owners
        assert (owner.requests, owner.refused, owner.tensors, owner.tensor_bytes) == (16, 0, 8, 96)
        assert owner.connections_folded == 5 and len(owner.connections) == 3
        assert "clients   3 (5 earlier connections folded into their owners' rows)" in format_status(st)

        stats.fold_after = 0.0  # every row but the one just seen is folded at the next request
        with Peer(server.endpoints[0]) as p:
            p.ok({"type": "hello", "version": PROTOCOL_VERSION, "client": "again", "identity": token})
        st = msgspec.convert({**INFO, **stats.snapshot()}, Status)
        assert [(c.name, c.requests, c.tensors) for c in st.clients] == [("again", 1, 0)]
        (owner,) = st.owners
        assert (owner.requests, owner.tensors, owner.connections_folded) == (17, 8, 8)
    finally:
        for p in peers:
            p.close()
        server.stop()
        thread.join(timeout=10)
        server.close()
