"""send_frames/recv_frames and a ROUTER's recv_routed/send_routed (transport.sockets): one multipart message,
byte for byte, on the Cython fast path and on pyzmq's generic path, over real tcp sockets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from planwire.transport import sockets
from planwire.transport.server import HOLD, Server
from planwire.transport.sockets import recv_frames, send_frames


@pytest.fixture(params=["cython", "generic"])
def pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    if request.param == "generic":
        monkeypatch.setattr(sockets, "_CYTHON", False)
    elif not sockets._CYTHON:
        pytest.skip("pyzmq without its Cython backend")
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    yield server, client
    server.close(0)
    client.close(0)
    ctx.term()


def test_frames_arrive_whole_and_in_order(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    server, client = pair
    big = np.arange(100_000, dtype=np.float32)  # 400 kB: over pyzmq's copy threshold, sent zero-copy
    frames = [b"PWIRE/1", b'{"type":"ping","id":1}', b"", memoryview(big).cast("B"), memoryview(b"tail")]
    send_frames(client, frames)
    assert server.poll(5000)
    peer, *got = recv_frames(server)
    assert all(isinstance(f, memoryview) for f in got)
    assert [bytes(f) for f in got] == [bytes(f) for f in frames]
    assert np.array_equal(np.frombuffer(got[3], np.float32), big)
    send_frames(server, [peer, b"one"])  # a reply routed back by the peer's identity
    assert client.poll(5000)
    assert [bytes(f) for f in recv_frames(client)] == [b"one"]


def test_nothing_waiting_raises_again_without_blocking(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    server, _ = pair
    with pytest.raises(zmq.Again):
        recv_frames(server, zmq.NOBLOCK)


def test_a_reply_to_an_unknown_peer_raises_on_a_mandatory_router(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    server, _ = pair
    server.setsockopt(zmq.ROUTER_MANDATORY, 1)
    with pytest.raises(zmq.ZMQError):
        send_frames(server, [b"nobody", b"x"])


def test_small_frames_come_as_writable_copies_and_large_as_views(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    server, client = pair
    big = np.arange(100_000, dtype=np.float32)
    small = np.arange(4, dtype=np.float32)
    frames = [b"PWIRE/1", b'{"type":"ok"}', memoryview(small).cast("B"), memoryview(big).cast("B"), b""]
    send_frames(client, [b"hello"])
    assert server.poll(5000)
    peer, _ = recv_frames(server)
    send_frames(server, [peer, *frames])
    assert client.poll(5000)
    got = sockets.recv_small_copied(client)
    assert [bytes(f) for f in got] == [bytes(f) for f in frames]
    assert [type(f) for f in got] == [bytearray, bytearray, bytearray, memoryview, bytearray]
    value = np.frombuffer(got[2], np.float32)
    value += 1  # a result read from a small frame is writable, as one read from a view
    assert np.array_equal(value, small + 1)


def test_a_router_receives_the_routing_id_as_bytes_and_replies_by_it(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    server, client = pair
    big = np.arange(100_000, dtype=np.float32)
    for frames in ([b"only"], [b"PWIRE/1", b'{"type":"ping","id":1}', b"", memoryview(big).cast("B")]):
        send_frames(client, frames)
        assert server.poll(5000)
        peer, got = sockets.recv_routed(server)
        assert type(peer) is bytes and peer and all(isinstance(f, memoryview) for f in got)
        assert [bytes(f) for f in got] == [bytes(f) for f in frames]
        for reply in ([b"one"], [b"PWIRE/1", memoryview(big).cast("B"), b"", b"tail"]):
            sockets.send_routed(server, peer, reply)
            assert client.poll(5000)
            assert [bytes(f) for f in recv_frames(client)] == [bytes(f) for f in reply]
    with pytest.raises(zmq.Again):
        sockets.recv_routed(server, zmq.NOBLOCK)


def test_a_servers_held_replies_go_out_in_order_before_any_later_reply() -> None:
    """Server.hold: replies of a burst wait to be sent together, and nothing sent later overtakes them."""
    ctx = zmq.Context()
    server = Server(lambda frames, client: [], ["tcp://127.0.0.1:0"], max_message_bytes=1 << 20, context=ctx)
    client = ctx.socket(zmq.DEALER)
    client.connect(server.endpoints[0])
    try:
        send_frames(client, [b"hello"])
        assert server.socket.poll(5000)
        peer, _, _ = server.receive()
        for i in range(3):
            server.hold(peer, [b"%d" % i])
        assert not client.poll(200)  # held: nothing sent yet
        server.send(peer, [b"3"])  # after the held ones
        for i in range(4, 4 + HOLD):  # the HOLD-th held reply sends them all
            server.hold(peer, [b"%d" % i, b"more"])
        server.hold(peer, [b"last"])
        server.flush()
        got = []
        while len(got) < 5 + HOLD:
            assert client.poll(5000)
            got.append([bytes(f) for f in recv_frames(client)])
        want = [[b"0"], [b"1"], [b"2"], [b"3"], *([b"%d" % i, b"more"] for i in range(4, 4 + HOLD)), [b"last"]]
        assert got == want
        server.hold(peer, [b"at close"])
    finally:
        server.close()
    assert client.poll(5000) and [bytes(f) for f in recv_frames(client)] == [b"at close"]
    client.close(0)
    ctx.term()
