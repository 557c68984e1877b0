"""Shared fixtures: every worker-facing test runs against an in-process VirtualWorker, against real
plan-worker processes over tcp and ipc loopback, and against the Node.js worker (worker/node, over tcp;
skipped, saying why, without node or its packages), through one parametrized factory."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planwire.transport import Client, connect
from planwire.transport.arrays import as_array, tags_of
from planwire.worker import VirtualWorker
from planwire.worker.process import WorkerProcess
from tests.conformance.wire import Peer
from tests.conformance.workers import NodeWorkerProcess, node_missing

WORKER_KINDS = ("virtual", "tcp", "ipc", "node")
_ipc_ids = itertools.count()

WorkerFactory = Callable[..., Client]
RawWorker = Callable[..., tuple[WorkerProcess, Peer]]


def start_worker(
    kind: str, id: str, data: Sequence[Any] = (), *, public: bool = False, tmp: Path, stack: list
) -> Client:
    """A worker of ``kind`` holding ``data`` (tensors with tags) as its own private tensors."""
    if kind == "virtual":
        w = VirtualWorker(None, id=id, data=data, public=public)
        stack.append(w)
        return w
    files = []
    for i, t in enumerate(data):
        path = tmp / f"{id}-{i}.npy"
        np.save(path, as_array(t), allow_pickle=False)
        tags = ",".join(tags_of(t))
        files.append(f"{path}:{tags}" if tags else f"{path}:")
    listen = "tcp://127.0.0.1:0" if kind in ("tcp", "node") else f"ipc://{tmp}/w{next(_ipc_ids)}.ipc"
    launch = NodeWorkerProcess if kind == "node" else WorkerProcess
    proc = launch(id, listen=listen, data=files, extra=["--public"] if public else [])
    stack.append(proc)
    w = connect(proc.url, timeout=20)
    stack.append(w)
    return w


@pytest.fixture(params=WORKER_KINDS)
def worker_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    return request.param


@pytest.fixture
def worker_factory(worker_kind: str) -> Iterator[WorkerFactory]:
    """``make(id, data=(...), public=False)`` -> a worker of the parametrized kind, stopped after the test."""
    stack: list = []
    with tempfile.TemporaryDirectory(prefix="pw-test-") as tmp:
        yield lambda id="worker", data=(), public=False: start_worker(
            worker_kind, id, data, public=public, tmp=Path(tmp), stack=stack
        )
        for obj in reversed(stack):
            obj.close()


@pytest.fixture
def worker(worker_factory: WorkerFactory) -> Client:
    return worker_factory("device_1")


@pytest.fixture
def raw_worker() -> Iterator[RawWorker]:
    """``start(id, kind="ipc", extra=(...), timeout=30, ready_timeout=30)`` -> (a real worker process, a
    raw-frame Peer connected to it): the Python plan-worker over ``ipc`` or ``tcp`` loopback, or the Node.js
    one (``node``, over tcp); both stopped after the test (the peer first)."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pw-raw-")))

        def start(
            id: str,
            *,
            kind: str = "ipc",
            extra: Sequence[str] = (),
            timeout: float = 30.0,
            ready_timeout: float = 30.0,
        ) -> tuple[WorkerProcess, Peer]:
            listen = f"ipc://{tmp}/w{next(_ipc_ids)}.ipc" if kind == "ipc" else "tcp://127.0.0.1:0"
            launch = NodeWorkerProcess if kind == "node" else WorkerProcess
            proc = launch(id, listen=listen, extra=list(extra), ready_timeout=ready_timeout)
            stack.callback(proc.close)
            peer = Peer(proc.url, timeout=timeout)
            stack.callback(peer.close)
            return proc, peer

        yield start
