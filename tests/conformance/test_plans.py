"""PROTOCOL.md §5 and §7: register_plan, has_plan, run (refs, inline, fetch, dynamic axes, failures)."""

from __future__ import annotations

import numpy as np
import pytest

from . import plans
from .wire import Peer

F = np.float32


@pytest.fixture
def sum_diff(peer: Peer) -> str:
    return peer.register(plans.sum_and_diff(), name="sum_and_diff")["plan"]


def test_plan_id_is_the_sha256_of_the_bytes_and_ports_come_from_the_graph(peer):
    data = plans.sum_and_diff()
    reply = peer.register(data, name="sum_and_diff")
    assert reply["plan"] == plans.plan_id(data)
    assert reply["inputs"] == [
        {"name": "x", "dtype": "float", "shape": ["N", 2]},
        {"name": "y", "dtype": "float", "shape": ["N", 2]},
    ]
    assert [o["name"] for o in reply["outputs"]] == ["s", "d"]
    assert all(o["dtype"] == "float" and o["shape"][1] == 2 for o in reply["outputs"])


def test_registering_twice_is_a_no_op_with_the_same_reply(peer, connect, url):
    data = plans.double_abs()
    first = peer.register(data, name="one")
    second = peer.register(data, name="another name")
    third = connect(url).register(data)  # another connection: plans are per worker
    for r in (second, third):
        assert {k: r[k] for k in ("plan", "inputs", "outputs")} == {k: first[k] for k in ("plan", "inputs", "outputs")}


def test_plan_bytes_may_be_in_any_frame(peer):
    data = plans.identity("int32")
    reply = peer.ok({"type": "register_plan", "frame": 1}, [b"not this one", data])
    assert reply.kind == "plan" and reply["plan"] == plans.plan_id(data)


def test_has_plan(peer, sum_diff):
    reply = peer.ok({"type": "has_plan", "plan": sum_diff})
    assert reply.kind == "plan" and reply["plan"] == sum_diff and len(reply["inputs"]) == 2
    missing = "0" * 64
    reply = peer.ok({"type": "has_plan", "id": 77, "plan": missing})
    assert reply.kind == "missing" and reply["plan"] == missing and reply["re"] == 77


def test_run_by_ref(peer, sum_diff, uid):
    x, y = np.arange(6, dtype=F).reshape(3, 2), np.ones((3, 2), F)
    peer.put(f"{uid}-x", x)
    peer.put(f"{uid}-y", y)
    reply = peer.run(sum_diff, [f"{uid}-x", f"{uid}-y"], [f"{uid}-s", f"{uid}-d"])
    assert reply.kind == "ok"
    s, d = peer.get([f"{uid}-s", f"{uid}-d"])
    assert np.array_equal(s, x + y) and np.array_equal(d, x - y)
    assert np.array_equal(peer.get1(f"{uid}-x", keep=True), x)  # arguments are not consumed


def test_run_inline(peer, sum_diff, uid):
    x, y = np.full((2, 2), 3, F), np.full((2, 2), 1, F)
    assert peer.run(sum_diff, [x, y], [f"{uid}-s", f"{uid}-d"]).kind == "ok"
    assert peer.get1(f"{uid}-d").tolist() == [[2, 2], [2, 2]]


def test_run_mixed_ref_and_inline_with_fetch(peer, sum_diff, uid):
    x, y = np.arange(4, dtype=F).reshape(2, 2), np.full((2, 2), 10, F)
    peer.put(f"{uid}-x", x)
    reply = peer.run(sum_diff, [f"{uid}-x", y], [f"{uid}-s", f"{uid}-d"], fetch=[1])
    assert reply.kind == "tensors" and [t["key"] for t in reply["tensors"]] == [f"{uid}-d"]
    assert np.array_equal(reply.arrays()[f"{uid}-d"], x - y)
    assert np.array_equal(peer.get1(f"{uid}-s"), x + y)  # not fetched: stored
    assert np.array_equal(peer.get1(f"{uid}-d"), x - y)  # fetched: stored as well


def test_fetch_order_follows_fetch(peer, sum_diff, uid):
    x = np.ones((1, 2), F)
    reply = peer.run(sum_diff, [x, x], [f"{uid}-s", f"{uid}-d"], fetch=[1, 0])
    assert [t["key"] for t in reply["tensors"]] == [f"{uid}-d", f"{uid}-s"]
    assert [t["frame"] for t in reply["tensors"]] == [0, 1]


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_dynamic_axes(peer, uid, n):
    pid = peer.register(plans.matmul())["plan"]
    a, b = np.ones((n, 3), F), np.arange(3 * (n + 1), dtype=F).reshape(3, n + 1)
    reply = peer.run(pid, [a, b], [uid], fetch=[0])
    assert np.allclose(reply.arrays()[uid], a @ b)
    assert peer.ok({"type": "describe", "keys": [uid]})["tensors"][0]["shape"] == [n, n + 1]


