"""Caps and fairness of a real plan-worker (issue 11): quota_exceeded past --max-store-mb,
--max-client-store-mb and --max-plans with nothing stored lost; a client that never reads cannot wedge
the worker (--max-client-queue); connections past --max-connections are refused cleanly; untrusted text
is escaped in the log; the open-file limit is raised at start. Against both workers (Python and Node.js),
except where the Node worker says it does not do something (README: the Node.js worker)."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq
import zmq.auth

import planwire
from planwire.transport.auth import client_keys
from planwire.worker.endpoints import raise_open_files
from planwire.worker.process import WorkerProcess
from tests.conformance import plans
from tests.conformance.wire import SIGNATURE, Peer
from tests.conformance.workers import kinds, node_missing
from tests.conformance.workers import start as start_worker

KiB = 1 << 10


@pytest.fixture(params=kinds())
def start(request: pytest.FixtureRequest, tmp_path) -> Iterator:
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    procs: list[WorkerProcess] = []
    peers: list[Peer] = []

    def make(*extra: str, transport: str = "tcp") -> tuple[WorkerProcess, Callable[..., Peer]]:
        listen = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/w{len(procs)}.ipc"
        proc = start_worker(request.param, f"limits-{len(procs)}", listen=listen, extra=list(extra))
        procs.append(proc)

        def peer(timeout: float = 10.0) -> Peer:
            peers.append(Peer(proc.url, timeout=timeout))
            return peers[-1]

        return proc, peer

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for p in peers:
        p.close()
    for proc in procs:
        proc.close()


def kib(n: int, fill: int = 1) -> np.ndarray:
    return np.full(n * KiB, fill, dtype=np.uint8)


def test_store_caps_refuse_whole_puts_and_lose_nothing(start):
    _, connect = start("--max-store-mb", "2", "--max-client-store-mb", "1")
    a, b = connect(), connect()
    a.put("a1", kib(600))
    # Over this client's share: refused whole (the small tensor in the same put is not stored either).
    desc = [
        {"key": "a-small", "dtype": "uint8", "shape": [10], "frame": 0},
        {"key": "a2", "dtype": "uint8", "shape": [600 * KiB], "frame": 1},
    ]
    reply = a.error({"type": "put", "tensors": desc}, [bytes(10), bytes(600 * KiB)], code="quota_exceeded")
    assert "--max-client-store-mb" in reply["message"] and "put #" in reply["message"]
    a.error({"type": "describe", "keys": ["a-small"]}, code="unknown_tensor")
    # Overwriting one's own key counts only the difference.
    a.put("a1", kib(900, fill=2))
    # Another client has its own share, but the total is capped too.
    b.put("b1", kib(900))
    reply = b.error(
        {"type": "put", "tensors": [{"key": "b2", "dtype": "uint8", "shape": [300 * KiB], "frame": 0}]},
        [bytes(300 * KiB)],
        code="quota_exceeded",
    )
    assert "--max-store-mb" in reply["message"]
    # Everything stored before is intact; freeing space lets the put through.
    assert (a.get1("a1", keep=True) == 2).all() and a.get1("a1", keep=True).size == 900 * KiB
    assert (b.get1("b1") == 1).all()  # a move frees b's share
    b.put("b2", kib(300))


def test_run_outputs_over_the_cap_are_refused_and_recorded(start):
    _, connect = start("--max-store-mb", "1")
    p = connect()
    pid = p.register(plans.identity("uint8", ["N"]))["plan"]
    p.put("x", kib(700))
    reply = p.error(*p.run_header(pid, ["x"], ["y"]), code="quota_exceeded")
    assert "--max-store-mb" in reply["message"] and "outputs of run #" in reply["message"]
    failed = p.error({"type": "get", "keys": ["y"]}, code="run_failed")
    assert "quota_exceeded" in failed["message"]
    assert p.get1("x", keep=True).size == 700 * KiB
    assert p.run(pid, ["x"], ["x"]).kind == "ok"  # in place: the same bytes, no more


def test_a_runs_outputs_count_against_the_client_that_asked(start):
    """Runs complete later, in the sandboxed runner: the share they count against is still their client's."""
    _, connect = start("--max-client-store-mb", "1")
    a, b = connect(), connect()
    pid = a.register(plans.identity("uint8", ["N"]))["plan"]
    a.put("x", kib(600))
    reply = a.error(*a.run_header(pid, ["x"], ["ya"]), code="quota_exceeded")  # 1200 KiB for a
    assert "--max-client-store-mb" in reply["message"] and "outputs of run #" in reply["message"]
    assert b.register(plans.identity("uint8", ["N"]))["plan"] == pid  # b's own hold (plans are per client)
    b.put("x", kib(300))  # b's own "x": keys are per client too
    assert b.run(pid, ["x"], ["yb"]).kind == "ok"  # 600 KiB for b: within its own share
    assert b.get1("yb", keep=True).size == 300 * KiB
    b.error({"type": "put", "tensors": [{"key": "b2", "dtype": "uint8", "shape": [600 * KiB], "frame": 0}]},
            [bytes(600 * KiB)], code="quota_exceeded")  # fmt: skip
    a.put("a2", kib(300))  # a's share still has room for this


