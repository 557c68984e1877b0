"""WorkerClient: the worker API (tensors, plans, runs) over a Connection, the same for every kind of worker.

Requests go through the :class:`~planwire.transport.connection.Connection` this client holds (ids,
requests in flight, session, frees); the client only says what to ask. This module holds identity,
tensors and lifetime; plans and runs are :class:`~planwire.transport.runs.PlanCalls`, mixed in.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from planwire.transport import codec, progress
from planwire.transport import messages as m
from planwire.transport.arrays import as_array, tags_of
from planwire.transport.connection import Connection, decode, decode_all
from planwire.transport.framing import Frame
from planwire.transport.pointers import PointerTensor, SearchResult
from planwire.transport.runs import PlanCalls

CLOSE_TIMEOUT = 1.0  # seconds close() waits for the worker to confirm the frees of what this client owns

log = logging.getLogger("planwire.client")


def _hook(name: str) -> tuple[Callable[..., Any], ...]:
    """Get, set and delete (restore) the connection's bound ``link.<name>``, which every message goes through."""
    attr = "_" + name
    return (
        lambda self: getattr(self.connection, attr),
        lambda self, fn: setattr(self.connection, attr, fn),
        lambda self: setattr(self.connection, attr, getattr(self.connection._link, name)),
    )