def test_dynamic_axis_of_unknown_size_in_ports(peer):
    reply = peer.register(plans.matmul())
    assert reply["inputs"][0]["shape"] == ["N", "K"] and reply["outputs"][0]["shape"] == ["N", "M"]


def test_results_can_feed_runs_before_anything_is_read(peer, uid):
    pid = peer.register(plans.double_abs())["plan"]
    peer.put(f"{uid}-0", np.array([-1, 2], F))
    for i in range(5):  # fire and forget: nothing is read until the end
        peer.send(peer.run_header(pid, [f"{uid}-{i}"], [f"{uid}-{i + 1}"])[0])
    assert [peer.recv().kind for _ in range(5)] == ["ok"] * 5
    assert peer.get1(f"{uid}-5").tolist() == [32, 64]


def test_run_in_place(peer, uid):
    pid = peer.register(plans.double_abs())["plan"]
    peer.put(uid, np.array([-1.5], F))
    peer.run(pid, [uid], [uid])
    peer.run(pid, [uid], [uid])
    assert peer.get1(uid).tolist() == [6.0]


def test_run_overwrites_outputs(peer, uid):
    pid = peer.register(plans.identity("int64"))["plan"]
    peer.put(uid, np.zeros(5, np.float64), tags=["old"])
    peer.run(pid, [np.array([4, 5], np.int64)], [uid])
    assert peer.ok({"type": "describe", "keys": [uid]})["tensors"][0]["dtype"] == "int64"


def test_metadata_plan_runs_from_its_graph(peer, uid):
    reply = peer.register(plans.with_metadata())
    assert [p["name"] for p in reply["inputs"]] == ["x"]  # the state initializer is not a port
    out = peer.run(reply["plan"], [np.ones((2, 2), F)], [uid], fetch=[0]).arrays()[uid]
    assert out.tolist() == [[2, 3], [2, 3]]


# -- failures -----------------------------------------------------------------------------------------------


def test_failed_run_is_reported_and_recorded_against_its_outputs(peer, uid):
    pid = peer.register(plans.reshape_to_3(), name="reshape_to_3")["plan"]
    assert peer.run(pid, [np.ones(3, F)], [uid], fetch=[0]).arrays()[uid].tolist() == [1, 1, 1]
    peer.put(f"{uid}-4", np.ones(4, F))
    header, frames = peer.run_header(pid, [f"{uid}-4"], [uid])
    run_reply = peer.error(header, frames, code="run_failed")
    assert "reshape_to_3" in run_reply["message"]
    for req in ({"type": "get", "keys": [uid]}, {"type": "describe", "keys": [uid]}):
        reply = peer.error(req, code="run_failed")  # the old value is gone; the failure is there
        assert "reshape_to_3" in reply["message"]
    chained = peer.error(*peer.run_header(pid, [uid], [f"{uid}-next"]), code="run_failed")
    assert "reshape_to_3" in chained["message"]
    peer.error({"type": "get", "keys": [f"{uid}-next"]}, code="run_failed")
    # writing the key again clears the failure
    peer.run(pid, [np.zeros(3, F)], [uid])
    assert peer.get1(uid).tolist() == [0, 0, 0]
    peer.ok({"type": "delete", "keys": [f"{uid}-next"]})
    peer.error({"type": "get", "keys": [f"{uid}-next"]}, code="unknown_tensor")


def test_fire_and_forget_failure_surfaces_on_get(peer, uid):
    pid = peer.register(plans.reshape_to_3())["plan"]
    peer.send(*peer.run_header(pid, [np.ones(5, F)], [uid]))  # reply not read yet
    rid = peer.send({"type": "get", "keys": [uid]})
    assert peer.recv()["code"] == "run_failed"  # the run's own reply comes first
    reply = peer.recv()
    assert reply["re"] == rid and reply["code"] == "run_failed"


def test_unknown_plan(peer, uid):
    missing = "f" * 64
    reply = peer.error(*peer.run_header(missing, [np.ones(1, F)], [uid]), code="unknown_plan")
    assert "ffffffffffff" in reply["message"]
    assert "unknown_plan" in peer.error({"type": "get", "keys": [uid]}, code="run_failed")["message"]


def test_unknown_ref(peer, sum_diff, uid):
    reply = peer.error(
        *peer.run_header(sum_diff, [f"{uid}-nope", np.ones((1, 2), F)], [f"{uid}-s", f"{uid}-d"]),
        code="unknown_tensor",
    )
    assert f"{uid}-nope" in reply["message"]


