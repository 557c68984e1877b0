"""The plan-worker process: start line, signals, devices, --data files, many clients, timeouts, restarts,
and a worker install that never imports torch. Real processes on loopback or ipc, real ZeroMQ."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import zmq
import zmq.auth

import planwire
from planwire.transport import CurveRefused, NoWorkerListening, RemoteTimeoutError, WorkerLost
from planwire.transport.auth import client_keys
from planwire.transport.remote import CLOSE_TIMEOUT
from planwire.worker.process import WorkerProcess
from tests import handmade
from tests.conformance.wire import Peer

CPU = "CPUExecutionProvider"


def run_cli(*args: str, timeout: float = 30, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run plan-worker in the foreground (for starts that must fail)."""
    return subprocess.run(
        [sys.executable, "-m", "planwire.worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_start_line_names_id_addresses_protocol_and_providers(tmp_path):
    ipc = f"ipc://{tmp_path}/w.ipc"
    with WorkerProcess("device_7", extra=["--listen", ipc]) as w:
        line = next(ln for ln in w.log().splitlines() if "ready on" in ln)
        assert w.url.startswith("tcp://127.0.0.1:") and not w.url.endswith(":0")  # the bound port
        assert f"plan-worker device_7 ready on {w.url}, {ipc} (protocol 1, providers {CPU}" in line
        assert f"onnxruntime {ort.__version__}" in line and f"pid {w.proc.pid}" in line
        for url in (w.url, ipc):  # both endpoints serve the same worker
            with planwire.connect(url, timeout=10) as c:
                assert c.id == "device_7" and c.providers == [CPU]


def _timeouts_seen_by_flush(c: planwire.RemoteWorker) -> list[float]:
    """Record the request timeout in force each time ``c.flush()`` runs (the client's own method still runs)."""
    seen: list[float] = []
    flush = c.flush

    def recording_flush() -> None:
        seen.append(c.timeout)
        flush()

    c.flush = recording_flush  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_the_worker_cleanly(sig):
    w = WorkerProcess("sig")
    try:
        with planwire.connect(w.url, timeout=10) as c:  # a connected client does not hold it up
            c.put(np.ones(3, np.float32))  # dropped at once: its delete is pending when the worker goes
            w.proc.send_signal(sig)
            code = w.proc.wait(60)  # a bound against a hang, not a speed check
            assert code == 0, w.log()
            # closing a client whose worker has gone, with frees pending, waits CLOSE_TIMEOUT for them, not
            # its own 10 s request timeout: observed as the timeout in force while close() flushes
            waits = _timeouts_seen_by_flush(c)
        assert waits == [CLOSE_TIMEOUT] and c.timeout == 10
        assert f"signal {int(sig)}: shutting down" in w.log() and "plan-worker sig stopped" in w.log()
    finally:
        w.close()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_device_cuda_without_cuda_fails_at_start_listing_providers():
    done = run_cli("--listen", "tcp://127.0.0.1:0", "--device", "cuda")  # run_cli's timeout bounds a hang
    assert done.returncode != 0
    assert "CUDA" in done.stderr and "available:" in done.stderr
    for provider in ort.get_available_providers():
        assert provider in done.stderr
    assert "ready on" not in done.stderr


def test_device_auto_runs_on_what_is_there():
    expected = ["CUDAExecutionProvider", CPU] if "CUDAExecutionProvider" in ort.get_available_providers() else [CPU]
    with WorkerProcess("auto", extra=["--device", "auto"]) as w, planwire.connect(w.url, timeout=10) as c:
        assert c.providers == expected
        assert f"providers {','.join(expected)}" in w.log()
        out = c.plan_pointer(handmade.double_abs())(np.array([-1.0, 2.0], np.float32))
        assert out.get().tolist() == [2.0, 4.0]


def test_data_files_npy_and_npz_with_tags(tmp_path):
    np.save(tmp_path / "x.npy", np.array([-1.0, 2.0], np.float32))
    np.save(tmp_path / "stem_tagged.npy", np.arange(3, dtype=np.int64))
    np.save(tmp_path / "big_endian.npy", np.array([1.5, -2.0], ">f4"))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    np.savez(tmp_path / "shard.npz", images=np.zeros((2, 4), np.uint8), labels=np.array([3, 1], np.int64))
    data = [
        f"{tmp_path / 'x.npy'}:input_data,private",
        str(tmp_path / "stem_tagged.npy"),
        str(tmp_path / "big_endian.npy"),
        str(tmp_path / "fortran.npy"),
        f"{tmp_path / 'shard.npz'}:mnist",
    ]
    with WorkerProcess("data", data=data, extra=["--public"]) as w, planwire.connect(w.url, timeout=10) as c:
        assert "6 own tensors" in w.log()
        (x,) = c.search("input_data", "private")
        assert (x.key, x.dtype, x.shape, x.private) == ("data:x.npy", "float", (2,), True)
        assert x.get().tolist() == [-1.0, 2.0]  # public: a copy
        (stem,) = c.search("stem_tagged")  # no tags given: the file stem
        assert stem.get().tolist() == [0, 1, 2]
        assert c.search("big_endian")[0].get().tolist() == [1.5, -2.0]  # stored little-endian
        assert c.search("fortran")[0].get().tolist() == [[0, 1, 2], [3, 4, 5]]  # stored C order
        assert sorted(p.key for p in c.search("mnist")) == ["data:shard.npz:images", "data:shard.npz:labels"]
        (labels,) = c.search("mnist", "labels")  # each npz key is a tag
        assert labels.get().tolist() == [3, 1] and labels.tags == ("labels", "mnist")
        # plans can use the worker's own data; a big-endian file works as a plan argument
        out = c.plan_pointer(handmade.double_abs())(c.search("big_endian")[0])
        assert out.get().tolist() == [3.0, 4.0]


class Boom:
    """Unpickling this creates a file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", ["npy", "npz"])
def test_data_with_pickled_objects_is_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "UNPICKLED"
    boom = Boom()
    boom.marker = str(marker)
    evil = np.array([boom, 1], dtype=object)
    path = tmp_path / f"evil.{suffix}"
    if suffix == "npy":
        np.save(path, evil, allow_pickle=True)
    else:
        np.savez(path, fine=np.ones(2), evil=evil)
    done = run_cli("--listen", "tcp://127.0.0.1:0", "--data", str(path), cwd=tmp_path)
    assert done.returncode != 0
    assert "evil" in done.stderr and "not a plain numpy file" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_data_that_is_not_a_tensor_of_a_wire_dtype_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.ones(2, np.complex64))
    done = run_cli("--listen", "tcp://127.0.0.1:0", "--data", str(tmp_path / "c.npy"))
    assert done.returncode != 0 and "complex64" in done.stderr and "c.npy" in done.stderr
    done = run_cli("--listen", "tcp://127.0.0.1:0", "--data", str(tmp_path / "missing.npy"))
    assert done.returncode != 0 and "missing.npy" in done.stderr


def test_several_clients_at_once():
    with WorkerProcess("busy") as w:
        errors: list[BaseException] = []
        plan = handmade.sum_and_diff()

        def client(n: int) -> None:
            try:
                with planwire.connect(w.url, timeout=20) as c:
                    pointer = c.plan_pointer(plan)
                    for i in range(20):
                        x = np.full((3, 2), n * 1000 + i, np.float32)
                        s, d = pointer(c.put(x), x)
                        assert s.get().tolist() == (2 * x).tolist() and d.get(keep=True).tolist() == [[0, 0]] * 3
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        assert w.log().count("registered plan 'sum_and_diff'") == 1  # the same bytes: registered once


def test_connect_to_a_silent_endpoint_times_out_naming_worker_and_request():
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    url = f"tcp://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            planwire.connect(url, timeout=0.5)
        assert time.monotonic() - t0 >= 0.5  # it waited (a lower bound: a loaded host only makes it later)
        assert isinstance(info.value, RemoteTimeoutError)
        assert url in str(info.value) and "hello" in str(info.value) and "0.5 s" in str(info.value)
        assert silent.poll(1000)  # the hello did reach the endpoint
    finally:
        silent.close(linger=0)


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_nothing_listening_is_told_apart_from_a_slow_worker(tmp_path, kind):
    if kind == "tcp":
        with socket.socket() as probe:  # a port nobody listens on (closed synchronously, unlike zmq's)
            probe.bind(("127.0.0.1", 0))
            url = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    else:
        url = f"ipc://{tmp_path}/nobody.ipc"
    with pytest.raises(NoWorkerListening) as info:
        planwire.connect(url, timeout=20)  # refused at once: no need to wait for the timeout
    assert isinstance(info.value, ConnectionRefusedError) and not isinstance(info.value, TimeoutError)
    assert str(info.value) == (
        f"worker {url!r}: no worker is listening at this address (connection refused): check the address "
        "and port, and that plan-worker is running there [no_listener]"
    )


def test_a_request_to_a_worker_that_went_away_fails_at_once(tmp_path):
    w = WorkerProcess("gone", listen=f"ipc://{tmp_path}/gone.ipc")
    c = planwire.connect(w.url, timeout=0.5)
    try:
        x = c.put(np.ones(2, np.float32))
        w.stop()
        with pytest.raises(WorkerLost, match=r"'gone'.*get of") as info:  # at once, not after the timeout
            x.get()
        assert info.value.code == "worker_lost" and w.url in str(info.value)
    finally:
        c.close()
        w.close()


@pytest.mark.parametrize("ping_first", [True, False], ids=["after-a-reply", "first-call"])
def test_restart_is_detected_and_plans_are_registered_again(tmp_path, ping_first):
    """After a restart the plan is sent again on demand: whether a reply has already shown the new
    session (ping first) or only the dropped connection has (the first call after the restart)."""
    url = f"ipc://{tmp_path}/restart.ipc"
    plan = handmade.double_abs()
    variant = plan.variants[0]
    with WorkerProcess("restart", listen=url) as first, planwire.connect(url, timeout=10) as c:
        pointer = c.plan_pointer(plan)
        assert pointer(np.array([-1.0], np.float32)).get().tolist() == [2.0]
        old_session = c.session
        c.ensure_plan(variant)  # cached: nothing sent
        assert first.log().count("registered plan") == 1
        first.stop()
        with WorkerProcess("restart", listen=url) as second:  # ready takes far longer than the drop's event
            if ping_first:
                c.ping()  # ZeroMQ reconnects; the reply carries the new session
                assert c.session != old_session
                with Peer(url) as raw:  # the new worker has no plans yet
                    assert raw.ok({"type": "has_plan", "plan": variant.id}).kind == "missing"
            assert pointer(np.array([3.0, -4.0], np.float32)).get().tolist() == [6.0, 8.0]
            assert c.session != old_session and second.log().count("registered plan") == 1
            with Peer(url) as raw:
                assert raw.ok({"type": "has_plan", "plan": variant.id}).kind == "plan"


def test_worker_and_transport_never_import_torch():
    code = (
        "import planwire.worker, planwire.transport, planwire.worker.cli, planwire.worker.process, "
        "planwire.transport.schemagen, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr


def test_curve_admits_listed_clients_only(tmp_path):
    for d in ("server", "clients", "intruder"):
        (tmp_path / d).mkdir()
    zmq.auth.create_certificates(tmp_path / "server", "server")
    zmq.auth.create_certificates(tmp_path / "clients", "alice")
    zmq.auth.create_certificates(tmp_path / "intruder", "mallory")
    (tmp_path / "clients" / "alice.key_secret").rename(tmp_path / "alice.key_secret")  # only public keys there
    extra = [
        "--curve-secret",
        str(tmp_path / "server" / "server.key_secret"),
        "--curve-clients",
        str(tmp_path / "clients"),
    ]
    with WorkerProcess("curve", extra=extra) as w:
        alice = client_keys(str(tmp_path / "alice.key_secret"), str(tmp_path / "server" / "server.key"))
        with planwire.connect(w.url, timeout=10, curve=alice) as c:
            assert c.put(np.arange(3)).get().tolist() == [0, 1, 2]
        mallory = client_keys(
            str(tmp_path / "intruder" / "mallory.key_secret"), str(tmp_path / "server" / "server.key")
        )
        with pytest.raises(
            CurveRefused,
            match="refused this client's CURVE key: check that the client's public key is in the worker's "
            "--curve-clients directory",
        ):
            planwire.connect(w.url, timeout=20, curve=mallory)
        wrong_server = client_keys(str(tmp_path / "alice.key_secret"), str(tmp_path / "intruder" / "mallory.key"))
        with pytest.raises(CurveRefused, match="check that the server key given to connect"):
            planwire.connect(w.url, timeout=20, curve=wrong_server)
        with pytest.raises(CurveRefused, match=r"requires CURVE encryption; connect with curve=\("):
            planwire.connect(w.url, timeout=20)  # plain text
        with Peer(w.url, curve=alice) as raw:  # the raw protocol over CURVE
            assert raw.ok({"type": "ping"}).kind == "ok"
