"""PROTOCOL.md §2 and §4: signature and header frames, hello/welcome, ping, request ids and sessions."""

from __future__ import annotations

import json

from .wire import SIGNATURE


def test_hello_welcome(peer):
    reply = peer.ok({"type": "hello", "id": 7, "version": 1, "client": "conformance"})
    assert reply.kind == "welcome" and reply["re"] == 7
    assert reply["version"] == 1
    assert isinstance(reply["worker"], str) and reply["worker"]
    assert reply["providers"] and all(isinstance(p, str) for p in reply["providers"])
    limits = reply["limits"]
    assert all(limits[k] > 0 for k in ("max_message_bytes", "max_plan_bytes", "max_frames"))
    assert all(isinstance(v, int) for v in reply["opsets"].values())
    caps = {k: v for k, v in limits.items() if k not in ("max_message_bytes", "max_plan_bytes", "max_frames")}
    assert set(caps) <= CAPS, caps  # optional: the caps of §8.1 a worker announces
    assert all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in caps.values()), caps


CAPS = {
    "max_store_bytes",
    "max_client_store_bytes",
    "max_plans",
    "max_client_queue",
    "run_timeout_seconds",
    "max_run_memory_bytes",
}


def test_hello_defaults_and_is_optional(peer):
    assert peer.ok({"type": "ping"}).kind == "ok"  # requests work before any hello
    assert peer.ok({"type": "hello"})["version"] == 1  # version defaults to 1, client to ""


def test_hello_other_version_is_refused(peer):
    reply = peer.error({"type": "hello", "id": 3, "version": 2}, code="bad_version")
    assert reply["re"] == 3 and "2" in reply["message"]


def test_signature_of_another_major_version(peer):
    peer.send_frames([b"PWIRE/2", json.dumps({"type": "ping", "id": 1}).encode()])
    reply = peer.recv()
    assert reply["code"] == "bad_version" and reply["re"] == -1 and "PWIRE/2" in reply["message"]


def test_every_reply_is_signature_header_and_raw_frames(peer):
    peer.send({"type": "ping", "id": 1})
    frames = peer.sock.recv_multipart()
    assert frames[0] == SIGNATURE and len(frames) == 2
    header = json.loads(frames[1])
    assert header == {"type": "ok", "re": 1, "session": header["session"]}


def test_ping_is_ok(peer):
    reply = peer.ok({"type": "ping", "id": 42})
    assert reply.kind == "ok" and reply["re"] == 42


def test_ids_are_echoed_at_both_ends_of_their_range(peer):
    for rid in (0, 1, 2**63 - 1):
        assert peer.ok({"type": "ping", "id": rid})["re"] == rid


def test_ids_need_not_be_unique(peer):
    for _ in range(3):
        peer.send({"type": "ping", "id": 5})
    assert [peer.recv()["re"] for _ in range(3)] == [5, 5, 5]


def test_field_order_does_not_matter(peer):
    peer.send_frames([SIGNATURE, b'{"id": 9, "keep": true, "keys": [], "type": "get"}'])
    reply = peer.recv()
    assert reply.kind == "tensors" and reply["re"] == 9 and reply["tensors"] == []


def test_unknown_fields_are_refused(peer):
    reply = peer.error({"type": "ping", "id": 4, "extra": 1}, code="invalid_message")
    assert reply["re"] == 4 and "extra" in reply["message"]


def test_unknown_type_is_refused(peer):
    reply = peer.error({"type": "frobnicate", "id": 5}, code="unknown_type")
    assert reply["re"] == 5 and "frobnicate" in reply["message"]


def test_integer_fields_must_be_json_integers(peer):
    peer.send_frames([SIGNATURE, b'{"type": "ping", "id": 1.0}'])
    assert peer.recv()["code"] == "invalid_message"


def test_session_is_the_same_in_every_reply(peer, connect, url):
    sessions = {peer.ok({"type": "ping"})["session"] for _ in range(3)}
    sessions.add(peer.error({"type": "get", "keys": ["no-such-key-anywhere"]})["session"])
    sessions.add(connect(url).ok({"type": "hello"})["session"])  # the worker's, not the connection's
    assert len(sessions) == 1


def test_a_bad_signature_is_answered_with_re_minus_one(peer):
    peer.send_frames([b"HTTP/1.1", b"{}"])
    reply = peer.recv()
    assert reply["code"] == "bad_signature" and reply["re"] == -1


def test_unreferenced_raw_frames_are_ignored(peer):
    assert peer.ok({"type": "ping"}, [b"spare", b""]).kind == "ok"