@pytest.mark.parametrize("bad", ["dtype", "shape", "rank", "count"])
def test_arguments_must_fit_the_ports(peer, sum_diff, uid, bad):
    x = np.ones((2, 2), F)
    args = {
        "dtype": [x, x.astype(np.float64)],
        "shape": [x, np.ones((2, 3), F)],
        "rank": [x, np.ones(4, F)],
        "count": [x],
    }[bad]
    reply = peer.error(*peer.run_header(sum_diff, args, [f"{uid}-s", f"{uid}-d"]), code="bad_argument")
    if bad != "count":
        assert "argument 1" in reply["message"] or "'y'" in reply["message"]


def test_number_of_output_keys_must_match(peer, sum_diff, uid):
    x = np.ones((1, 2), F)
    reply = peer.error(*peer.run_header(sum_diff, [x, x], [uid]), code="bad_argument")
    assert "2" in reply["message"] and uid in reply["message"]


def test_output_keys_must_be_distinct(peer, sum_diff, uid):
    x = np.ones((1, 2), F)
    peer.put(uid, x)
    reply = peer.error(*peer.run_header(sum_diff, [x, x], [uid, uid]), code="invalid_message")
    assert uid in reply["message"]
    assert peer.get1(uid).tolist() == x.tolist()  # refused as invalid: nothing recorded


def test_fetch_out_of_range(peer, sum_diff, uid):
    x = np.ones((1, 2), F)
    reply = peer.error(*peer.run_header(sum_diff, [x, x], [f"{uid}-s", f"{uid}-d"], fetch=[2]), code="bad_argument")
    assert "fetch" in reply["message"] and "2" in reply["message"]


def test_argument_needs_exactly_one_of_ref_and_tensor(peer, sum_diff, uid):
    both = {"ref": "k", "tensor": {"dtype": "float", "shape": [1, 2], "frame": 0}}
    for arg in (both, {}):
        header = {
            "type": "run",
            "plan": sum_diff,
            "args": [arg, {"ref": "k"}],
            "outputs": [f"{uid}-s", f"{uid}-d"],
        }
        peer.error(header, [np.ones((1, 2), F).tobytes()], code="invalid_message")
    header["args"][0] = {"ref": None}
    peer.error(header, code="invalid_message")


def test_inline_argument_frame_out_of_range(peer, sum_diff, uid):
    header = {
        "type": "run",
        "plan": sum_diff,
        "outputs": [f"{uid}-s", f"{uid}-d"],
        "args": [
            {"tensor": {"dtype": "float", "shape": [1, 2], "frame": 0}},
            {"tensor": {"dtype": "float", "shape": [1, 2], "frame": 3}},
        ],
    }
    reply = peer.error(header, [np.ones((1, 2), F).tobytes()], code="bad_frames")
    assert "3" in reply["message"]


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: b"definitely not onnx", None),
        (lambda: b"", None),
        (plans.external_initializer, "weights.bin"),
        (plans.external_constant, "secret.txt"),
        (plans.custom_domain, "com.example.evil"),
        (plans.contrib_domain, "com.microsoft"),
    ],
    ids=["garbage", "empty", "external-initializer", "external-constant", "custom-domain", "contrib-domain"],
)
def test_hostile_plans_are_refused(peer, make, needle):
    data = make()
    reply = peer.error({"type": "register_plan", "name": "hostile"}, [data], code="bad_plan")
    if needle:
        assert needle in reply["message"]
    assert peer.ok({"type": "has_plan", "plan": plans.plan_id(data)}).kind == "missing"


def test_inline_max_returns_small_outputs_after_fetched_ones(peer, sum_diff, uid):
    x, y = np.arange(4, dtype=F).reshape(2, 2), np.ones((2, 2), F)  # each output: 16 bytes
    header, frames = peer.run_header(sum_diff, [x, y], [f"{uid}-s", f"{uid}-d"], fetch=[1])
    reply = peer.ok({**header, "inline_max": 16}, frames)
    assert [t["key"] for t in reply["tensors"]] == [f"{uid}-d", f"{uid}-s"]  # fetch first, then by output
    assert np.array_equal(reply.arrays()[f"{uid}-s"], x + y)
    header, frames = peer.run_header(sum_diff, [x, y], [f"{uid}-s2", f"{uid}-d2"])
    assert peer.ok({**header, "inline_max": 15}, frames).kind == "ok"  # nothing small enough
    assert np.array_equal(peer.get1(f"{uid}-s2"), x + y)  # returned or not, outputs are stored
