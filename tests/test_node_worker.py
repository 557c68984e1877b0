"""The Node.js worker (worker/node) as an operator meets it: its flags, ready line, exit codes, signals,
--data files and CURVE, the same as the Python plan-worker's where they apply. Real processes, real
sockets; skipped, saying why, without node or worker/node/node_modules. (The protocol itself is checked
by tests/conformance, the hostile corpus, the garbage cases and the client's tests, against both workers.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq
import zmq.auth

import planwire
from planwire.transport import CurveRefused
from planwire.transport.auth import client_keys
from tests import handmade
from tests.conformance.wire import SIGNATURE, Peer
from tests.conformance.workers import NODE_BIN, NodeWorkerProcess, node_missing

pytestmark = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "")
TCP = "tcp://127.0.0.1:0"
CPU = "CPUExecutionProvider"
EXPECTED = "expected a .npy or .npz file of numeric arrays (numpy.save / numpy.savez)"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(NODE_BIN), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def refused(*args: str, cwd: Path | None = None) -> str:
    """A start that must fail: its one stderr line (exit status 2, nothing bound)."""
    done = cli(*args, cwd=cwd)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "ready on" not in done.stderr and " at " not in done.stderr, done.stderr  # no stack trace
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_version_and_help():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("plan-worker ") and "protocol 1" in done.stdout
    assert "onnxruntime-node 1.30" in done.stdout
    done = cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for expected in ("largest message accepted (MiB) (default: 1024)", "--max-plans", "(default: cpu)", "--curve"):
        assert expected in text, expected


def test_usage_mistakes_are_one_line_and_exit_2():
    assert refused() == "plan-worker: error: the following arguments are required: --listen (see plan-worker --help)"
    assert refused("--listen", TCP, "--threads", "0") == (
        "plan-worker: error: argument --threads: must be a positive whole number, got 0 (see plan-worker --help)"
    )
    assert refused("--listen", TCP, "--device", "gpu") == (
        "plan-worker: error: argument --device: invalid choice: 'gpu' (choose from 'cpu', 'cuda', 'auto') "
        "(see plan-worker --help)"
    )
    assert refused("--listen", TCP, "--frobnicate") == (
        "plan-worker: error: unrecognized arguments: --frobnicate (see plan-worker --help)"
    )
    assert refused("--listen", "tcp://localhost") == (
        "plan-worker: --listen 'tcp://localhost': expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:5555)"
    )
    assert refused("--listen", "udp://x:1") == (
        "plan-worker: --listen 'udp://x:1': expected tcp://HOST:PORT or ipc://PATH (e.g. tcp://0.0.0.0:5555)"
    )


def test_what_the_node_worker_cannot_do_is_refused_by_name():
    line = refused("--listen", TCP, "--device", "cuda")
    assert "--device cuda" in line and f"available: {CPU}" in line
    assert refused("--listen", TCP, "--admin", "tcp://0.0.0.0:7000") == (
        "plan-worker: --admin 'tcp://0.0.0.0:7000': must be ipc://PATH or tcp://127.0.0.1:PORT "
        "(the operator's, not the network's)"
    )
    assert refused("--listen", TCP, "--metrics", "9105") == (
        "plan-worker: --metrics '9105': expected HOST:PORT (e.g. 127.0.0.1:9105)"
    )
    line = refused("--listen", TCP, "--run-timeout", "0")
    assert line == "plan-worker: --run-timeout '0': must be a positive number of seconds"
    line = refused("--listen", TCP, "--max-run-memory-mb", "-1")
    assert line == "plan-worker: --max-run-memory-mb '-1': must be 0 (no bound) or a positive whole number"


def test_a_port_in_use_is_one_line():
    with NodeWorkerProcess("holder") as w:
        line = refused("--listen", w.url)
    assert line.startswith(f"plan-worker: cannot listen on '{w.url}': ") and "another process holds this port" in line


def test_ready_line_endpoints_and_providers(tmp_path):
    ipc = f"ipc://{tmp_path}/w.ipc"
    with NodeWorkerProcess("device_7", extra=["--listen", ipc]) as w:
        line = next(ln for ln in w.log().splitlines() if "ready on" in ln)
        assert w.url.startswith("tcp://127.0.0.1:") and not w.url.endswith(":0")
        assert f"plan-worker device_7 ready on {w.url}, {ipc} (protocol 1, providers {CPU}" in line
        assert f"pid {w.proc.pid}" in line and "0 own tensors, curve off, sandbox on" in line
        assert "plans run in a sandboxed runner process: --run-timeout 60 s, --max-run-memory-mb 2048" in w.log()
        for url in (w.url, ipc):  # both endpoints serve the same worker
            with planwire.connect(url, timeout=10) as c:
                assert c.id == "device_7" and c.providers == [CPU]


def test_a_live_ipc_path_is_refused_and_a_stale_one_taken_over(tmp_path):
    path = tmp_path / "w.ipc"
    with NodeWorkerProcess("first", listen=f"ipc://{path}"):
        assert "a live process (another worker?) answers there" in refused("--listen", f"ipc://{path}")
    with NodeWorkerProcess("second", listen=f"ipc://{path}") as w, Peer(w.url) as p:
        assert p.ok({"type": "hello"})["worker"] == "second"
    other = tmp_path / "file.ipc"
    other.write_text("not a socket")
    assert "exists and is not a socket" in refused("--listen", f"ipc://{other}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_the_worker_cleanly(sig):
    w = NodeWorkerProcess("sig")
    try:
        with Peer(w.url) as p:
            p.put("x", np.ones(3, np.float32))
            for _ in range(50):  # replies this client never reads do not hold the worker up
                p.send({"type": "get", "keys": ["x"], "keep": True})
            w.proc.send_signal(sig)
            assert w.proc.wait(60) == 0, w.log()
        assert f"signal {int(sig)}: shutting down" in w.log() and "plan-worker sig stopped" in w.log()
    finally:
        w.close()


def test_data_files_npy_and_npz_with_tags(tmp_path):
    np.save(tmp_path / "x.npy", np.array([-1.0, 2.0], np.float32))
    np.save(tmp_path / "stem_tagged.npy", np.arange(3, dtype=np.int64))
    np.save(tmp_path / "big_endian.npy", np.array([1.5, -2.0], ">f4"))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    np.save(tmp_path / "flags.npy", np.array([True, False, True]))
    np.savez(tmp_path / "shard.npz", images=np.zeros((2, 4), np.uint8), labels=np.array([3, 1], np.int64))
    np.savez_compressed(tmp_path / "packed.npz", w=np.linspace(0, 1, 5, dtype=np.float64))
    data = [
        f"{tmp_path / 'x.npy'}:input_data,private",
        str(tmp_path / "stem_tagged.npy"),
        str(tmp_path / "big_endian.npy"),
        str(tmp_path / "fortran.npy"),
        str(tmp_path / "flags.npy"),
        f"{tmp_path / 'shard.npz'}:mnist",
        str(tmp_path / "packed.npz"),
    ]
    with NodeWorkerProcess("data", data=data, extra=["--public"]) as w, planwire.connect(w.url, timeout=10) as c:
        assert "8 own tensors" in w.log()
        (x,) = c.search("input_data", "private")
        assert (x.key, x.dtype, x.shape, x.private) == ("data:x.npy", "float", (2,), True)
        assert x.get().tolist() == [-1.0, 2.0]  # public: a copy
        assert c.search("input_data")[0].get().tolist() == [-1.0, 2.0]  # still there
        (stem,) = c.search("stem_tagged")  # no tags given: the file stem
        assert stem.get().tolist() == [0, 1, 2]
        assert c.search("big_endian")[0].get().tolist() == [1.5, -2.0]  # stored little-endian
        assert c.search("fortran")[0].get().tolist() == [[0, 1, 2], [3, 4, 5]]  # stored C order
        assert c.search("flags")[0].get().tolist() == [True, False, True]
        assert sorted(p.key for p in c.search("mnist")) == ["data:shard.npz:images", "data:shard.npz:labels"]
        (labels,) = c.search("mnist", "labels")  # each npz key is a tag
        assert labels.get().tolist() == [3, 1] and labels.tags == ("labels", "mnist")
        assert c.search("w")[0].get().tolist() == [0, 0.25, 0.5, 0.75, 1.0]  # deflated npz
        out = c.plan_pointer(handmade.double_abs())(c.search("big_endian")[0])
        assert out.get().tolist() == [3.0, 4.0]


@pytest.mark.parametrize("suffix", ["npy", "npz"])
def test_data_with_pickled_objects_is_refused_without_unpickling(tmp_path, suffix):
    path = tmp_path / f"evil.{suffix}"
    evil = np.array([{"a": 1}, 1], dtype=object)
    if suffix == "npy":
        np.save(path, evil, allow_pickle=True)
    else:
        np.savez(path, fine=np.ones(2), evil=evil)
    assert refused("--listen", TCP, "--data", str(path)) == (
        f"plan-worker: --data '{path}': not a plain numpy file: it holds Python objects, which a worker never "
        f"loads; {EXPECTED}"
    )


def test_data_that_is_not_numpy_or_not_a_wire_dtype_is_refused(tmp_path):
    notes = tmp_path / "notes.log"
    notes.write_text("12:00 started\n")
    assert refused("--listen", TCP, "--data", str(notes)) == (
        f"plan-worker: --data '{notes}': not a plain numpy file; {EXPECTED}"
    )
    np.save(tmp_path / "c.npy", np.ones(2, np.complex64))
    line = refused("--listen", TCP, "--data", str(tmp_path / "c.npy"))
    assert "complex64" in line and "c.npy" in line
    assert refused("--listen", TCP, "--data", str(tmp_path / "missing.npy")) == (
        f"plan-worker: --data '{tmp_path / 'missing.npy'}': no such file '{tmp_path / 'missing.npy'}'"
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for d in ("server", "clients", "intruder"):
        (tmp_path / d).mkdir()
    zmq.auth.create_certificates(tmp_path / "server", "server")
    zmq.auth.create_certificates(tmp_path / "clients", "alice")
    zmq.auth.create_certificates(tmp_path / "intruder", "mallory")
    (tmp_path / "clients" / "alice.key_secret").rename(tmp_path / "alice.key_secret")  # only public keys there
    return tmp_path


def test_curve_admits_listed_clients_only(keys):
    extra = ["--curve-secret", str(keys / "server" / "server.key_secret"), "--curve-clients", str(keys / "clients")]
    with NodeWorkerProcess("curve", extra=extra) as w:
        assert "curve listed clients" in w.log()
        alice = client_keys(str(keys / "alice.key_secret"), str(keys / "server" / "server.key"))
        with planwire.connect(w.url, timeout=10, curve=alice) as c:
            assert c.put(np.arange(3)).get().tolist() == [0, 1, 2]
        mallory = client_keys(str(keys / "intruder" / "mallory.key_secret"), str(keys / "server" / "server.key"))
        with pytest.raises(CurveRefused, match="refused this client's CURVE key: check that the client's public key"):
            planwire.connect(w.url, timeout=20, curve=mallory)
        wrong_server = client_keys(str(keys / "alice.key_secret"), str(keys / "intruder" / "mallory.key"))
        with pytest.raises(CurveRefused, match="check that the server key given to connect"):
            planwire.connect(w.url, timeout=20, curve=wrong_server)
        with pytest.raises(CurveRefused, match=r"requires CURVE encryption; connect with curve=\("):
            planwire.connect(w.url, timeout=20)  # plain text
        with Peer(w.url, curve=alice) as raw:
            assert raw.ok({"type": "ping"}).kind == "ok"
        assert "refused CURVE client" in w.log()


def test_curve_any_client_encrypts_without_a_list(keys):
    extra = ["--curve-secret", str(keys / "server" / "server.key_secret"), "--curve-any-client"]
    with NodeWorkerProcess("open", extra=extra) as w:
        assert "curve any client" in w.log()
        mallory = client_keys(str(keys / "intruder" / "mallory.key_secret"), str(keys / "server" / "server.key"))
        with Peer(w.url, curve=mallory) as raw:
            assert raw.ok({"type": "ping"}).kind == "ok"


def test_half_a_curve_configuration_and_bad_key_files_are_one_line(keys):
    secret, clients = str(keys / "server" / "server.key_secret"), str(keys / "clients")
    assert refused("--listen", TCP, "--curve-secret", secret) == (
        "plan-worker: --curve-secret needs --curve-clients DIR (the client keys to admit), or --curve-any-client "
        "to encrypt without authenticating clients"
    )
    assert refused("--listen", TCP, "--curve-clients", clients).startswith(
        "plan-worker: --curve-clients needs --curve-secret"
    )
    public = keys / "server" / "server.key"
    assert refused("--listen", TCP, "--curve-secret", str(public), "--curve-clients", clients) == (
        f"plan-worker: secret key file '{public}': holds no secret key (a .key file is public: use the .key_secret)"
    )
    empty = keys / "empty"
    empty.mkdir()
    assert refused("--listen", TCP, "--curve-secret", secret, "--curve-clients", str(empty)) == (
        f"plan-worker: --curve-clients '{empty}': holds no public keys (*.key): no client could connect; "
        "copy each client's .key file there"
    )


def test_an_adam_training_step_on_the_node_worker_matches_eager_torch():
    """A whole training step (forward, loss, backward, Adam with its moments and step count as state) runs on
    the Node worker and tracks eager torch step for step; the client's training API works unchanged."""
    import copy

    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    ref = copy.deepcopy(model).train()
    step = planwire.training_plan(
        model,
        F.cross_entropy,
        planwire.optim.Adam(lr=0.01, betas=(0.9, 0.99), weight_decay=1e-4),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
        progress=False,
    )
    opt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (5, 16, 3, 9)]
    with NodeWorkerProcess("adam") as w, planwire.connect(w.url, timeout=30) as c:
        ptr = step.send(c)
        losses, expect = [], []
        for x, y in data:
            out = ptr(c.put(x), y)
            losses.append((out[0] if isinstance(out, tuple) else out).get().item())
            opt.zero_grad()
            ref_loss = F.cross_entropy(ref(x), y)
            ref_loss.backward()
            opt.step()
            expect.append(ref_loss.item())
        assert losses == pytest.approx(expect, rel=1e-4)
        trained = ptr.state_dict()
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_cancel_of_a_run_already_answered_is_refused():
    """PROTOCOL.md cancel: a run that has been answered cannot be cancelled; its outputs stand."""
    with NodeWorkerProcess("cancel") as w, Peer(w.url) as p:
        pid = p.register(handmade.double_abs().variants[0].data)["plan"]
        header, frames = p.run_header(pid, [np.array([-1.0, 2.0], np.float32)], ["y"])
        run_id = p.send(header, frames)
        assert (p.recv()["re"]) == run_id
        reply = p.error({"type": "cancel", "run": run_id}, code="bad_argument")
        assert f"cancel: no run #{run_id} of this connection is queued or running" in reply["message"]
        assert p.get1("y").tolist() == [2.0, 4.0]  # the run's outputs stand
        p.error({"type": "cancel"}, code="invalid_message")


