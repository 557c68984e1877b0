"""ZeroMQ I/O threads under SCHED_BATCH (transport.sockets.tune_io_threads): opt-out, effect, still working."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq

from planwire.transport.sockets import IO_SCHED_ENV, tune_io_threads

linux_only = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH") or not Path("/proc/self/task").is_dir(), reason="Linux only"
)


def batch_allowed_here() -> bool:
    """Whether this process may put a thread under SCHED_BATCH (probed on a throwaway thread, independently
    of the code under test)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return ok == [True]


def io_thread_policies(ctx: zmq.Context) -> list[int]:
    """Start ``ctx``'s I/O threads (a socket pair moving one message) and return their scheduling policies."""
    before = set(os.listdir("/proc/self/task"))
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        assert server.poll(5000)
        peer, body = server.recv_multipart()
        server.send_multipart([peer, body])
        assert client.poll(5000) and client.recv() == b"ping"
        new = [
            int(t)
            for t in set(os.listdir("/proc/self/task")) - before
            if Path(f"/proc/self/task/{t}/comm").read_text().startswith("ZMQbg/IO")
        ]
        return [os.sched_getscheduler(t) for t in new]
    finally:
        client.close(0)
        server.close(0)


@linux_only
def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IO_SCHED_ENV, "default")
    ctx = zmq.Context()
    try:
        assert tune_io_threads(ctx) is False
        policies = io_thread_policies(ctx)
        assert policies and all(p == os.SCHED_OTHER for p in policies)
    finally:
        ctx.term()


@linux_only
def test_tuned_context_moves_messages_and_batches_its_io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    if not batch_allowed_here():
        pytest.skip("this host refuses SCHED_BATCH to an unprivileged thread: planwire leaves the policy alone")
    monkeypatch.delenv(IO_SCHED_ENV, raising=False)
    ctx = zmq.Context()
    try:
        assert tune_io_threads(ctx) is True
        policies = io_thread_policies(ctx)
        assert policies and all(p == os.SCHED_BATCH for p in policies)
    finally:
        ctx.term()
