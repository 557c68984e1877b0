"""PROTOCOL.md §4.2: pipelining, per-connection order, several clients at once."""

from __future__ import annotations

import threading

import numpy as np

from . import plans


def test_many_requests_before_reading_any_reply(peer, uid):
    pid = peer.register(plans.double_abs())["plan"]
    sent = []
    for i in range(100):
        sent.append(
            (
                "ok",
                peer.send(
                    {
                        "type": "put",
                        "tensors": [{"key": f"{uid}-{i}", "dtype": "float", "shape": [1], "frame": 0}],
                    },
                    [np.float32([-i]).tobytes()],
                ),
            )
        )
        sent.append(("ok", peer.send(peer.run_header(pid, [f"{uid}-{i}"], [f"{uid}-r{i}"])[0])))
        sent.append(("tensors", peer.send({"type": "get", "keys": [f"{uid}-r{i}"]})))
        if i % 10 == 0:
            sent.append(("error", peer.send({"type": "get", "keys": [f"{uid}-nothing"]})))
    replies = [peer.recv() for _ in sent]
    assert [(r.kind, r["re"]) for r in replies] == sent  # in order, each the right kind
    values = [r.array_list()[0][0] for r in replies if r.kind == "tensors"]
    assert values == [2.0 * i for i in range(100)]


def test_replies_come_in_request_order_even_for_slow_requests(peer, uid):
    a = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)
    first = peer.send(
        {"type": "put", "tensors": [{"key": uid, "dtype": "float", "shape": [a.size], "frame": 0}]},
        [a.tobytes()],
    )
    second = peer.send({"type": "ping"})
    third = peer.send({"type": "get", "keys": [uid], "keep": True})
    assert [peer.recv()["re"] for _ in range(3)] == [first, second, third]


def test_two_clients_interleaved(connect, url, uid):
    a, b = connect(url), connect(url)
    a_ids, b_ids = [], []
    for i in range(50):
        a_ids.append(
            a.send(
                {
                    "type": "put",
                    "tensors": [{"key": f"{uid}-a{i}", "dtype": "int64", "shape": [1], "frame": 0}],
                },
                [np.int64([i]).tobytes()],
            )
        )
        b_ids.append(b.send({"type": "describe", "keys": [f"{uid}-a{i}"]}) if i % 2 else b.send({"type": "ping"}))
    assert [a.recv()["re"] for _ in a_ids] == a_ids  # each connection gets only its own replies, in order
    b_replies = [b.recv() for _ in b_ids]
    assert [r["re"] for r in b_replies] == b_ids
    assert not a.poll(0.05) and not b.poll(0.05)
    # each client has its own keys (§6.3): b never sees a's, and a's are intact
    assert {r["code"] for r in b_replies if r.kind == "error"} == {"unknown_tensor"}
    assert sum(r.kind == "error" for r in b_replies) == 25
    assert a.get1(f"{uid}-a49", keep=True).tolist() == [49]


def test_many_clients_at_once(connect, url, uid):
    peers = [connect(url) for _ in range(6)]
    pid = [p.register(plans.sum_and_diff())["plan"] for p in peers][0]  # each client registers it (§6.3)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        p = peers[n]
        try:
            ids = []
            for i in range(30):
                x = np.full((2, 2), n * 100 + i, np.float32)
                ids.append(p.send(*p.run_header(pid, [x, x], [f"{uid}-{n}-{i}s", f"{uid}-{n}-{i}d"], fetch=[0])))
            for i, rid in enumerate(ids):
                reply = p.recv()
                assert reply["re"] == rid
                assert reply.arrays()[f"{uid}-{n}-{i}s"][0, 0] == 2 * (n * 100 + i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