KEYS = ["y", 'q"uote', "back\\slash", "ctl\x01\n\t\x7f", "emoji \U0001f600", "line\u2028sep", "</x>"]


def test_run_and_get_reply_headers_are_exactly_compact_json():
    """The Node worker writes the headers of run and get replies (ok, tensors) itself (src/service.js):
    byte for byte the compact JSON of the reply (JSON.stringify's escapes are json.dumps's, ensure_ascii
    off), whatever the keys hold."""
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    with NodeWorkerProcess("headers") as w, Peer(w.url) as p:
        pid = p.register(handmade.double_abs().variants[0].data)["plan"]
        x = np.array([-1.0, 2.0], np.float32)
        for i, key in enumerate(KEYS):
            for fetch in ([0], []):
                header, frames = p.run_header(pid, [x], [key], fetch=fetch)
                p.send_frames([SIGNATURE, json.dumps({**header, "id": 7 + i}).encode(), *frames])
                got = p.sock.recv_multipart()
                want = {"type": "tensors", "re": 7 + i, "session": p.session}
                if fetch:
                    want["tensors"] = [{"key": key, "dtype": "float", "shape": [2], "frame": 0}]
                else:
                    want["type"] = "ok"
                assert got[1] == json.dumps(want, **compact).encode(), (key, got[1])
        p.send_frames([SIGNATURE, json.dumps({"type": "get", "id": 2**53 + 1, "keys": KEYS[:2]}).encode()])
        got = p.sock.recv_multipart()
        tensors = [{"key": k, "dtype": "float", "shape": [2], "frame": i} for i, k in enumerate(KEYS[:2])]
        want = {"type": "tensors", "re": 2**53 + 1, "session": p.session, "tensors": tensors}
        assert got[1] == json.dumps(want, **compact).encode()  # an id past 2^53 (a BigInt) too
        assert [np.frombuffer(f, np.float32).tolist() for f in got[2:]] == [[2.0, 4.0]] * 2


