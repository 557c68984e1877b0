"""ZeroMQ I/O threads under SCHED_BATCH (transport.sockets.tune_io_threads): opt-out, effect, still working."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from planwire.transport.sockets import IO_SCHED_ENV, tune_io_threads


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IO_SCHED_ENV, "default")
    ctx = zmq.Context()
    try:
        assert tune_io_threads(ctx) is False
    finally:
        ctx.term()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH") or not Path("/proc/self/task").is_dir(), reason="Linux only")
def test_tuned_context_moves_messages_and_batches_its_io_thread() -> None:
    ctx = zmq.Context()
    before = set(os.listdir("/proc/self/task"))
    try:
        tuned = tune_io_threads(ctx)
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        assert server.poll(5000)
        peer, body = server.recv_multipart()
        server.send_multipart([peer, body])
        assert client.poll(5000) and client.recv() == b"ping"
        new = [
            t
            for t in set(os.listdir("/proc/self/task")) - before
            if Path(f"/proc/self/task/{t}/comm").read_text().startswith("ZMQbg/IO")
        ]
        if tuned:
            assert new and all(os.sched_getscheduler(int(t)) == os.SCHED_BATCH for t in new)
        client.close(0)
        server.close(0)
    finally:
        ctx.term()
