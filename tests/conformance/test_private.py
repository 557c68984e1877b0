"""PROTOCOL.md §6.2: the worker's own data: found, usable by plans, never read, overwritten or deleted."""

from __future__ import annotations

import numpy as np
import pytest

from . import plans
from .data import OWN, TAG


def own_keys(peer) -> dict[str, dict]:
    """Name in data.OWN -> its `found` entry, discovered by tags."""
    out = {}
    for name in OWN:
        found = peer.ok({"type": "search", "tags": [TAG, name]})["tensors"]
        assert len(found) == 1, found
        out[name] = found[0]
    return out


@pytest.fixture
def private(connect, private_url):
    return connect(private_url)


@pytest.fixture
def public(connect, public_url):
    return connect(public_url)


def test_own_data_is_found_and_marked_private(private):
    for name, info in own_keys(private).items():
        assert info["private"] is True and info["owner"] == "worker"
        assert info["dtype"] == {"float32": "float", "int64": "int64"}[str(OWN[name].dtype)]
        assert info["shape"] == list(OWN[name].shape)
        assert set(info["tags"]) >= {TAG, name}
        assert private.ok({"type": "describe", "keys": [info["key"]]})["tensors"][0] == info


@pytest.mark.parametrize("keep", [False, True])
def test_own_data_cannot_be_read(private, keep):
    key = own_keys(private)["weights"]["key"]
    reply = private.error({"type": "get", "keys": [key], "keep": keep}, code="forbidden")
    assert key in reply["message"]
    assert own_keys(private)["weights"]["key"] == key  # still there


def test_own_data_cannot_be_overwritten(private, uid):
    key = own_keys(private)["weights"]["key"]
    reply = private.error(
        {
            "type": "put",
            "tensors": [
                {"key": f"{uid}-ok", "dtype": "float", "shape": [1], "frame": 0},
                {"key": key, "dtype": "float", "shape": [1], "frame": 0},
            ],
        },
        [np.zeros(1, np.float32).tobytes()],
        code="forbidden",
    )
    assert key in reply["message"]
    private.error({"type": "describe", "keys": [f"{uid}-ok"]}, code="unknown_tensor")  # all or nothing
    assert private.ok({"type": "describe", "keys": [key]})["tensors"][0]["shape"] == [2, 3]


def test_own_data_cannot_be_deleted(private, uid):
    key = own_keys(private)["labels"]["key"]
    private.put(uid, np.ones(1, np.float32))
    reply = private.error({"type": "delete", "keys": [uid, key]}, code="forbidden")
    assert key in reply["message"]
    assert private.get1(uid).tolist() == [1.0]  # all or nothing: the client's tensor was not deleted either
    assert own_keys(private)["labels"]["key"] == key


def test_plans_may_read_own_data_and_the_result_is_private(private, uid):
    keys = own_keys(private)
    pid = private.register(plans.identity("float", [2, 3]))["plan"]
    private.run(pid, [keys["weights"]["key"]], [uid])
    (info,) = private.ok({"type": "describe", "keys": [uid]})["tensors"]
    assert info["private"] is True and info.get("owner", "client") == "client"  # the client's, but private
    reply = private.error({"type": "get", "keys": [uid], "keep": True}, code="private_data")
    assert uid in reply["message"]


def test_runs_cannot_write_own_data(private):
    keys = own_keys(private)
    key = keys["weights"]["key"]
    pid = private.register(plans.identity("float", [2, 3]))["plan"]
    reply = private.error(*private.run_header(pid, [np.zeros((2, 3), np.float32)], [key]), code="forbidden")
    assert key in reply["message"]
    assert own_keys(private)["weights"]["shape"] == [2, 3]  # intact


@pytest.mark.parametrize("keep", [False, True])
def test_public_own_data_is_copied_never_moved(public, keep):
    key = own_keys(public)["labels"]["key"]
    for _ in range(2):
        assert public.get1(key, keep=keep).tolist() == OWN["labels"].tolist()
    info = own_keys(public)["labels"]
    assert info.get("private", False) is False and info["owner"] == "worker"  # the worker's, and may leave


