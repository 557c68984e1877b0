"""PROTOCOL.md §3, §5 and §6: put, get (move and keep), describe, search, delete; tensor bytes."""

from __future__ import annotations

import numpy as np
import pytest

from .wire import WIRE_DTYPES, encode

SAMPLES = {
    "float": [1.5, -2.25, 3e38],
    "double": [1e-300, -2.5, 7.0],
    "float16": [0.5, -65504.0, 1.0],
    "int64": [-(2**63), 2**63 - 1, 0],
    "int32": [-(2**31), 2**31 - 1, 5],
    "int16": [-32768, 32767, 1],
    "int8": [-128, 127, 0],
    "uint8": [0, 255, 7],
    "uint16": [0, 65535, 9],
    "uint32": [0, 2**32 - 1, 3],
    "uint64": [0, 2**64 - 1, 11],
    "bool": [True, False, True],
}


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_every_dtype_round_trips_bit_exact(peer, uid, dtype):
    a = np.array(SAMPLES[dtype], dtype=WIRE_DTYPES[dtype]).reshape(3, 1)
    peer.put(uid, a)
    reply = peer.ok({"type": "get", "keys": [uid], "keep": True})
    (t,) = reply["tensors"]
    assert t == {"key": uid, "dtype": dtype, "shape": [3, 1], "frame": 0}
    assert reply.frames[0] == a.astype(WIRE_DTYPES[dtype]).tobytes()  # little-endian, C order


def test_bytes_are_little_endian_and_c_order(peer, uid):
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    peer.ok(
        {"type": "put", "tensors": [{"key": uid, "dtype": "int32", "shape": [3, 2], "frame": 0}]},
        [a.astype("<i4").tobytes()],
    )
    got = peer.get1(uid)
    assert got.shape == (3, 2) and got.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert np.array([1], ">i4").tobytes() != np.array([1], "<i4").tobytes()  # the test means something


def test_scalar_has_an_empty_shape(peer, uid):
    peer.put(uid, np.float64(2.5))
    reply = peer.ok({"type": "get", "keys": [uid]})
    assert reply["tensors"][0]["shape"] == [] and len(reply.frames[0]) == 8
    assert reply.array_list()[0] == 2.5


@pytest.mark.parametrize("shape", [[0], [0, 3], [4, 0, 2]])
def test_empty_tensors_have_zero_length_frames(peer, uid, shape):
    peer.ok({"type": "put", "tensors": [{"key": uid, "dtype": "float", "shape": shape, "frame": 0}]}, [b""])
    reply = peer.ok({"type": "get", "keys": [uid]})
    assert reply["tensors"][0]["shape"] == shape and reply.frames[0] == b""


def test_put_many_frames_in_any_order_and_shared(peer, uid):
    a, b = np.arange(4, dtype=np.float32), np.array([7, 8], dtype=np.int64)
    tensors = [
        {"key": f"{uid}-b", "dtype": "int64", "shape": [2], "frame": 1},
        {"key": f"{uid}-a", "dtype": "float", "shape": [4], "frame": 0},
        {"key": f"{uid}-a2", "dtype": "float", "shape": [2, 2], "frame": 0},  # the same frame, reshaped
    ]
    peer.ok({"type": "put", "tensors": tensors}, [a.tobytes(), b.tobytes()])
    got = peer.get([f"{uid}-a", f"{uid}-b", f"{uid}-a2"])
    assert got[0].tolist() == a.tolist() and got[1].tolist() == b.tolist() and got[2].tolist() == [[0, 1], [2, 3]]


def test_put_with_an_empty_list_is_ok(peer):
    assert peer.ok({"type": "put", "tensors": []}).kind == "ok"


def test_put_overwrites_value_and_tags(peer, uid):
    peer.put(uid, np.zeros(2, np.float32), tags=[f"{uid}-old"])
    peer.put(uid, np.ones(3, np.int32), tags=[f"{uid}-new"])
    info = peer.ok({"type": "describe", "keys": [uid]})["tensors"][0]
    assert info["dtype"] == "int32" and info["shape"] == [3] and info["tags"] == [f"{uid}-new"]
    assert peer.ok({"type": "search", "tags": [f"{uid}-old"]})["tensors"] == []


def test_put_is_all_or_nothing(peer, uid):
    good = {"key": f"{uid}-good", "dtype": "float", "shape": [1], "frame": 0}
    bad = {"key": f"{uid}-bad", "dtype": "float", "shape": [3], "frame": 0}  # 12 bytes wanted, 4 sent
    reply = peer.error({"type": "put", "tensors": [good, bad]}, [np.ones(1, np.float32).tobytes()], code="bad_frames")
    assert f"{uid}-bad" in reply["message"]
    peer.error({"type": "describe", "keys": [f"{uid}-good"]}, code="unknown_tensor")


def test_get_moves_by_default(peer, uid):
    peer.put(uid, np.arange(3, dtype=np.int64))
    assert peer.get1(uid).tolist() == [0, 1, 2]
    reply = peer.error({"type": "get", "keys": [uid]}, code="unknown_tensor")
    assert uid in reply["message"]


