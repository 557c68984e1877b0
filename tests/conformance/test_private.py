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
        assert info["private"] is True
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


def test_plans_may_read_own_data(private, uid):
    keys = own_keys(private)
    pid = private.register(plans.identity("float", [2, 3]))["plan"]
    private.run(pid, [keys["weights"]["key"]], [uid])
    assert np.array_equal(private.get1(uid), OWN["weights"])  # the result is the client's


def test_runs_cannot_write_own_data(private):
    keys = own_keys(private)
    key = keys["weights"]["key"]
    pid = private.register(plans.identity("float", [2, 3]))["plan"]
    reply = private.error(*private.run_header(pid, [np.zeros((2, 3), np.float32)], [key]), code="forbidden")
    assert key in reply["message"]
    # intact: read it back through a plan (a copy under a new key)
    out = private.run(pid, [key], ["copy-of-weights"], fetch=[0]).arrays()["copy-of-weights"]
    assert np.array_equal(out, OWN["weights"])


@pytest.mark.parametrize("keep", [False, True])
def test_public_own_data_is_copied_never_moved(public, keep):
    key = own_keys(public)["labels"]["key"]
    for _ in range(2):
        assert public.get1(key, keep=keep).tolist() == OWN["labels"].tolist()
    assert own_keys(public)["labels"]["private"] is True


def test_public_own_data_still_cannot_be_deleted_or_overwritten(public):
    key = own_keys(public)["weights"]["key"]
    public.error({"type": "delete", "keys": [key]}, code="forbidden")
    public.error(
        {"type": "put", "tensors": [{"key": key, "dtype": "float", "shape": [0], "frame": 0}]},
        [b""],
        code="forbidden",
    )
    assert np.array_equal(public.get1(key), OWN["weights"])
