"""RemoteWorker: a worker across ZeroMQ (DEALER to the worker's ROUTER), and ``connect``."""

from __future__ import annotations

import contextlib

import zmq

from planwire.transport.client import Client
from planwire.transport.session import Frame
from planwire.transport.sockets import configure, recv_frames, send_frames, tune_io_threads

CLOSE_TIMEOUT = 1.0  # seconds close() waits for the worker to confirm pending frees


class RemoteWorker(Client):
    """A plan-worker process at ``url`` (tcp:// or ipc://). Same interface as VirtualWorker.

    Requests are pipelined on one DEALER socket; a worker that does not answer within ``timeout``
    seconds raises TimeoutError naming the worker and the request, never a silent hang.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        context: zmq.Context | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.id = url
        self.timeout = timeout
        if context is None:
            context = zmq.Context.instance()
            tune_io_threads(context)  # takes effect if this is the context's first socket
        self._ctx = context
        self._sock = self._ctx.socket(zmq.DEALER)
        configure(self._sock)
        if curve is not None:  # (client public, client secret, server public)
            self._sock.curve_publickey, self._sock.curve_secretkey, self._sock.curve_serverkey = curve
        # Disconnects are how a restart shows before any reply does: see check_connection().
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(url)
        self._rcvtimeo = -1  # the socket's RCVTIMEO (ms), set by _recv when a wait's timeout changes
        try:
            welcome = self.hello()
        except BaseException:
            self.close()
            raise
        self.id = welcome.worker

    def _send(self, frames: list[Frame]) -> None:
        send_frames(self._sock, frames)

    def _recv(self, timeout: float | None) -> list[Frame] | None:
        sock = self._sock
        ms = -1 if timeout is None else int(timeout * 1000)
        if ms == 0:  # drain: only what has arrived
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return None
        elif ms != self._rcvtimeo:  # waiting: a blocking receive with a timeout (no poller per call)
            sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return recv_frames(sock, zmq.NOBLOCK if ms == 0 else 0)
        except zmq.Again:
            return None

    def _connection_lost(self) -> bool:
        lost = False
        while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # per plan call: no Poller object
            self._monitor.recv_multipart()
            lost = True
        return lost

    def close(self) -> None:
        """Send pending frees and close the socket (finite linger: never hangs)."""
        if self._sock.closed:
            return
        if self._garbage and self.session is not None:
            timeout, self.timeout = self.timeout, min(self.timeout or CLOSE_TIMEOUT, CLOSE_TIMEOUT)
            try:  # a worker that has gone must not hold close() up for the whole request timeout
                self.flush()
            except Exception:
                pass
            finally:
                self.timeout = timeout
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=200)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._sock.close(linger=0)


def connect(url: str, *, timeout: float = 30.0, curve: tuple[bytes, bytes, bytes] | None = None) -> RemoteWorker:
    """A handle to the plan-worker at ``url``; raises TimeoutError if it does not answer hello in time."""
    return RemoteWorker(url, timeout=timeout, curve=curve)