def test_the_runner_is_a_child_that_goes_with_the_worker():
    """Plans run in a child process (src/runner.js) bounded by prlimit; it goes when the worker is stopped
    or killed with -9 (setpriv --pdeathsig), and --no-sandbox runs plans in the worker itself."""
    for how in ("stop", "kill"):
        with NodeWorkerProcess("w") as w, Peer(w.url) as p:
            pid = p.register(handmade.double_abs().variants[0].data)["plan"]
            p.run(pid, [np.array([-1.0, 2.0], np.float32)], ["y"])
            (runner,) = psutil.Process(w.proc.pid).children()
            assert any(a.endswith("runner.js") for a in runner.cmdline()), runner.cmdline()
            assert "data memory limit" in w.log() and "data memory limit none" not in w.log()
            if how == "kill":
                w.proc.kill()
                w.proc.wait()
        psutil.wait_procs([runner], timeout=20)
        assert not runner.is_running()
    with NodeWorkerProcess("w", extra=["--no-sandbox"]) as w, Peer(w.url) as p:
        pid = p.register(handmade.double_abs().variants[0].data)["plan"]
        assert p.run(pid, [np.array([-1.0, 2.0], np.float32)], ["y"], fetch=[0]).array_list()[0].tolist() == [2.0, 4.0]
        assert psutil.Process(w.proc.pid).children() == []
        assert "--no-sandbox: plans run inside this process" in w.log()


