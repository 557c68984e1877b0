"""Stats names a connection once: labels of ZeroMQ-generated routing ids are cached, ids a peer chose are not."""

from __future__ import annotations

import zmq

from planwire.transport.sockets import recv_frames
from planwire.worker.peers import IN_PROCESS, PeerNames, peer_of


def _request(router: zmq.Socket, dealer: zmq.Socket) -> tuple[bytes, list]:
    dealer.send(b"x")
    assert router.poll(5000)
    peer, *frames = recv_frames(router)
    return bytes(peer), frames


def test_generated_routing_ids_are_named_once_and_chosen_ones_every_time():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a new connection with a chosen id takes it over
    port = router.bind_to_random_port("tcp://127.0.0.1")
    names = PeerNames()
    try:
        anon = ctx.socket(zmq.DEALER)
        anon.connect(f"tcp://127.0.0.1:{port}")
        conn, frames = _request(router, anon)
        assert conn[:1] == b"\x00"
        name = names(frames, conn)
        assert name == peer_of(frames) and name.startswith("127.0.0.1/fd")
        assert names((), conn) == name  # cached: the frames are not read again

        chosen, dealers = [], []
        for _ in range(2):  # a later connection may take the same chosen id: it is named afresh
            d = ctx.socket(zmq.DEALER)
            dealers.append(d)
            d.setsockopt(zmq.ROUTING_ID, b"me")
            d.connect(f"tcp://127.0.0.1:{port}")
            conn, frames = _request(router, d)
            assert conn == b"me"
            chosen.append(names(frames, conn))
            assert names((), conn) == IN_PROCESS  # not cached
            assert chosen[-1] == peer_of(frames)
        assert chosen[0] != chosen[1]  # two connections (two fds), one id
        for d in [anon, *dealers]:
            d.close(linger=0)
    finally:
        router.close(linger=0)


def test_in_process_requests_are_not_cached():
    names = PeerNames()
    assert names([b"header"], b"") == IN_PROCESS
    assert names._names == {}
