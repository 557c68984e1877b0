"""DealerLink: a client's frames to and from a worker's ROUTER over one ZeroMQ DEALER socket.

Only moves frames, and says what the socket monitor saw: a refused connect (nobody listening at the
address), a refused CURVE handshake, a dropped connection. ``ZMQ_IMMEDIATE`` keeps requests off
connections that are not up, and a dropped connection is torn down with its socket (linger 0), so
nothing queued for a worker that went away is ever delivered to the one that replaces it.
"""

from __future__ import annotations

import contextlib
import json
import time
from time import monotonic

import zmq
from zmq.utils.monitor import recv_monitor_message

from planwire.transport.connection import LinkDropped
from planwire.transport.errors import CurveRefused, NoWorkerListening, RemoteTimeoutError, WorkerLost
from planwire.transport.framing import Frame
from planwire.transport.sockets import NOBLOCK, configure, send_frames, tune_io_threads
from planwire.transport.sockets import recv_small_copied as recv_frames

SLICE_S = 0.1  # a blocking receive looks at the monitor this often (a reply wakes it at once)
SLICE_MS = int(SLICE_S * 1000)
RECONNECT_IVL_MS = 100  # ZeroMQ waits at least this long (plus jitter) before reconnecting a dropped connection
CHECK_S = 0.04  # dropped() reads the monitor at most this often: 60 ms under RECONNECT_IVL_MS (see dropped)
_EVENTS_OPT, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's enum members cost per use
_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class DealerLink:
    """One DEALER connected to ``url``; ``name`` (the worker's id once known) is used in error messages."""

    def __init__(
        self, url: str, *, context: zmq.Context | None = None, curve: tuple[bytes, bytes, bytes] | None = None
    ) -> None:
        self.url = url
        self.name = url
        self.timeout: float | None = None  # how long a send waits for a connection (set by the Connection)
        if context is None:
            context = zmq.Context.instance()
            tune_io_threads(context)  # takes effect if this is the context's first socket
        self._ctx = context
        self._curve = curve  # (client public, client secret, server public)
        self._ever_up = False  # a worker answered here once: refusals then mean it went away
        self._open()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        configure(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection that is up: never for a dead worker
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)  # ZeroMQ's default, relied on by dropped()
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._curve
        self._monitor = sock.get_monitor_socket(_EVENTS)
        sock.connect(self.url)
        self._sock = sock
        self._rcvtimeo = -1  # the socket's RCVTIMEO (ms), set by recv when a wait's slice changes
        self._up = False  # a handshake succeeded and no drop since
        self._refused = 0  # connect attempts refused since the connection was last up (nobody listening)
        self._refusal: Exception | None = None  # a CURVE refusal, raised by the next send
        self._checked = 0.0  # when the monitor was last read (monotonic s)

    # -- the monitor --------------------------------------------------------------------------------

    def _events(self) -> str | None:
        """Read the monitor's events; the reason the connection dropped, if it did."""
        dropped = None
        monitor = self._monitor
        self._checked = monotonic()
        while monitor.getsockopt(_EVENTS_OPT) & _POLLIN:
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up = self._ever_up = True
                self._refused = 0
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._refused += not self._up
            elif event == zmq.EVENT_DISCONNECTED:
                if self._up:
                    dropped = f"the connection to {self.url} dropped (the worker stopped, crashed or restarted)"
                self._up = False
            elif event & _HANDSHAKE_FAILED:
                self._up = False
                self._refusal = self._curve_refused(event)
        return dropped

    def _curve_refused(self, event: int) -> Exception:
        if self._curve is None:
            what = (
                "the worker at {url} refused the connection's handshake: it requires CURVE encryption; "
                "connect with curve=(client public key, client secret key, worker public key)"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            what = (
                "the worker at {url} refused this client's CURVE key: check that the client's public key is "
                "in the worker's --curve-clients directory"
            )
        else:
            what = (
                "the CURVE handshake with the worker at {url} failed: check that the server key given to "
                "connect() is the worker's public key (its --curve-secret's pair) and the worker uses CURVE"
            )
        return CurveRefused(self.name, what.format(url=self.url))

    def dropped(self) -> str | None:
        """Why the connection dropped since last asked, or None. Reading the monitor costs a system call
        (several us), so it is read at most every CHECK_S. A drop it has not seen yet is harmless: libzmq's I/O
        thread queues EVENT_DISCONNECTED on the monitor *before* it arms the reconnect timer (the engine's error
        path, then the session's reconnect), and that timer waits RECONNECT_IVL_MS plus up to as much again of
        jitter. So any request that could reach a new connection is sent at least 100 ms after the event was
        readable, and the read before it, at most CHECK_S = 40 ms old, came after the event: an ordering of
        libzmq's, not a race (measured on this host, kill -9 and an immediate restart, 30 times over tcp and ipc:
        119 ms at least from the event to the new handshake). Only a sender stalled for over 100 ms between this
        check and its send could slip one request to a restarted worker; its reply then carries the new session,
        and :class:`Connection` fails what was sent before it. A request on a dropped connection is not queued
        (ZMQ_IMMEDIATE): its send waits on the monitor (_send_slow)."""
        if monotonic() - self._checked < CHECK_S:
            return None
        return self._events()

    # -- moving frames ------------------------------------------------------------------------------

    def send(self, frames: list[Frame]) -> None:
        try:
            send_frames(self._sock, frames, NOBLOCK)
        except zmq.Again:  # no connection up yet (ZMQ_IMMEDIATE), or a full queue: wait, watching the monitor
            self._send_slow(frames)

    def _send_slow(self, frames: list[Frame]) -> None:
        timeout, what = self.timeout, _what(frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        dropped = self._events()  # catch up with what happened before this send
        refused = self._refused  # a refusal before this send may be followed by an attempt that works
        while True:
            if dropped is not None:
                raise LinkDropped(dropped)
            if self._refusal is not None:
                raise self._refusal
            if self._refused > refused and not self._up:
                if self._ever_up:
                    raise WorkerLost(self.name, f"no worker is listening at {self.url} any more")
                raise NoWorkerListening(
                    self.name,
                    "no worker is listening at this address (connection refused): check the address and port, "
                    "and that plan-worker is running there",
                )
            left = SLICE_S if deadline is None else min(SLICE_S, deadline - time.monotonic())
            if left <= 0:
                state = "connected, but its queue is full" if self._up else "no connection could be made"
                raise RemoteTimeoutError(
                    f"worker {self.name!r} at {self.url}: {what} not sent within {timeout} s ({state})"
                )
            if self._sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                try:
                    send_frames(self._sock, frames, NOBLOCK)
                    return
                except zmq.Again:
                    pass
            dropped = self._events()

    def recv(self, timeout: float | None) -> list[Frame] | None:
        sock = self._sock
        if timeout == 0:  # only what has arrived
            if not sock.getsockopt(_EVENTS_OPT) & _POLLIN:
                return None
            return recv_frames(sock, NOBLOCK)
        # Blocking receives of at most a slice each (RCVTIMEO: no poller per call). The deadline is set after
        # the first slice, from what it waited: a reply within it (the usual case) reads no clock at all.
        ms = SLICE_MS if timeout is None or timeout >= SLICE_S else max(0, int(timeout * 1000))
        deadline = None
        while True:
            if ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._rcvtimeo = ms
            try:
                return recv_frames(sock)
            except zmq.Again:
                pass
            reason = self._silent_slice()
            if reason is not None:
                raise reason
            if timeout is not None:
                now = monotonic()
                if deadline is None:
                    deadline = now + timeout - ms / 1000
                if now >= deadline:
                    return None
                ms = max(1, min(SLICE_MS, int((deadline - now) * 1000)))

    def _silent_slice(self) -> Exception | None:
        """After a slice without a reply: did the worker go (LinkDropped), or refuse this client?"""
        dropped = self._events()
        if dropped is not None:
            return LinkDropped(dropped)
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            return refusal
        return None

    # -- lifetime -----------------------------------------------------------------------------------

    def reset(self) -> None:
        self._close(linger=0)  # what was queued for the lost worker goes with the socket
        self._open()

    def _close(self, linger: int) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=linger)

    def close(self) -> None:
        if not self._sock.closed:
            self._close(linger=200)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._sock.close(linger=0)
            self._monitor.close(linger=0)


def _what(frames: list[Frame]) -> str:
    """The request type a message's header names, for error messages (only on the slow path)."""
    try:
        return str(json.loads(bytes(frames[1])).get("type", "request"))
    except (ValueError, IndexError, AttributeError):
        return "request"
