"""Owners and private-derived results through planwire's own client: real plan-worker processes over tcp
and ipc (two clients each), CURVE keys as identities, --idle-ttl, and VirtualWorker for the same rules."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from onnx import helper

import planwire
from planwire.transport import PrivateDataError, UnknownTensorError
from planwire.transport.auth import client_keys
from planwire.worker import VirtualWorker
from planwire.worker.admin import query
from planwire.worker.process import WorkerProcess
from tests import handmade
from tests.conformance.workers import KINDS, node_missing, start


def _listen(kind: str, tmp: Path) -> str:
    return "tcp://127.0.0.1:0" if kind == "tcp" else f"ipc://{tmp}/w.ipc"


@pytest.fixture(params=["tcp", "ipc"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("owners", listen=_listen(request.param, tmp_path)) as proc:
        yield proc


def test_clients_see_and_touch_only_their_own(served):
    with planwire.connect(served.url, timeout=10) as a, planwire.connect(served.url, timeout=10) as b:
        pa = a.put(np.arange(3), tags=["mine"], key="shared-name")
        assert b.search("mine") == []
        with pytest.raises(UnknownTensorError):
            b.fetch_arrays(["shared-name"], keep=True)
        pb = b.put(np.ones(2), key="shared-name")  # b's own tensor under the same name
        assert pb.get(keep=True).tolist() == [1.0, 1.0]
        assert pa.get().tolist() == [0, 1, 2]  # a's is intact


def test_a_client_presenting_its_identity_on_a_new_connection_keeps_its_objects(served):
    with planwire.connect(served.url, timeout=10) as a:
        kept = a.put(np.arange(4), tags=["kept"], key="k")  # noqa: F841 (held: a collected pointer frees its tensor)
        identity = a.identity
        assert len(identity) >= 32
        with planwire.connect(served.url, timeout=10) as again:
            assert again.search("kept") == []  # a new connection is a new client...
            again.identity = identity
            again.hello()  # ...until it presents the identity (as the client does after a reconnect)
            (p,) = again.search("kept")
            assert p.get(keep=True).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_idle_clients_are_freed_and_logged(kind):
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    with start(kind, "ttl", extra=["--idle-ttl", "1s"]) as proc:
        with planwire.connect(proc.url, timeout=10) as a, planwire.connect(proc.url, timeout=10) as b:
            old = a.put(np.arange(3), key="old")  # noqa: F841 (held: a collected pointer frees its tensor)
            time.sleep(2.5)
            b.ping()  # any request lets the worker notice who has been idle
            st = query(re.search(r"admin on (\S+)", proc.log()).group(1))
            assert len(st.owners) == 1 and st.owners[0].tensors == 0  # a was freed: its row goes
            with pytest.raises(UnknownTensorError):
                a.fetch_arrays(["old"])
        assert "not seen for 1 s (--idle-ttl): freed its 1 tensors" in proc.log()


def two_curve_clients(tmp_path: Path) -> tuple[list[str], tuple, tuple]:
    """Keys for a worker admitting alice and bob: (the worker's CURVE flags, alice's keys, bob's keys)."""
    for d in ("server", "clients", "secrets"):
        (tmp_path / d).mkdir()
    zmq.auth.create_certificates(tmp_path / "server", "server")
    for name in ("alice", "bob"):
        zmq.auth.create_certificates(tmp_path / "clients", name)
        (tmp_path / "clients" / f"{name}.key_secret").rename(tmp_path / "secrets" / f"{name}.key_secret")
    server = str(tmp_path / "server" / "server.key")
    alice, bob = (client_keys(str(tmp_path / "secrets" / f"{n}.key_secret"), server) for n in ("alice", "bob"))
    secret, clients = str(tmp_path / "server" / "server.key_secret"), str(tmp_path / "clients")
    return ["--curve-secret", secret, "--curve-clients", clients], alice, bob


def test_curve_clients_are_their_keys(tmp_path):
    extra, alice, bob = two_curve_clients(tmp_path)
    with WorkerProcess("curve-owners", extra=extra) as proc:
        with planwire.connect(proc.url, timeout=10, curve=alice) as a:
            assert a.identity == ""  # the key is the identity
            a.put_many({"x": np.arange(3)}, tags=["alice"], owned=False)  # stays when this connection closes
        with planwire.connect(proc.url, timeout=10, curve=bob) as b:
            assert b.search("alice") == []
            with pytest.raises(UnknownTensorError):
                b.fetch_arrays(["x"], keep=True)
        with planwire.connect(proc.url, timeout=10, curve=alice) as a2:  # a new connection, the same key
            (p,) = a2.search("alice")
            assert p.get().tolist() == [0, 1, 2]


def _training_trick() -> handmade.HandPlan:
    """(w, x) -> (new_w, loss): new_w is the batch x itself (the 'SGD(lr=-1)' trick), loss uses w only."""
    v = handmade.variant(
        [helper.make_node("Identity", ["x"], ["new_w"]), helper.make_node("ReduceSum", ["w"], ["loss"], keepdims=0)],
        [("w", "float", [2]), ("x", "float", [2])],
        [("new_w", "float", [2]), ("loss", "float", [])],
    )
    return handmade.HandPlan("trick", v)


def test_a_training_plan_cannot_hand_back_the_private_batch(worker_factory):
    w = worker_factory("device_1", data=[np.float32([-1, 2])])
    (x,) = w.search()
    new_w, loss = w.plan_pointer(_training_trick())(np.float32([1, 1]), x)
    assert loss.get().tolist() == 2.0  # depends on the client's w only: comes back as usual
    with pytest.raises(PrivateDataError, match="private data"):
        new_w.get()
    (info,) = w.describe(new_w)
    assert info.private and info.shape == [2]


def test_virtual_worker_keeps_the_same_rules():
    w = VirtualWorker(None, id="v", data=[np.float32([3, 4])])
    (x,) = w.search()
    assert x.private
    out = w.plan_pointer(handmade.double_abs())(x)
    with pytest.raises(PrivateDataError):
        out.get()
    assert w.plan_pointer(handmade.double_abs())(np.float32([-3])).get().tolist() == [6.0]


class Proxy:
    """A TCP forwarder in front of a worker whose connections the test can cut (a network drop)."""

    def __init__(self, target: str) -> None:
        host, _, port = target[6:].rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection: both ends see it closed; ZeroMQ reconnects."""
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns = []

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_client_keeps_its_objects_across_a_dropped_connection():
    with WorkerProcess("drop") as proc:
        proxy = Proxy(proc.url)
        try:
            with planwire.connect(proxy.url, timeout=10) as c:
                kept = c.put(np.arange(3), key="k")
                pid_before = c.identity
                proxy.cut()
                time.sleep(1.0)  # ZeroMQ sees the drop
                # the next request goes on a new connection: the client says hello with its identity first
                assert kept.get(keep=True).tolist() == [0, 1, 2]
                assert c.identity == pid_before
                assert proc.log().count("unknown or expired identity") == 0
        finally:
            proxy.close()
