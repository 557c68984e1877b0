"""ZeroMQ socket hygiene shared by clients and servers (see shared NOTES: HWMs, linger, mandatory)."""

from __future__ import annotations

import zmq

HWM = 10_000  # messages, not bytes: bounds memory per peer together with MAXMSGSIZE
LINGER_MS = 200


def configure(sock: zmq.Socket, *, max_message_bytes: int | None = None) -> None:
    """Bounded queues and a finite linger; on ROUTER, unroutable replies raise instead of vanishing."""
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
