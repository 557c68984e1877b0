"""Conformance suite: drives a planwire worker through raw ZeroMQ frames, as schemas/PROTOCOL.md says.

Targets:
* default: real worker processes started here, over tcp and over ipc (every test runs on both), for each
  worker kind in ``PLANWIRE_WORKERS`` (default ``python,node``: the reference ``plan-worker`` and the Node.js
  worker in worker/node; see workers.py). The Node worker's tests skip, saying why, without ``node`` or its
  node_modules;
* ``PLANWIRE_CONFORMANCE_URL=tcp://host:port``: an already running worker, in any language. The
  private-data tests also need ``PLANWIRE_CONFORMANCE_PRIVATE_URL`` (a worker holding the arrays of
  data.py as its own data, not public) and ``PLANWIRE_CONFORMANCE_PUBLIC_URL`` (the same, public); they
  are skipped without them; the release-rule tests need ``PLANWIRE_CONFORMANCE_POLICY_URL`` (data.py's
  arrays, not public, with the rules of policy.py). Limits tests expect the worker's default limits to be
  at least 16 MiB.

Run alone, without the rest of planwire's tests: ``pytest tests/conformance --confcutdir tests/conformance``.
Only this file knows how to start the reference worker; the tests speak the protocol and nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .data import write
from .wire import Peer
from .workers import kinds, node_missing, start

try:  # every reply is validated against schemas/*.json: without jsonschema the suite refuses to run
    import jsonschema  # noqa: F401
except ImportError as e:
    raise ImportError(
        "the conformance suite validates every reply against schemas/*.json and needs jsonschema: "
        "pip install jsonschema (or planwire[dev])"
    ) from e

URL_ENV = "PLANWIRE_CONFORMANCE_URL"
PRIVATE_ENV = "PLANWIRE_CONFORMANCE_PRIVATE_URL"
PUBLIC_ENV = "PLANWIRE_CONFORMANCE_PUBLIC_URL"
POLICY_ENV = "PLANWIRE_CONFORMANCE_POLICY_URL"

TRANSPORTS = ["external"] if os.environ.get(URL_ENV) else ["tcp", "ipc"]
WORKERS = ["external"] if os.environ.get(URL_ENV) else kinds()


class _Workers:
    """Workers started on demand, one per (kind, transport, role), stopped at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pwc-"))  # short: ipc paths must stay under ~100 bytes
        self.procs: dict[tuple[str, str], object] = {}

    def url(self, kind: str, transport: str, role: str) -> str:
        if (kind, transport, role) not in self.procs:
            # The only use of planwire in the suite: launching the workers (workers.py).
            listen = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{self.dir}/{kind}-{role}.ipc"
            data, extra = [], []
            if role in ("private", "public", "policy"):
                data = [f"{write(self.dir)}:conformance"]
            if role == "public":
                extra = ["--public"]
            if role == "policy":
                from .policy import write as write_policy

                extra = ["--policy", str(write_policy(self.dir)), "--plans-dir", "none"]
            self.procs[(kind, transport, role)] = start(
                kind, f"conformance-{role}-{transport}", listen=listen, data=data, extra=extra
            )
        return self.procs[(kind, transport, role)].url  # type: ignore[attr-defined]

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _workers() -> Iterator[_Workers]:
    workers = _Workers()
    yield workers
    workers.close()


@pytest.fixture(scope="session", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session", params=WORKERS)
def worker_kind(request: pytest.FixtureRequest) -> str:
    """Which worker implementation is under test: python, node, or external."""
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    return request.param


def _url(workers: _Workers, kind: str, transport: str, role: str) -> str:
    if transport != "external":
        return workers.url(kind, transport, role)
    env = {"plain": URL_ENV, "private": PRIVATE_ENV, "public": PUBLIC_ENV, "policy": POLICY_ENV}[role]
    url = os.environ.get(env)
    if not url:
        pytest.skip(f"set {env} to test a worker's own data")
    return url


@pytest.fixture(scope="session")
def url(_workers: _Workers, worker_kind: str, transport: str) -> str:
    """The worker under test."""
    return _url(_workers, worker_kind, transport, "plain")


@pytest.fixture(scope="session")
def private_url(_workers: _Workers, worker_kind: str, transport: str) -> str:
    """A worker holding data.OWN as its own, non-public data."""
    return _url(_workers, worker_kind, transport, "private")


@pytest.fixture(scope="session")
def policy_url(_workers: _Workers, worker_kind: str, transport: str) -> str:
    """A worker holding data.OWN as its own, non-public data, with the release rules of policy.py."""
    return _url(_workers, worker_kind, transport, "policy")


@pytest.fixture(scope="session")
def public_url(_workers: _Workers, worker_kind: str, transport: str) -> str:
    """A worker holding data.OWN as its own, public data."""
    return _url(_workers, worker_kind, transport, "public")


@pytest.fixture
def connect() -> Iterator:
    """``connect(url) -> Peer``; every peer is closed after the test."""
    peers: list[Peer] = []

    def make(url: str, timeout: float = 10.0) -> Peer:
        peers.append(Peer(url, timeout=timeout))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


@pytest.fixture
def peer(connect, url: str) -> Peer:
    return connect(url)


@pytest.fixture
def uid() -> str:
    """A unique prefix for keys and tags: tests share long-lived workers."""
    return f"c{uuid.uuid4().hex[:10]}"
