"""A bug in a worker's main loop costs the request it was handling only: that request is answered ``internal``
at once (not left to the client's timeout), naming what failed; the requests around it are answered as
usual, in order, and nothing stored is lost. Nothing real is known to raise there, so the workers' test-only
fault hook stands in for the bug: ``PLANWIRE_FAULT=TYPE``, read at start, makes executing requests of that
type raise inside the supervisor (worker/supervisor.py, worker/node/src/supervisor.js)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conformance.wire import Peer
from tests.conformance.workers import node_missing
from tests.conftest import RawWorker
from tests.test_containment import FOREVER, _still_holds, _stored, add_plan, loop_plan

FAST = 5.0  # seconds an answer may take: far below the peer's 30 s timeout a lost reply would wait for


@pytest.fixture(params=["ipc", "node"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    return request.param


def _faulty(raw_worker: RawWorker, kind: str, monkeypatch: pytest.MonkeyPatch, fault: str) -> Peer:
    monkeypatch.setenv("PLANWIRE_FAULT", fault)
    extra = ["--direct-max-mb", "0"] if kind != "node" else []  # every run through the supervisor's queue
    _, peer = raw_worker("faulty", kind=kind, extra=extra, timeout=30)
    return peer


def _internal(peer: Peer, rid: int, what: str) -> None:
    reply = peer.recv(timeout=FAST)
    assert (reply["re"], reply.kind, reply["code"]) == (rid, "error", "internal"), reply
    assert f"failed handling {what} #{rid}" in reply["message"], reply["message"]
    assert "PLANWIRE_FAULT" in reply["message"], reply["message"]


def test_a_request_that_hits_a_bug_is_answered_internal_idle_and_queued(raw_worker, kind, monkeypatch) -> None:
    peer = _faulty(raw_worker, kind, monkeypatch, "has_plan")
    data = _stored(peer)
    rid = peer.send({"type": "has_plan", "plan": "0" * 64})
    _internal(peer, rid, "has_plan")
    _still_holds(peer, data)
    # behind a run in flight: queued, then answered in its turn, with what follows it answered as usual
    forever = peer.register(loop_plan(), name="forever")["plan"]
    running = peer.send(*peer.run_header(forever, [FOREVER, np.zeros(1, np.float32)], ["y"]))
    rid = peer.send({"type": "has_plan", "plan": forever})
    get = peer.send({"type": "get", "keys": ["small"], "keep": True})
    assert not peer.poll(0.5)  # all wait behind the run
    cancel = peer.send({"type": "cancel", "run": running})
    reply = peer.recv(timeout=FAST)
    assert (reply["re"], reply["code"]) == (running, "cancelled"), reply
    assert peer.recv(timeout=FAST)["re"] == cancel
    _internal(peer, rid, "has_plan")
    reply = peer.recv(timeout=FAST)
    assert reply["re"] == get
    np.testing.assert_array_equal(reply.array_list()[0], data["small"])
    _still_holds(peer, data)


def test_a_run_that_hits_a_bug_is_answered_internal_and_its_outputs_fail(raw_worker, kind, monkeypatch) -> None:
    peer = _faulty(raw_worker, kind, monkeypatch, "run")
    data = _stored(peer)
    add = peer.register(add_plan(), name="add")["plan"]
    rid = peer.send(*peer.run_header(add, ["small"], ["s1"], fetch=[0]))
    _internal(peer, rid, "run")
    failed = peer.error({"type": "get", "keys": ["s1"]}, code="run_failed")
    assert "internal" in failed["message"] and "PLANWIRE_FAULT" in failed["message"], failed["message"]
    _still_holds(peer, data)
