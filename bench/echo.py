"""Raw pyzmq echo server, the transport floor: ``python -m bench.echo [--tuned] URL [URL...]``.

Like for like with a plan-worker in everything but the work: a ROUTER with planwire's socket options
(``transport.sockets.configure``), served by the same loop as ``transport.server.Server`` (a blocking
receive with a timeout, frames moved by ``sockets.recv_frames``/``send_frames``, zero-copy), and with
``--tuned`` its ZeroMQ I/O threads under the scheduling planwire gives its own (``tune_io_threads``).

Each message is sent straight back, with three exceptions that let the bench move exactly the bytes and
messages planwire moves:

* ``[REPLAY, *frames]`` sets ``frames`` as the reply to every later plain message from that peer (answered
  with ``[REPLAY]``): a round trip then carries a plan call's request out and its reply back;
* ``[STORE, *frames]`` keeps ``frames`` (zero-copy) for that peer and answers ``[STORE]``, and ``[FETCH]``
  answers with what was stored: the two round trips of a put + get.

Prints ``ready on URL URL`` once bound; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import sys

import zmq

from planwire.transport.sockets import configure, recv_frames, send_frames, tune_io_threads

MARK = b"\x00bench-"  # control messages start with this frame prefix
REPLAY = MARK + b"replay"
STORE = MARK + b"store"
FETCH = MARK + b"fetch"


def serve(sock: zmq.Socket, running: list[bool], poll_ms: int = 100) -> None:
    """Server.serve_forever's loop with an echo (or a fixed reply) for a handler."""
    replies: dict[bytes, list] = {}
    stored: dict[bytes, list] = {}
    sock.setsockopt(zmq.RCVTIMEO, poll_ms)
    while running[0]:
        try:
            peer, *frames = recv_frames(sock)
        except zmq.Again:
            continue
        reply = replies.get(bytes(peer))
        if frames and len(frames[0]) <= len(REPLAY) and frames[0][:7] == MARK:
            head = bytes(frames[0])
            if head == REPLAY:
                replies[bytes(peer)] = [bytes(f) for f in frames[1:]]
                reply = [REPLAY]
            elif head == STORE:
                stored[bytes(peer)] = frames[1:]
                reply = [STORE]
            elif head == FETCH:
                reply = stored.get(bytes(peer), [])
        send_frames(sock, [peer, *(frames if reply is None else reply)])


def main(argv: list[str]) -> int:
    ctx = zmq.Context()
    if argv and argv[0] == "--tuned":
        tune_io_threads(ctx)
        argv = argv[1:]
    sock = ctx.socket(zmq.ROUTER)
    configure(sock)
    endpoints = []
    for url in argv:
        sock.bind(url)
        endpoints.append(sock.get_string(zmq.LAST_ENDPOINT))
    running = [True]

    def stop(*_: object) -> None:
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready on " + " ".join(endpoints), flush=True)
    serve(sock, running)
    sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