def test_plan_cap_and_delete_plan(start):
    _, connect = start("--max-plans", "2")
    p = connect()
    first = p.register(plans.identity("float", [1]))["plan"]
    p.register(plans.identity("float", [2]))
    reply = p.error({"type": "register_plan", "name": "third"}, [plans.identity("float", [3])], code="quota_exceeded")
    assert "'third'" in reply["message"] and "--max-plans" in reply["message"] and "delete_plan" in reply["message"]
    assert p.register(plans.identity("float", [1]))["plan"] == first  # one it has: still a no-op
    p.ok({"type": "delete_plan", "plan": first})
    assert p.register(plans.identity("float", [3]))["plan"] == plans.plan_id(plans.identity("float", [3]))


FLOOD_REPLY = 64 * KiB
FLOOD = 5_000


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_client_that_never_reads_cannot_wedge_the_worker(start, transport):
    """A client sends gets of its own 64 KiB tensor and never reads the replies. Big replies, not pings: on
    loopback tcp the kernel's socket buffers grow to tens of MiB (tcp_rmem), which swallow 40,000 small
    replies or not depending on the host's state, so a ping flood filled the client's queue only sometimes;
    5,000 replies of 64 KiB (320 MiB) are far past any socket buffer and every queue bound."""
    proc, connect = start("--max-client-queue", "200", transport=transport)
    ctx = zmq.Context.instance()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.SNDHWM, 0)
    flood.setsockopt(zmq.RCVHWM, 100)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(proc.url)
    put = {"type": "put", "id": 1, "tensors": [{"key": "blob", "dtype": "uint8", "shape": [FLOOD_REPLY], "frame": 0}]}
    get = [SIGNATURE, json.dumps({"type": "get", "id": 2, "keys": ["blob"], "keep": True}).encode()]
    try:
        flood.send_multipart([SIGNATURE, json.dumps(put).encode(), bytes(FLOOD_REPLY)])
        assert flood.poll(30_000) and b'"ok"' in flood.recv_multipart()[1]
        for _ in range(FLOOD):
            flood.send_multipart(get)
        other = connect(timeout=30)
        for i in range(20):  # answered while the flood is being served and its replies dropped
            assert other.ok({"type": "ping", "id": i})["re"] == i
        deadline = time.monotonic() + 60
        while "dropping its replies" not in proc.log() and time.monotonic() < deadline:
            other.ok({"type": "ping"})
            time.sleep(0.05)
        assert proc.log().count("dropping its replies") >= 1, proc.log()[-2000:]
    finally:
        flood.close(linger=0)
    assert proc.stop(timeout=20) == 0  # SIGTERM still stops it


