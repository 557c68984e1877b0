"""RemoteWorker: a worker across ZeroMQ (a DEALER link to the worker's ROUTER), and ``connect``."""

from __future__ import annotations

import zmq

from planwire.transport.client import CLOSE_TIMEOUT, WorkerClient
from planwire.transport.connection import WINDOW, Connection
from planwire.transport.dealer import DealerLink

__all__ = ["CLOSE_TIMEOUT", "RemoteWorker", "connect"]


class RemoteWorker(WorkerClient):
    """A plan-worker process at ``url`` (tcp:// or ipc://). Same interface as VirtualWorker.

    Requests are pipelined on one connection, at most ``window`` in flight. Connecting tells apart nobody
    listening at ``url`` (NoWorkerListening), a refused CURVE key (CurveRefused) and a worker that does not
    answer within ``timeout`` seconds (RemoteTimeoutError, naming the worker and the request). A worker
    that goes away while requests are outstanding fails them all at once (WorkerLost).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        context: zmq.Context | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
        window: int = WINDOW,
    ) -> None:
        self.url = url
        self._link = DealerLink(url, context=context, curve=curve)
        super().__init__(Connection(self._link, name=url, timeout=timeout, window=window))
        try:
            welcome = self.hello()
        except BaseException:
            self._link.close()
            raise
        self.id = self._link.name = welcome.worker


def connect(
    url: str, *, timeout: float = 30.0, curve: tuple[bytes, bytes, bytes] | None = None, window: int = WINDOW
) -> RemoteWorker:
    """A handle to the plan-worker at ``url``. Raises NoWorkerListening when nobody listens there,
    CurveRefused when the worker refuses this client's CURVE key, RemoteTimeoutError when it does not
    answer hello within ``timeout`` s."""
    return RemoteWorker(url, timeout=timeout, curve=curve, window=window)
