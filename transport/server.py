"""Server: a ROUTER socket that hands each request's frames to a handler and routes the reply back.

Only moves frames: what a request means is the handler's business (worker.Service.handle). Requests
are served one at a time in arrival order, so each connection's requests are answered in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import zmq

from planwire.transport.session import Frame
from planwire.transport.sockets import configure, recv_frames, send_frames

log = logging.getLogger("planwire.server")

Handler = Callable[[Sequence[Frame]], list[Frame]]


class Server:
    """Serves ``handler`` on one or more endpoints until ``stop()`` (or a signal) is called."""

    def __init__(
        self,
        handler: Handler,
        endpoints: Sequence[str],
        *,
        max_message_bytes: int,
        context: zmq.Context | None = None,
        curve_secret: bytes | None = None,
    ) -> None:
        self.handler = handler
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # The hard per-frame cap is a little above the soft limit, so an oversize message with room to
        # spare is answered with a too_large error rather than a silent disconnect.
        configure(self._sock, max_message_bytes=max_message_bytes + (1 << 20))
        if curve_secret is not None:
            self._sock.curve_server = True
            self._sock.curve_secretkey = curve_secret
        self.endpoints = []
        for ep in endpoints:
            self._sock.bind(ep)
            self.endpoints.append(self._sock.get_string(zmq.LAST_ENDPOINT) if ep.endswith(":0") else ep)
        self._stop = threading.Event()

    def serve_forever(self, poll_ms: int = 100) -> None:
        # A blocking receive with a timeout (not poll + non-blocking receives): one call per request and no
        # zmq.Again exception per burst; the stop flag is still checked at least every ``poll_ms``.
        sock, handler, stopped = self._sock, self.handler, self._stop.is_set
        sock.setsockopt(zmq.RCVTIMEO, poll_ms)
        while not stopped():
            try:
                peer, *frames = recv_frames(sock)
            except zmq.Again:
                continue
            self.send(peer, handler(frames))

    def send(self, peer: Frame, reply: Sequence[Frame]) -> None:
        """Route ``reply`` to ``peer`` (a reply to a gone peer is dropped with a log line)."""
        try:
            send_frames(self._sock, [peer, *reply])
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or its queue is full
            log.warning("reply to a client dropped: %s", e)

    @property
    def socket(self) -> zmq.Socket:
        """The ROUTER socket, for a caller that runs its own loop (worker/supervisor.py)."""
        return self._sock

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._sock.close(linger=200)