def test_public_own_data_still_cannot_be_deleted_or_overwritten(public):
    key = own_keys(public)["weights"]["key"]
    public.error({"type": "delete", "keys": [key]}, code="forbidden")
    public.error(
        {"type": "put", "tensors": [{"key": key, "dtype": "float", "shape": [0], "frame": 0}]},
        [b""],
        code="forbidden",
    )
    assert np.array_equal(public.get1(key), OWN["weights"])


# --- results computed from private data (§6.2) --------------------------------------------------------------

CLIENT_ARGS = {"mine": np.full((1, 3), 7, np.float32), "cond": np.array(True)}


@pytest.mark.parametrize("name", sorted(plans.LEAKS))
def test_results_of_private_data_never_leave(private, uid, name):
    data, extra = plans.LEAKS[name]
    pid = private.register(data)["plan"]
    x = own_keys(private)["weights"]["key"]
    args = [x, *(CLIENT_ARGS[a] for a in extra)]
    # fetch: refused before anything runs; the outputs are recorded as failed
    reply = private.error(*private.run_header(pid, args, [f"{uid}-f"], fetch=[0]), code="private_data")
    assert f"{uid}-f" in reply["message"] and "private" in reply["message"]
    private.error({"type": "describe", "keys": [f"{uid}-f"]}, code="run_failed")
    # inline_max: the run succeeds and stores the result, but never returns it
    header, frames = private.run_header(pid, args, [uid])
    assert private.ok({**header, "inline_max": 1 << 20}, frames).kind == "ok"
    (info,) = private.ok({"type": "describe", "keys": [uid]})["tensors"]
    assert info["private"] is True and "owner" not in info  # the client's own, and private
    for keep in (True, False):
        private.error({"type": "get", "keys": [uid], "keep": keep}, code="private_data")
    # ... and usable by a later run, whose result is private too
    again = private.register(plans.identity(info["dtype"], info["shape"]))["plan"]
    private.run(again, [uid], [f"{uid}-2"])
    private.error({"type": "get", "keys": [f"{uid}-2"]}, code="private_data")
    assert private.ok({"type": "describe", "keys": [uid]})["tensors"][0] == info  # a refused get moves nothing


def test_only_the_outputs_that_depend_on_private_data_are_private(private, uid):
    pid = private.register(plans.training_trick())["plan"]
    w = np.ones((2, 3), np.float32)
    x = own_keys(private)["weights"]["key"]
    header, frames = private.run_header(pid, [w, x], [f"{uid}-w", f"{uid}-loss"], fetch=[1])
    reply = private.ok({**header, "inline_max": 1 << 20}, frames)
    assert list(reply.arrays()) == [f"{uid}-loss"]  # new_w (the batch itself) never comes back
    assert reply.arrays()[f"{uid}-loss"] == 6.0
    private.error(*private.run_header(pid, [w, x], [f"{uid}-w2", f"{uid}-l2"], fetch=[0]), code="private_data")
    private.error({"type": "get", "keys": [f"{uid}-w"]}, code="private_data")
    infos = private.ok({"type": "describe", "keys": [f"{uid}-w", f"{uid}-loss"]})["tensors"]
    assert [i.get("private", False) for i in infos] == [True, False]
    assert private.get1(f"{uid}-loss").tolist() == 6.0


def test_the_same_plan_on_the_clients_own_data_returns_as_usual(private, uid):
    data, _ = plans.LEAKS["identity"]
    pid = private.register(data)["plan"]
    mine = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = private.run(pid, [mine], [uid], fetch=[0]).arrays()[uid]
    assert np.array_equal(out, mine)


def test_a_failed_run_on_private_data_names_no_values(private, uid):
    """onnxruntime's message for a bad Reshape quotes the requested shape: here computed from private labels."""
    pid = private.register(plans.reshape_by())["plan"]
    labels = own_keys(private)["labels"]["key"]  # [1, 0, 1]
    reply = private.error(*private.run_header(pid, [np.ones(5, np.float32), labels], [uid]), code="run_failed")
    message = reply["message"]
    assert "Reshape" in message and "int64[3]" in message and "float32[5]" in message
    assert "2,1,2" not in message.replace(" ", "")
    assert private.error({"type": "get", "keys": [uid]}, code="run_failed")["message"] == message
    # the same failure on the client's own values keeps onnxruntime's full text
    reply = private.error(*private.run_header(pid, [np.ones(5, np.float32), np.int64([1, 0, 1])], [uid]))
    assert "{2,1,2}" in reply["message"]
