"""PROTOCOL.md §6.3: every tensor and plan belongs to its client; another client's objects read as missing."""

from __future__ import annotations

import numpy as np
import pytest

from . import plans
from .data import TAG


@pytest.fixture
def a(connect, url):
    return connect(url)


@pytest.fixture
def b(connect, url):
    return connect(url)


def test_another_clients_tensor_reads_as_missing(a, b, uid):
    a.put(uid, np.arange(3, dtype=np.int64), tags=[f"{uid}-tag"])
    missing = b.error({"type": "get", "keys": [uid]}, code="unknown_tensor")
    assert b.error({"type": "get", "keys": [f"{uid}-never"]}, code="unknown_tensor")["message"] == missing[
        "message"
    ].replace(uid, f"{uid}-never")  # exactly like a key nobody stored
    b.error({"type": "get", "keys": [uid], "keep": True}, code="unknown_tensor")
    b.error({"type": "describe", "keys": [uid]}, code="unknown_tensor")
    assert b.ok({"type": "search", "tags": [f"{uid}-tag"]})["tensors"] == []
    assert all(t["key"] != uid for t in b.ok({"type": "search", "tags": []})["tensors"])
    b.ok({"type": "delete", "keys": [uid]})  # ignored, as an unknown key
    assert a.get1(uid, keep=True).tolist() == [0, 1, 2]  # untouched by all of that


def test_a_put_on_another_clients_key_makes_its_own(a, b, uid):
    a.put(uid, np.int64([1]))
    b.put(uid, np.int64([2]))
    assert b.get1(uid).tolist() == [2]  # moved b's own
    assert a.get1(uid).tolist() == [1]


def test_a_refused_run_cannot_destroy_another_clients_result(a, b, uid):
    pid_a = a.register(plans.double_abs())["plan"]
    a.run(pid_a, [np.float32([1, -2])], [uid])
    # b names a's output key in a run that is refused (unknown plan for b, then bad arguments)
    b.error(*b.run_header(pid_a, [np.float32([1])], [uid]), code="unknown_plan")
    pid_b = b.register(plans.double_abs())["plan"]
    b.error(*b.run_header(pid_b, [np.int64([1])], [uid]), code="bad_argument")
    b.error({"type": "get", "keys": [uid]}, code="run_failed")  # b's own record of its refused run
    assert a.get1(uid).tolist() == [2.0, 4.0]


def test_plans_belong_to_their_clients(a, b, uid):
    data = plans.sum_and_diff()
    pid = a.register(data)["plan"]
    assert a.ok({"type": "has_plan", "plan": pid}).kind == "plan"
    assert b.ok({"type": "has_plan", "plan": pid}).kind == "missing"
    x = np.ones((1, 2), np.float32)
    reply = b.error(*b.run_header(pid, [x, x], [uid]), code="unknown_plan")
    assert pid[:12] in reply["message"]
    assert b.register(data)["plan"] == pid  # the same bytes: b's own hold of the same plan
    a.ok({"type": "delete_plan", "plan": pid})
    assert a.ok({"type": "has_plan", "plan": pid}).kind == "missing"
    assert b.run(pid, [x, x], [uid, f"{uid}-d"], fetch=[0]).arrays()[uid].tolist() == [[2.0, 2.0]]


def test_a_reconnecting_client_keeps_its_objects(connect, url, uid):
    first = connect(url)
    welcome = first.ok({"type": "hello", "client": "conformance"})
    identity = welcome["identity"]
    assert isinstance(identity, str) and len(identity) >= 32
    first.put(uid, np.int64([5]))
    pid = first.register(plans.double_abs())["plan"]
    first.close()
    second = connect(url)
    second.error({"type": "get", "keys": [uid], "keep": True}, code="unknown_tensor")  # before its hello
    assert second.ok({"type": "hello", "identity": identity})["identity"] == identity
    assert second.get1(uid, keep=True).tolist() == [5]
    assert second.ok({"type": "has_plan", "plan": pid}).kind == "plan"


def test_an_identity_the_worker_did_not_issue_gets_nothing(a, connect, url, uid):
    identity = a.ok({"type": "hello"})["identity"]
    a.put(uid, np.int64([5]))
    other = connect(url)
    forged = identity[:-2] + ("AA" if identity[-2:] != "AA" else "BB")
    new = other.ok({"type": "hello", "identity": forged})["identity"]
    assert new not in (forged, identity)
    other.error({"type": "get", "keys": [uid]}, code="unknown_tensor")


def test_objects_made_before_hello_stay_the_clients(a, uid):
    a.put(uid, np.int64([3]))
    identity = a.ok({"type": "hello"})["identity"]
    assert a.ok({"type": "hello"})["identity"] == identity  # one identity per client
    assert a.get1(uid).tolist() == [3]


def test_nobody_can_plant_tensors_among_the_workers_data(connect, private_url, uid):
    a, b = connect(private_url), connect(private_url)
    a.put(f"{uid}-planted", np.zeros((2, 3), np.float32), tags=[TAG, "weights"])
    found = b.ok({"type": "search", "tags": [TAG, "weights"]})["tensors"]
    assert [t["owner"] for t in found] == ["worker"]  # b sees only the real data
    mine = a.ok({"type": "search", "tags": [TAG, "weights"]})["tensors"]
    assert sorted(t.get("owner", "client") for t in mine) == ["client", "worker"]  # a's own is marked as such