def test_plan_worker_status_and_metrics_of_a_node_worker(tmp_path):
    """`plan-worker status` reads the Node worker's admin socket (src/admin.js: mode 0600, removed at stop);
    clients are named by their connection's routing id (zeromq.js exposes no peer address)."""
    from planwire.worker.admin import query

    data = tmp_path / "own.npy"
    np.save(data, np.arange(8, dtype=np.float32))  # 32 bytes
    with NodeWorkerProcess("ward-8", data=[f"{data}:secret"]) as w:
        addr = re.search(r"admin on (\S+)", w.log()).group(1)
        path = Path(addr.removeprefix("ipc://"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        p = Peer(w.url)
        p.put("a", np.arange(3, dtype=np.float32))
        plan = p.register(handmade.double_abs().variants[0].data, name="double_abs")["plan"]
        p.run(plan, [np.ones(4, np.float32)], ["y"])  # 16 bytes
        p.error(*p.run_header(plan, ["nope"], ["z"]), code="unknown_tensor")
        with planwire.connect(w.url, timeout=10):
            st = query(addr)
        assert (st.worker, st.pid, st.protocol, st.session) == ("ward-8", w.proc.pid, 1, p.session)
        assert (st.runs, st.runs_failed, st.private_releases) == (2, 1, 0)
        assert st.own_data.tensors == 1 and st.own_data.tensor_bytes == 32
        assert st.requests == {"put": 1, "register_plan": 1, "run": 2, "hello": 1}
        busy = next(c for c in st.clients if c.requests == 4)
        plan_bytes = len(handmade.double_abs().variants[0].data)
        assert (busy.tensors, busy.tensor_bytes, busy.plans, busy.plan_bytes, busy.refused) == (2, 28, 1, plan_bytes, 1)
        assert next(c for c in st.clients if c is not busy).name == "planwire"
        assert [(x.plan, x.name, x.bytes, x.runs, x.failed) for x in st.plans] == [
            (plan, "double_abs", plan_bytes, 2, 1)
        ]
        script = str(Path(sys.executable).parent / "plan-worker")
        done = subprocess.run([script, "status", addr], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "runs      2 served, 1 failed" in done.stdout
        p.close()
    assert not path.exists()


def test_fast_run_parse_equals_the_general_parse():
    """messages.js's runFast (a planwire client's run header read without the general parse) gives exactly
    the message parseHeader + validateRequest give, on 100,000 mutated run headers (tools/runfast-diff.js);
    and it does read most of the valid ones, so the comparison covers it."""
    tool = NODE_BIN.parent.parent / "tools" / "runfast-diff.js"
    out = subprocess.run(["node", str(tool), "100000"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    said = re.fullmatch(r"ok: (\d+) headers, (\d+) valid, (\d+) read by runFast\n", out.stdout)
    n, valid, fast = map(int, said.groups())
    assert n == 100000 and valid > 10000 and fast > 0.8 * valid


def test_fast_run_parse_is_off_under_another_run_schema(tmp_path):
    """runFast applies the run.json it was written for: under another (here one with a maximum inline_max, as
    an operator's PLANWIRE_SCHEMAS might say) every run takes the general parse, which applies it (review)."""
    schemas = tmp_path / "schemas"
    shutil.copytree(Path(__file__).resolve().parent.parent / "schemas", schemas)
    run = json.loads((schemas / "run.json").read_text())
    run["properties"]["inline_max"]["maximum"] = 1 << 30
    (schemas / "run.json").write_text(json.dumps(run))
    tool = NODE_BIN.parent.parent / "tools" / "runfast-diff.js"
    env = {**os.environ, "PLANWIRE_SCHEMAS": str(schemas)}
    out = subprocess.run(["node", str(tool), "20000"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    said = re.fullmatch(r"ok: (\d+) headers, (\d+) valid, (\d+) read by runFast\n", out.stdout)
    assert said is not None and int(said.group(2)) > 1000 and int(said.group(3)) == 0, out.stdout


def test_v8_flags_are_ones_this_node_takes():
    """The worker sets src/v8flags.js's flags and starts its runner with them: an unknown one (V8 12 dropped
    --interrupt-budget) would make node refuse to start the runner and print lines a config error must not."""
    script = "import {V8_FLAGS} from './src/v8flags.js'; console.log(JSON.stringify([process.versions.v8, V8_FLAGS]))"
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
        cwd=NODE_BIN.parent.parent, check=True,
    )  # fmt: skip
    v8, flags = json.loads(out.stdout)
    done = subprocess.run(["node", *flags, "-e", ""], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", (v8, flags, done.returncode, done.stderr)
    assert flags == (["--interrupt-budget=8000"] if int(v8.split(".")[0]) < 12 else []), v8