def test_get_keep_copies(peer, uid):
    peer.put(uid, np.arange(3, dtype=np.int64))
    assert peer.get1(uid, keep=True).tolist() == [0, 1, 2]
    assert peer.get1(uid, keep=True).tolist() == [0, 1, 2]
    assert peer.get1(uid).tolist() == [0, 1, 2]  # move
    peer.error({"type": "get", "keys": [uid], "keep": True}, code="unknown_tensor")


def test_get_returns_keys_in_order_and_a_key_twice(peer, uid):
    for i in range(3):
        peer.put(f"{uid}-{i}", np.full(2, i, np.int16))
    reply = peer.ok({"type": "get", "keys": [f"{uid}-2", f"{uid}-0", f"{uid}-2"]})
    assert [t["key"] for t in reply["tensors"]] == [f"{uid}-2", f"{uid}-0", f"{uid}-2"]
    assert [t["frame"] for t in reply["tensors"]] == [0, 1, 2]
    assert [int(a[0]) for a in reply.array_list()] == [2, 0, 2]
    peer.error({"type": "get", "keys": [f"{uid}-2"]}, code="unknown_tensor")  # moved
    assert peer.get1(f"{uid}-1").tolist() == [1, 1]


def test_get_is_all_or_nothing(peer, uid):
    peer.put(uid, np.ones(2, np.float32))
    reply = peer.error({"type": "get", "keys": [uid, f"{uid}-missing"]}, code="unknown_tensor")
    assert f"{uid}-missing" in reply["message"]
    assert peer.get1(uid).tolist() == [1.0, 1.0]  # not moved by the failed get


def test_describe(peer, uid):
    peer.put(uid, np.zeros((2, 5), np.uint8), tags=["t1", "t2"])
    peer.put(f"{uid}-plain", np.zeros(1, np.bool_))
    infos = peer.ok({"type": "describe", "keys": [f"{uid}-plain", uid]})["tensors"]
    assert infos[0]["key"] == f"{uid}-plain" and infos[0]["dtype"] == "bool" and infos[0]["shape"] == [1]
    assert infos[0].get("tags", []) == [] and infos[0].get("private", False) is False
    assert infos[1] == {"key": uid, "dtype": "uint8", "shape": [2, 5], "tags": ["t1", "t2"]} or infos[1] == {
        "key": uid,
        "dtype": "uint8",
        "shape": [2, 5],
        "tags": ["t1", "t2"],
        "private": False,
    }
    reply = peer.error({"type": "describe", "keys": [f"{uid}-nope"]}, code="unknown_tensor")
    assert f"{uid}-nope" in reply["message"]


def test_search_needs_all_tags(peer, uid):
    a, b = f"{uid}-a", f"{uid}-b"
    peer.put(a, np.zeros(1, np.float32), tags=[uid, "x"])
    peer.put(b, np.zeros(2, np.float32), tags=[uid, "y"])
    found = lambda *tags: sorted(t["key"] for t in peer.ok({"type": "search", "tags": list(tags)})["tensors"])  # noqa: E731
    assert found(uid) == [a, b]
    assert found(uid, "x") == [a]
    assert found(uid, "x", "y") == []
    assert found(f"{uid}-no-such-tag") == []
    everything = found()
    assert a in everything and b in everything  # no tags: every tensor
    info = next(t for t in peer.ok({"type": "search", "tags": [uid, "y"]})["tensors"])
    assert info["dtype"] == "float" and info["shape"] == [2] and info["tags"] == [uid, "y"]


def test_delete_is_idempotent(peer, uid):
    peer.put(uid, np.zeros(1, np.float32))
    assert peer.ok({"type": "delete", "keys": [uid, f"{uid}-never"]}).kind == "ok"
    assert peer.ok({"type": "delete", "keys": [uid]}).kind == "ok"
    assert peer.ok({"type": "delete", "keys": []}).kind == "ok"
    peer.error({"type": "get", "keys": [uid]}, code="unknown_tensor")


def test_keys_belong_to_their_client(peer, connect, url, uid):
    """§6.3: another connection without the owner's identity sees the key as missing."""
    peer.put(uid, np.arange(2, dtype=np.int8))
    other = connect(url)
    other.error({"type": "get", "keys": [uid]}, code="unknown_tensor")
    assert peer.get1(uid).tolist() == [0, 1]


def test_a_large_tensor(peer, uid):
    a = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)  # 8 MB, one frame
    peer.put(uid, a)
    assert np.array_equal(peer.get1(uid), a)


def test_frame_size_must_match_dtype_and_shape(peer, uid):
    desc, data = encode(np.zeros((2, 2), np.float64))
    reply = peer.error({"type": "put", "tensors": [{"key": uid, **desc, "frame": 0}]}, [data[:-1]], code="bad_frames")
    assert "32" in reply["message"] and "31" in reply["message"]


def test_unknown_dtype_is_refused(peer, uid):
    reply = peer.error(
        {"type": "put", "tensors": [{"key": uid, "dtype": "bfloat16", "shape": [1], "frame": 0}]},
        [b"\0\0"],
        code="invalid_message",
    )
    assert "bfloat16" in reply["message"] or "dtype" in reply["message"]