class WorkerClient(PlanCalls):
    """Worker handle: the same API whether the worker is in this process or across a network."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._key_number = itertools.count(1).__next__
        self._prefix = secrets.token_hex(4)
        self._init_plans()
        self.providers: list[str] = []

    # -- identity and state kept by the connection --------------------------------------------------

    @property
    def id(self) -> str:
        return self.connection.name

    @id.setter
    def id(self, value: str) -> None:
        self.connection.name = value

    @property
    def timeout(self) -> float | None:
        return self.connection.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self.connection.timeout = value

    @property
    def identity(self) -> str:
        """This client's identity on the worker without CURVE (issued at hello, presented again after a
        reconnect so the worker knows it as the owner of its objects); empty with CURVE."""
        return self.connection.identity

    @identity.setter
    def identity(self, value: str) -> None:
        self.connection.identity = value

    @property
    def session(self) -> str | None:
        """The worker incarnation the last reply came from (a restarted worker has a new one)."""
        return self.connection.session

    @property
    def limits(self) -> m.Limits | None:
        """What the worker announced at hello: its per-message limits and the caps it holds clients to
        (``max_store_bytes``, ``max_plans``, ``run_timeout_seconds``, ...; ``msgspec.UNSET`` where a worker
        does not announce one). None before hello."""
        return self.connection.limits

    # The frame hooks bench/comm.py wraps to count messages: the connection's bound link methods.
    _send = property(*_hook("send"))
    _recv = property(*_hook("recv"))

    # -- requests -----------------------------------------------------------------------------------

    def new_key(self) -> str:
        """A key no tensor of this client has had (``<prefix>-<n>``: the prefix is this client's own)."""
        return self.new_keys(1)[0]

    def new_keys(self, n: int) -> list[str]:
        """``n`` fresh keys in a row (one call's outputs); the one place keys are made."""
        prefix, number = self._prefix, self._key_number
        return [f"{prefix}-{number()}"] if n == 1 else [f"{prefix}-{number()}" for _ in range(n)]

    def request(
        self, make: Callable[[int], m.Request], buffers: Sequence[Frame] = (), *, what: str = ""
    ) -> tuple[m.Reply, list[Frame]]:
        """Send ``make(request_id)`` and wait for its reply; RemoteError for an error reply."""
        conn = self.connection
        return conn.request(make(conn.new_id()), buffers, what)

    def hello(self) -> m.Welcome:
        identity = self.connection.identity  # presented again: the worker knows this client by it
        reply, _ = self.request(lambda rid: m.Hello(id=rid, client="planwire", identity=identity))
        assert isinstance(reply, m.Welcome)
        self.providers, self.connection.limits = reply.providers, reply.limits
        return reply

    def ping(self) -> None:
        self.request(lambda rid: m.Ping(id=rid))

    # -- tensors ------------------------------------------------------------------------------------

    def put(
        self,
        value: Any,
        *,
        tags: Sequence[str] | None = None,
        key: str | None = None,
        progress: bool | None = None,
    ) -> PointerTensor:
        """Store a tensor on the worker; the pointer owns it (frees it when collected)."""
        tags = tuple(tags_of(value) if tags is None else tags)
        return self.put_many({key or self.new_key(): value}, tags=tags, progress=progress)[0]

    def put_many(
        self,
        values: Mapping[str, Any],
        *,
        tags: Sequence[str] = (),
        owned: bool = True,
        progress: bool | None = None,
    ) -> list[PointerTensor]:
        """Store several tensors under the given keys in one message (overwriting what those keys held).
        Over 64 MiB a progress bar shows on stderr (``progress=False`` or PLANWIRE_PROGRESS=0: none)."""
        items, buffers = [], []
        for key, value in values.items():
            wire, shape, buf = codec.to_frame(as_array(value))
            items.append(m.PutTensor(key=key, dtype=wire, shape=shape, frame=len(buffers), tags=list(tags)))
            buffers.append(buf)
        what = f"put of {', '.join(map(repr, values))}" if len(values) <= 3 else f"put of {len(values)} tensors"
        with _progress(f"{what} to {self.id}", buffers, progress):
            self.request(lambda rid: m.Put(id=rid, tensors=items), buffers, what=what)
        if owned:
            self.connection.owned.update(dict.fromkeys(values))
        return [PointerTensor(self, t.key, t.dtype, tuple(t.shape), tuple(tags), owned=owned) for t in items]

    def search(self, *tags: str) -> SearchResult:
        """Pointers to the worker's tensors that carry all ``tags`` (they do not own the data). Indexing
        an empty result raises an error naming the tags and the worker."""
        reply, _ = self.request(lambda rid: m.Search(id=rid, tags=list(tags)))
        assert isinstance(reply, m.Found)
        return SearchResult((self._pointer_of(t) for t in reply.tensors), tags=tags, worker=self.id)

    def describe(self, *pointers: PointerTensor) -> list[m.TensorInfo]:
        reply, _ = self.request(lambda rid: m.Describe(id=rid, keys=[p.key for p in pointers]))
        assert isinstance(reply, m.Found)
        return reply.tensors

    def fetch(self, pointer: PointerTensor, keep: bool = False, *, progress: bool | None = None) -> Any:
        """Value of a pointer's tensor; moved off the worker unless ``keep`` (as ``pointer.get``)."""
        return pointer.get(keep, progress=progress)

    def fetch_arrays(
        self, keys: list[str], keep: bool = False, *, progress: bool | None = None, nbytes: int = 0
    ) -> list[np.ndarray]:
        """Values of stored tensors by key, moved off the worker unless ``keep``; a bar on stderr when
        the expected ``nbytes`` are over 64 MiB (see put_many)."""
        what = f"get of {keys[0]!r}" if len(keys) == 1 else f"get of {len(keys)} tensors"
        with _progress(f"{what} from {self.id}", nbytes, progress):
            reply, buffers = self.request(lambda rid: m.Get(id=rid, keys=keys, keep=keep), (), what=what)
        if not keep:
            owned = self.connection.owned
            for k in keys:
                owned.pop(k, None)
        assert isinstance(reply, m.Tensors)
        return decode_all(reply.tensors, buffers)

    def delete(self, *pointers: PointerTensor) -> None:
        self.request(lambda rid: m.Delete(id=rid, keys=[p.key for p in pointers]))
        for p in pointers:
            p.consumed = True
            self.connection.owned.pop(p.key, None)

    def release(self, key: str) -> None:
        """Free a remote tensor later (called from __del__: sent with the next request, never re-entrant)."""
        self.connection.release(key)

    def _pointer_of(self, info: m.TensorInfo) -> PointerTensor:
        return PointerTensor(
            self,
            info.key,
            info.dtype,
            tuple(info.shape),
            tuple(info.tags),
            owned=False,
            private=info.private or info.owner == "worker",
        )

    _decode = staticmethod(decode)  # what bench/latency.py decodes a raw run's reply with

    def check_pointer(self, p: PointerTensor) -> None:
        """ValueError unless ``p`` points to a tensor this worker still holds for this client."""
        if p.worker is not self:
            raise ValueError(f"{p!r} points to worker {p.worker.id!r}, not {self.id!r}: move it there first")
        if p.consumed:
            raise ValueError(
                f"{p!r} was already fetched with .get() (which moves the tensor off the worker); "
                "use .get(keep=True) to copy"
            )

    # -- lifetime -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every request sent so far has been answered (and pending frees are sent). The ping
        alone is not enough: a worker may answer it before the runs queued ahead of it (PROTOCOL.md §4.2)."""
        self.request(lambda rid: m.Ping(id=rid))
        self.connection.wait_all()

    def close(self) -> None:
        """Free what this client still owns on the worker (best effort: at most CLOSE_TIMEOUT s, so a worker
        that has gone does not hold close() up for the whole request timeout), then close the link."""
        conn = self.connection
        if conn.release_all() and conn.session is not None:
            timeout, self.timeout = self.timeout, min(self.timeout or CLOSE_TIMEOUT, CLOSE_TIMEOUT)
            try:
                conn.check()
                self.flush()  # sends the frees first, then waits for the worker to confirm them all
            except Exception as e:  # noqa: BLE001  (best effort: closing must not fail)
                log.debug("frees at close not confirmed by %r: %s", self.id, e)
            finally:
                self.timeout = timeout
        conn.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"


Client = WorkerClient  # the name before the split into connection and API


def _progress(desc: str, size: int | Sequence[Frame], enabled: bool | None) -> Any:
    nbytes = size if isinstance(size, int) else sum(memoryview(b).nbytes for b in size)
    return progress.transfer(desc, nbytes, enabled)
