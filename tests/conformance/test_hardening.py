"""PROTOCOL.md §2, §3, §5, §7.3 and §9: headers with duplicate keys, shapes no array can hold, ports of
unknown rank, delete_plan, and plans whose size or running time is knowably too large."""

from __future__ import annotations

import json

import numpy as np
import pytest

from . import plans
from .wire import SIGNATURE


def raw(peer, header: bytes, frames=()):
    peer.send_frames([SIGNATURE, header, *frames])
    return peer.recv()


# -- duplicate keys (§2) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b'{"type": "ping", "id": 1, "id": 2}',
        b'{"type": "ping", "type": "ping", "id": 3}',
        b'{"type": "get", "id": 4, "keys": [], "keep": false, "keep": true}',
        # escapes take the slow path: the colon inside the tag is written as \\u003a
        b'{"type": "search", "id": 5, "tags": ["a\\u003ab"], "tags": []}',
        # the two requests of a tiny call, whose members are counted without encoding them
        b'{"type": "delete", "id": 8, "keys": ["a:b"], "keys": []}',
        b'{"type": "run", "id": 9, "plan": "p", "args": [{"ref": "x"}], "outputs": ["y"], "id": 10}',
    ],
)
def test_a_header_with_a_duplicate_key_is_refused(peer, header):
    reply = raw(peer, header)
    assert reply["code"] == "bad_header" and reply["re"] == -1
    assert "duplicate key" in reply["message"]
    assert peer.ok({"type": "ping"}).kind == "ok"


def test_a_duplicate_key_inside_a_nested_object_is_refused(peer, uid):
    header = (
        b'{"type": "put", "id": 6, "tensors": [{"key": "%s-a", "key": "%s-b", "dtype": "uint8", "shape": [1], '
        b'"frame": 0}]}' % (uid.encode(), uid.encode())
    )
    reply = raw(peer, header, [b"\x07"])
    assert reply["code"] == "bad_header" and "'key'" in reply["message"]
    found = peer.ok({"type": "search", "tags": []})
    assert not [t for t in found["tensors"] if t["key"].startswith(uid)]  # nothing stored


def test_explicit_defaults_and_escapes_without_duplicates_are_accepted(peer, uid):
    peer.put(f"{uid}:x", np.arange(3, dtype=np.int32), tags=[f"{uid}:t"])
    reply = raw(peer, b'{"type": "get", "id": 7, "keys": ["%s\\u003ax"], "keep": false}' % uid.encode())
    assert reply.kind == "tensors" and reply["re"] == 7
    assert reply.array_list()[0].tolist() == [0, 1, 2]


# -- shapes (§3) ---------------------------------------------------------------------------------------


def test_more_than_64_axes_is_invalid(peer, uid):
    header = {"type": "put", "tensors": [{"key": uid, "dtype": "uint8", "shape": [1] * 65, "frame": 0}]}
    reply = peer.error(header, [b"\x01"], code="invalid_message")
    assert "64" in reply["message"]
    assert peer.ok({"type": "put", "tensors": [{**header["tensors"][0], "shape": [1] * 64}]}, [b"\x01"])


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 0, 2**62], [0, 2**40, 2**40]])
def test_an_empty_shape_no_array_can_hold_is_invalid_not_internal(peer, uid, shape):
    header = {"type": "put", "tensors": [{"key": uid, "dtype": "float", "shape": shape, "frame": 0}]}
    reply = peer.error(header, [b""], code="invalid_message")
    assert "shape" in reply["message"] and str(shape[1]) in reply["message"]
    run_header, frames = peer.run_header("0" * 64, [], [f"{uid}-out"])
    run_header["args"] = [{"tensor": {"dtype": "double", "shape": shape, "frame": 0}}]
    assert peer.request(run_header, [b""])["code"] in ("invalid_message", "unknown_plan")
    assert peer.ok({"type": "ping"}).kind == "ok"


# -- ports of unknown rank (§5) ----------------------------------------------------------------------


def test_a_port_of_unknown_rank_has_shape_null_and_takes_any_shape(peer, uid):
    info = peer.register(plans.any_rank("float"))
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": None}]
    assert info["outputs"] == [{"name": "y", "dtype": "float", "shape": None}]
    for value in (np.float32(2.5), np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2, 1, 2), np.float32)):
        reply = peer.run(info["plan"], [value], [f"{uid}-y"], fetch=[0])
        np.testing.assert_array_equal(reply.array_list()[0], value)
    reply = peer.error(*peer.run_header(info["plan"], [np.ones(2, np.int32)], [f"{uid}-y"]), code="bad_argument")
    assert "dtype" in reply["message"]


def test_a_scalar_port_has_shape_empty_list(peer):
    info = peer.register(plans.identity("float", []))
    assert info["inputs"][0]["shape"] == []


# -- delete_plan (§5) ----------------------------------------------------------------------------------


def test_delete_plan_unregisters_and_is_idempotent(peer, uid):
    pid = peer.register(plans.identity("int16", [3]))["plan"]
    assert peer.run(pid, [np.arange(3, dtype=np.int16)], [f"{uid}-a"]).kind == "ok"
    assert peer.ok({"type": "delete_plan", "plan": pid}).kind == "ok"
    assert peer.ok({"type": "has_plan", "plan": pid}).kind == "missing"
    peer.error(*peer.run_header(pid, [np.arange(3, dtype=np.int16)], [f"{uid}-b"]), code="unknown_plan")
    assert peer.ok({"type": "delete_plan", "plan": pid}).kind == "ok"  # again: nothing to do
    assert peer.ok({"type": "delete_plan", "plan": "not a plan id"}).kind == "ok"
    assert peer.get1(f"{uid}-a").tolist() == [0, 1, 2]  # its outputs stay
    assert peer.register(plans.identity("int16", [3]))["plan"] == pid  # and it can come back


def test_delete_plan_needs_a_plan(peer):
    peer.error({"type": "delete_plan"}, code="invalid_message")


# -- plans knowably too large (§7.3) ------------------------------------------------------------------


def test_a_loop_that_never_ends_is_refused(peer):
    reply = peer.error({"type": "register_plan", "name": "endless"}, [plans.endless_loop()], code="plan_too_large")
    assert "Loop" in reply["message"] and "never ends" in reply["message"]


def test_a_constant_of_shape_bomb_is_refused(peer):
    data = plans.constant_of_shape_bomb()
    assert len(data) < 200
    reply = peer.error({"type": "register_plan", "name": "bomb"}, [data], code="plan_too_large")
    assert "ConstantOfShape" in reply["message"] and "1048576" in reply["message"]
    assert peer.ok({"type": "has_plan", "plan": plans.plan_id(data)}).kind == "missing"


# -- untrusted text (§9) -----------------------------------------------------------------------------


def test_a_control_character_in_type_is_refused_and_echoed_as_json(peer):
    reply = raw(peer, json.dumps({"type": "ping\nforged", "id": 8}).encode())
    assert reply["code"] == "unknown_type" and reply["re"] == 8
    assert peer.ok({"type": "ping"}).kind == "ok"
