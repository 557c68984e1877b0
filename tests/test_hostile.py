"""The hostile-plan corpus (tests/hostile.py) against a real plan-worker: every plan a static check can
judge is refused with its named error, and after each the worker answers ping, holds every tensor
stored before, and has not registered the plan. Plans only containment can catch are run on a worker of
their own: its sandboxed runner crashes, runs out of memory or past --run-timeout, and the worker answers
that by name and keeps serving, with every tensor and plan. Everything runs against both workers (the
Python plan-worker and the Node.js one, tests/conformance/workers.py): the same corpus, the same codes
and words."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from planwire.worker.process import WorkerProcess
from tests.conformance import plans
from tests.conformance.wire import Peer, encode
from tests.conformance.workers import kinds, node_missing, start
from tests.hostile import CORPUS, Hostile

MAX_PLAN_MB = 64  # the per-tensor bound of constant sizes is max_plan_bytes
WITNESS = {"w-float": np.arange(12, dtype=np.float32).reshape(3, 4), "w-int": np.array([-7, 2**40], np.int64)}

REFUSED = [pytest.param(h, id=h.name) for h in CORPUS if not h.contained]
CONTAINED = [pytest.param(h, id=h.name) for h in CORPUS if h.contained]
HARM = {  # what the sandbox answers each contained plan's run: the signal, the memory bound, the time bound
    "int64 Div(INT64_MIN, -1)": "plan_crashed",
    "int32 Div(INT32_MIN, -1)": "plan_crashed",
    "shape read from the data": "out_of_memory",
    "trip count read from the data": "plan_timeout",
}
RUN_TIMEOUT_S = 3  # for the endless one only: the others end at once, whatever the host's load


def test_the_corpus_is_large_and_every_entry_is_judged():
    assert len(CORPUS) >= 30
    assert all(h.contained != bool(h.code) for h in CORPUS)
    assert {h.code for h in CORPUS if h.code} == {"bad_plan", "plan_too_large"}
    assert {h.name for h in CORPUS if h.contained} == set(HARM)


@pytest.fixture(scope="module", params=kinds())
def worker(request: pytest.FixtureRequest) -> Iterator[tuple[WorkerProcess, Peer]]:
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    with start(request.param, "hostile", extra=["--max-plan-mb", str(MAX_PLAN_MB)]) as proc:
        peer = Peer(proc.url, timeout=60)
        for key, value in WITNESS.items():
            peer.put(key, value)
        peer.register(plans.sum_and_diff())
        yield proc, peer
        peer.close()


def assert_intact(peer: Peer) -> None:
    assert peer.ok({"type": "ping"}).kind == "ok"
    for key, value in WITNESS.items():
        np.testing.assert_array_equal(peer.get1(key, keep=True), value)
    assert peer.ok({"type": "has_plan", "plan": plans.plan_id(plans.sum_and_diff())}).kind == "plan"


@pytest.mark.parametrize("hostile", REFUSED)
def test_a_hostile_plan_is_refused_with_a_named_error(worker, hostile: Hostile):
    proc, peer = worker
    data = hostile.build()
    reply = peer.error({"type": "register_plan", "name": "hostile"}, [data], code=hostile.code)
    for word in hostile.words:
        assert word in reply["message"], reply["message"]
    assert proc.proc.poll() is None
    assert_intact(peer)
    assert peer.ok({"type": "has_plan", "plan": plans.plan_id(data)}).kind == "missing"


@pytest.mark.parametrize("kind", kinds())
@pytest.mark.parametrize("hostile", CONTAINED)
def test_a_plan_only_containment_can_catch_costs_at_most_its_run(hostile: Hostile, kind: str):
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    code = HARM[hostile.name]
    extra = ["--run-timeout", str(RUN_TIMEOUT_S)] if code == "plan_timeout" else []
    with start(kind, "contained", extra=extra) as proc, Peer(proc.url, timeout=60) as peer:
        for key, value in WITNESS.items():
            peer.put(key, value)
        pid = peer.register(hostile.build(), name=hostile.name)["plan"]
        args = hostile.run() if hostile.run else []
        wire_args, frames = [], []
        for a in args:
            desc, data = encode(a)
            wire_args.append({"tensor": {**desc, "frame": len(frames)}})
            frames.append(data)
        peer.send({"type": "run", "plan": pid, "args": wire_args, "outputs": ["out"]}, frames)
        reply = peer.recv(timeout=120)
        assert reply.kind == "error", reply
        assert reply["code"] == code, reply["message"]
        assert repr(hostile.name) in reply["message"]  # names the plan
        assert proc.proc.poll() is None
        assert_intact_without_plan(peer)
        assert peer.ok({"type": "has_plan", "plan": pid}).kind == "plan"  # a failed run keeps its plan
        failed = peer.error({"type": "get", "keys": ["out"]}, code="run_failed")
        assert f"[{code}]" in failed["message"]  # the output says why it never came (PROTOCOL.md §7.5)


def assert_intact_without_plan(peer: Peer) -> None:
    assert peer.ok({"type": "ping"}).kind == "ok"
    for key, value in WITNESS.items():
        np.testing.assert_array_equal(peer.get1(key, keep=True), value)
