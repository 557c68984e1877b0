"""Raw pyzmq echo server, the transport floor: ``python -m bench.echo [--tuned] [--hop] URL [URL...]``.

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

With ``--hop`` every plain message also crosses to a second process and back before it is answered, over a
Unix socket pair, blocking reads on both sides (client -> server -> child -> server -> client): the request's
frames go to the child and the reply's frames come back from it, length-prefixed, in one send each way. That
is the least a worker whose plans run in another process (planwire's sandboxed runner) can pay per call: two
more wake-ups and two more copies of the bytes, with no work, no serialization and no Python per message
beyond a read and a write.

Prints ``ready on URL URL`` once bound; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys

import zmq

from planwire.transport.sockets import configure, recv_frames, send_frames, tune_io_threads

MARK = b"\x00bench-"  # control messages start with this frame prefix
REPLAY = MARK + b"replay"
STORE = MARK + b"store"
FETCH = MARK + b"fetch"


_LEN = struct.Struct("<I")


def _read(pipe: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = pipe.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _split(data: bytes) -> list[bytes]:
    frames, i = [], 0
    while i < len(data):
        (n,) = _LEN.unpack_from(data, i)
        frames.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return frames


def _join(frames: list) -> bytes:
    return b"".join(_LEN.pack(len(f)) + bytes(f) for f in frames)


def child(pipe: socket.socket) -> None:
    """The second process of ``--hop``: reads a message (the request's frames, then the reply's) and sends
    the reply's frames back."""
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        while True:
            (n,) = _LEN.unpack(_read(pipe, 4))
            (k,) = _LEN.unpack_from(data := _read(pipe, n))
            pipe.sendall(_LEN.pack(n - 4 - k) + data[4 + k :])


def hop(pipe: socket.socket, request: list, reply: list) -> list:
    """``reply``, after ``request`` and ``reply`` went to the child process and the reply came back."""
    out, back = _join(request), _join(reply)
    pipe.sendall(_LEN.pack(4 + len(out) + len(back)) + _LEN.pack(len(out)) + out + back)
    (n,) = _LEN.unpack(_read(pipe, 4))
    return _split(_read(pipe, n))


def serve(sock: zmq.Socket, running: list[bool], poll_ms: int = 100, pipe: socket.socket | None = None) -> None:
    """Server.serve_forever's loop with an echo (or a fixed reply) for a handler; with ``pipe``, each plain
    message crosses to the child process and back first (``--hop``)."""
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
        elif pipe is not None:
            reply = hop(pipe, frames, frames if reply is None else reply)
        send_frames(sock, [peer, *(frames if reply is None else reply)])


def main(argv: list[str]) -> int:
    tuned = "--tuned" in argv
    pipe = None
    if "--hop" in argv:  # the child forks before any ZeroMQ context exists
        pipe, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.fork() == 0:
            pipe.close()
            child(theirs)
            os._exit(0)
        theirs.close()
    argv = [a for a in argv if a not in ("--tuned", "--hop")]
    ctx = zmq.Context()
    if tuned:
        tune_io_threads(ctx)
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
    serve(sock, running, pipe=pipe)
    sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
