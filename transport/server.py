"""Server: a ROUTER socket that hands each request's frames to a handler and routes the reply back.

Only moves frames: what a request means is the handler's business (worker.Service.handle). Requests
are served one at a time in arrival order, so each connection's requests are answered in order.

It never blocks on one peer: replies go out with ``NOBLOCK`` (at once, or held to go out with a burst's
others: ``hold``). A client that stops reading fills its own
queue (``max_queue`` messages each way, ZeroMQ's high-water marks); from then on its replies are dropped,
with one log line, until it reads again, and every other client goes on being served. Past
``max_connections`` open connections, a new one is shut down (one log line per burst) and nothing it sent
is served, so the process never runs out of file descriptors (where libzmq's listener would spin).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from planwire.transport.framing import Frame
from planwire.transport.sockets import HWM, NOBLOCK, configure, recv_frames, recv_routed, send_routed

log = logging.getLogger("planwire.server")

HOLD = 16  # replies held at most (Server.hold) before they are sent

Handler = Callable[[Sequence[Frame], bytes], list[Frame]]
"""``handler(frames, client) -> reply frames``; ``client`` is the peer's CURVE public key (User-Id) when
CURVE is on, else its ZeroMQ routing id (one per connection)."""


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
        max_queue: int = HWM,
        max_connections: int | None = None,
    ) -> None:
        self.handler = handler
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # The hard per-frame cap is a little above the soft limit, so an oversize message with room to
        # spare is answered with a too_large error rather than a silent disconnect.
        configure(self._sock, max_message_bytes=max_message_bytes + (1 << 20))
        self._sock.setsockopt(zmq.SNDHWM, max_queue)  # unread replies per client
        self._sock.setsockopt(zmq.RCVHWM, max_queue)  # queued requests per client
        self.max_queue = max_queue
        self._curve = curve_secret is not None
        if curve_secret is not None:
            self._sock.curve_server = True
            self._sock.curve_secretkey = curve_secret
        self._stop = threading.Event()
        self._full: dict[bytes, int] = {}  # peers whose replies are being dropped -> how many so far
        self._held: list[tuple[Frame, Sequence[Frame]]] = []  # replies not sent yet (hold)
        self._guard = _ConnectionGuard(self._sock, max_connections) if max_connections else None
        self.endpoints = []
        for ep in endpoints:
            self._sock.bind(ep)
            self.endpoints.append(self._sock.get_string(zmq.LAST_ENDPOINT) if ep.endswith(":0") else ep)

    def serve_forever(self, poll_ms: int = 100) -> None:
        # A blocking receive with a timeout (not poll + non-blocking receives): one call per request and no
        # zmq.Again exception per burst; the stop flag is still checked at least every ``poll_ms``.
        receive, handler, send, stopped = self.receive, self.handler, self.send, self._stop.is_set
        self._sock.setsockopt(zmq.RCVTIMEO, poll_ms)
        while not stopped():
            try:
                peer, client, frames = receive()
            except zmq.Again:
                continue
            send(peer, handler(frames, client))

    def receive(self, flags: int = 0) -> tuple[Frame, bytes, list[memoryview]]:
        """The next request: ``(peer, client, frames)``, where ``peer`` routes the reply and ``client`` is
        the peer's CURVE public key (User-Id) under CURVE, else its routing id. zmq.Again when none came
        (within RCVTIMEO, or at once under NOBLOCK). A request on a connection past ``max_connections`` is
        dropped here, never returned."""
        guard, sock, curve = self._guard, self._sock, self._curve
        while True:
            try:
                if curve:
                    head = sock.recv(flags, copy=False)
                    peer, client = head.buffer, _user_id(head)
                    frames = recv_frames(sock) if head.more else []
                    key = bytes(peer)
                else:
                    peer, frames = recv_routed(sock, flags)
                    client = key = peer
            except zmq.Again:
                if guard is not None and not flags:  # idle: connections that never send are counted, refused too
                    guard.drain()
                raise
            if guard is None or guard.admitted(frames[0] if frames else peer, key):
                return peer, client, frames

    def tend(self) -> None:
        """Count and refuse new connections now (a loop that waits on something else calls this now and then)."""
        if self._guard is not None:
            self._guard.drain()

    def send(self, peer: Frame, reply: Sequence[Frame]) -> None:
        """Route ``reply`` to ``peer`` without blocking (after the replies held): a reply to a peer whose queue
        is full (it does not read; the others must not wait) or that is gone is dropped, with a log line."""
        if self._held:
            self.flush()
        self._send(peer, reply)

    def hold(self, peer: Frame, reply: Sequence[Frame]) -> None:
        """``send`` later: at the next ``send`` or ``flush``, or once ``HOLD`` replies are held. A loop reading a
        burst of requests (pipelined calls) answers it in one go: ZeroMQ's I/O thread is then woken once per burst
        to write it, not once per reply (a system call in this thread and a wake-up there for each)."""
        held = self._held
        held.append((peer, reply))
        if len(held) >= HOLD:
            self.flush()

    def flush(self) -> None:
        """Send the replies held, in order."""
        if not self._held:
            return
        held, self._held = self._held, []
        for peer, reply in held:
            self._send(peer, reply)

    def _send(self, peer: Frame, reply: Sequence[Frame]) -> None:
        try:
            send_routed(self._sock, peer, reply, NOBLOCK)
        except zmq.Again:
            self._dropped(bytes(peer))
            return
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY)
            log.warning("reply to a client dropped: %s", e)
            return
        if self._full:
            self._resumed(bytes(peer))

    @property
    def socket(self) -> zmq.Socket:
        """The ROUTER socket, for a caller that runs its own loop (worker/supervisor.py)."""
        return self._sock

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _dropped(self, peer: bytes) -> None:
        n = self._full.get(peer)
        if n is None:
            if len(self._full) > 10_000:  # peers that left while dropping: forget them
                self._full.clear()
            log.warning(
                "client %s has %d unread replies (plan-worker --max-client-queue): dropping its replies until it reads",
                peer.hex(),
                self.max_queue,
            )
            n = 0
        self._full[peer] = n + 1

    def _resumed(self, peer: bytes) -> None:
        n = self._full.pop(peer, None)
        if n is not None:
            log.warning("client %s reads again; %d of its replies were dropped", peer.hex(), n)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.flush()
        if self._guard is not None:
            self._guard.close()
        self._sock.close(linger=200)


def _user_id(frame: zmq.Frame) -> bytes:
    try:
        return frame.get("User-Id").encode()
    except zmq.ZMQError:  # no ZAP handler set one
        return bytes(frame.buffer)


class _ConnectionGuard:
    """Counts the ROUTER's connections through a socket monitor, read by the serving thread itself: past
    ``limit`` a new connection is shut down (ZeroMQ sees the peer leave and frees its state) and a request
    that came on it is dropped. The events are read before the first request of every new peer is served,
    and ZeroMQ queues a connection's ``accepted`` event before anything can arrive on it, so a connection
    past the limit is never served, however late this thread runs. The file descriptor in the event is
    shut down, never closed: ZeroMQ still owns it."""

    EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
    EVERY = 256  # while requests of known peers keep coming, the events are read every this many

    def __init__(self, sock: zmq.Socket, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._mon = sock.get_monitor_socket(self.EVENTS)
        self._sock = sock
        self._refused_fds: set[int] = set()  # shut down, their disconnection not seen yet
        self._peers: dict[bytes, int] = {}  # routing ids served -> their connection's fd
        self._peer_of: dict[int, bytes] = {}
        self._countdown = self.EVERY
        self._refused = 0
        self._last_log = 0.0

    def admitted(self, frame: Frame, key: bytes) -> bool:
        """Whether a request from routing id ``key`` may be served (``frame``: one of its frames, from which a new
        connection's file descriptor is read)."""
        if key in self._peers:
            self._countdown -= 1
            if not self._countdown:
                self.drain()
            return True
        self.drain()  # the new connection's accepted event is queued already
        frame = getattr(frame, "obj", frame)
        try:
            fd = frame.get(zmq.SRCFD) if isinstance(frame, zmq.Frame) else -1
        except zmq.ZMQError:
            fd = -1
        if fd in self._refused_fds:
            return False
        self._peers[key] = fd
        self._peer_of[fd] = key
        return True

    def drain(self) -> None:
        """Read every queued event: count connections, refuse those past the limit."""
        self._countdown = self.EVERY
        mon = self._mon
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.ZMQError:
                return
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_DISCONNECTED:
                if fd in self._refused_fds:
                    self._refused_fds.discard(fd)
                else:
                    self.open = max(0, self.open - 1)
                key = self._peer_of.pop(fd, None)
                if key is not None:
                    self._peers.pop(key, None)
            elif kind == zmq.EVENT_ACCEPTED:
                stale = self._peer_of.pop(fd, None)  # its disconnection was not reported: not a peer any more
                if stale is not None:
                    self._peers.pop(stale, None)
                if self.open >= self.limit:
                    self._refuse(fd)
                else:
                    self.open += 1

    def _refuse(self, fd: int) -> None:
        self._refused_fds.add(fd)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.detach()
        self._refused += 1
        now = time.monotonic()
        if now - self._last_log > 10:
            log.warning(
                "%d connection(s) refused: %d open, the limit of plan-worker --max-connections",
                self._refused,
                self.limit,
            )
            self._refused, self._last_log = 0, now

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._mon.close(linger=0)