def test_connections_past_the_limit_are_refused_and_the_worker_goes_on(start):
    """A connection past the limit is never served, however loaded the host (the worker reads its connection
    events before serving a new peer's first request: an earlier version refused from a thread, and under
    load a request slipped through before the cut)."""
    if start.kind == "node":
        pytest.skip("the Node worker does not enforce --max-connections (zeromq.js cannot close one peer)")
    proc, connect = start("--max-connections", "3")
    first = [connect(timeout=10) for _ in range(3)]
    for p in first:
        assert p.ok({"type": "ping"}).kind == "ok"
    extra = connect(timeout=1.5)
    extra.send({"type": "ping"})
    with pytest.raises(TimeoutError):
        extra.recv()
    assert "connection(s) refused" in proc.log()
    for p in first:  # the others go on
        assert p.ok({"type": "ping"}).kind == "ok"
    extra.close()
    first[0].close()
    # Once the worker has seen both leave, a new client is served. A client that connects before that is
    # refused, and its request with it (a refused connection's requests are dropped, not kept): it asks again.
    deadline = time.monotonic() + 30
    while True:
        late = connect(timeout=1)
        late.send({"type": "ping"})
        try:
            assert late.recv().kind == "ok"
            break
        except TimeoutError:
            late.close()
            assert time.monotonic() < deadline, proc.log()[-2000:]


def test_welcome_announces_the_caps_and_the_client_exposes_them(start):
    caps = ["--max-store-mb", "8", "--max-client-store-mb", "2", "--max-plans", "3", "--max-client-queue", "500"]
    if start.kind == "python":  # the Node worker refuses the sandbox's bounds at start (README)
        caps += ["--run-timeout", "7.5", "--max-run-memory-mb", "512"]
    proc, connect = start(*caps)
    want = {
        "max_store_bytes": 8 << 20,
        "max_client_store_bytes": 2 << 20,
        "max_plans": 3,
        "max_client_queue": 500,
        "run_timeout_seconds": 7.5,
        "max_run_memory_bytes": 512 << 20,
    }
    limits = connect().ok({"type": "hello"})["limits"]
    if start.kind == "node":  # announces what it enforces; what it announces must be right
        want = {k: v for k, v in want.items() if k in limits}
    assert {k: limits[k] for k in want} == want
    with planwire.connect(proc.url, timeout=30) as client:
        assert {k: getattr(client.limits, k) for k in want} == want


def test_untrusted_text_is_escaped_in_the_log(start):
    proc, connect = start()
    p = connect()
    p.send_frames([SIGNATURE, json.dumps({"type": "ping\nERROR forged line", "id": 3}).encode()])
    assert p.recv()["code"] == "unknown_type"
    p.ok({"type": "ping"})
    log = proc.log()
    assert "ping\\nERROR forged line" in log
    assert not any(line.startswith("ERROR forged") for line in log.splitlines())


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = raise_open_files()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == now
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_with_curve_a_client_is_its_key_across_connections(start, tmp_path):
    """The per-client share follows the CURVE public key (ZAP User-Id), not the connection."""
    if start.kind == "node":
        pytest.skip("the Node worker counts a CURVE client per connection (zeromq.js does not expose User-Id)")
    for d in ("server", "clients"):
        (tmp_path / d).mkdir()
    zmq.auth.create_certificates(tmp_path / "server", "server")
    for name in ("alice", "bob"):
        zmq.auth.create_certificates(tmp_path / "clients", name)
    secret = tmp_path / "server" / "server.key_secret"
    proc, _ = start("--curve-secret", str(secret), "--curve-clients", str(tmp_path / "clients"),
                    "--max-client-store-mb", "1")  # fmt: skip

    def keys(name: str) -> tuple[bytes, bytes, bytes]:
        return client_keys(str(tmp_path / "clients" / f"{name}.key_secret"), str(tmp_path / "server" / "server.key"))

    with Peer(proc.url, curve=keys("alice")) as a1, Peer(proc.url, curve=keys("alice")) as a2:
        a1.put("a1", kib(700))
        reply = a2.error(
            {"type": "put", "tensors": [{"key": "a2", "dtype": "uint8", "shape": [700 * KiB], "frame": 0}]},
            [bytes(700 * KiB)],
            code="quota_exceeded",
        )
        assert "--max-client-store-mb" in reply["message"]
        with Peer(proc.url, curve=keys("bob")) as b:
            b.put("b1", kib(700))  # another key, its own share
        assert a2.get1("a1", keep=True).size == 700 * KiB
