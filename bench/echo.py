"""Raw pyzmq echo server, the transport floor: ``python -m bench.echo [--tuned] URL [URL...]``.

A ROUTER socket that sends every message straight back (zero-copy, same poll-then-drain loop as
planwire's original Server). Prints ``ready on URL URL`` once bound; stops on SIGTERM/SIGINT.
``--tuned``: its I/O threads get the scheduling planwire gives its own (transport.sockets.tune_io_threads).
"""

from __future__ import annotations

import signal
import sys

import zmq


def main(argv: list[str]) -> int:
    ctx = zmq.Context()
    if argv and argv[0] == "--tuned":
        from planwire.transport.sockets import tune_io_threads

        tune_io_threads(ctx)
        argv = argv[1:]
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    endpoints = []
    for url in argv:
        sock.bind(url)
        endpoints.append(sock.get_string(zmq.LAST_ENDPOINT))
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready on " + " ".join(endpoints), flush=True)
    while running:
        if not sock.poll(100, zmq.POLLIN):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sock.send_multipart(frames, copy=False)
    sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
