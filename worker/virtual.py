"""VirtualWorker: a worker in this process, speaking the wire format to an in-process Service."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from planwire.transport.arrays import as_array, tags_of
from planwire.transport.client import WorkerClient
from planwire.transport.connection import WINDOW, Connection
from planwire.transport.framing import DEFAULT_LIMITS, Frame, Limits
from planwire.worker.policy import Policy
from planwire.worker.service import Service


class ServiceLink:
    """Moves frames to a Service in this process and its replies back, through bytes as a socket would
    deliver them (nothing may alias the caller's buffers). It never drops."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.timeout: float | None = None
        self._replies: deque[list[Frame]] = deque()

    def send(self, frames: list[Frame]) -> None:
        self._replies.append([bytes(f) for f in self.service.handle([bytes(f) for f in frames])])

    def recv(self, timeout: float | None) -> list[Frame] | None:
        return self._replies.popleft() if self._replies else None

    def dropped(self) -> str | None:
        return None

    def reset(self) -> None:
        self._replies.clear()

    def close(self) -> None:
        pass


class VirtualWorker(WorkerClient):
    """An in-process worker. Requests are encoded to frames and decoded by the same Service a
    plan-worker process runs, so behaviour (and every test of it) is the networked worker's.

    ``data``: the worker's own tensors (tags from ``tag()``); plans may use them, clients can never
    delete them, and they leave the worker only as copies when ``public=True``; results computed from
    them never leave, unless ``policy`` (worker/policy.py, as ``plan-worker --policy``) releases them
    (``audit``: a file of one JSON line per release or refusal, as ``--audit``).
    """

    def __init__(
        self,
        hook: Any = None,
        id: str = "worker",
        data: Iterable[Any] = (),
        *,
        public: bool = False,
        device: str = "cpu",
        threads: int = 1,
        limits: Limits | None = None,
        policy: Policy | None = None,
        audit: str | None = None,
        window: int = WINDOW,
    ) -> None:
        own = [(f"{id}:data:{i}", as_array(t), tags_of(t)) for i, t in enumerate(data)]
        self.service = Service(
            id,
            data=own,
            public=public,
            device=device,
            threads=threads,
            limits=limits or DEFAULT_LIMITS,
            policy=policy,
            audit=audit,
        )
        super().__init__(Connection(ServiceLink(self.service), name=id, window=window))
        self.hello()
