"""Client: a handle to one worker. Pipelines requests by id; subclasses only move frames.

Runs are sent without waiting: their replies are matched by request id whenever the client next reads.
A failed run is recorded by the worker against its output keys, so the error surfaces on ``.get()``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from planwire.transport import codec, session
from planwire.transport import messages as m
from planwire.transport.arrays import as_array, tags_of, wrap
from planwire.transport.errors import ProtocolError, RemoteTimeoutError, remote_error
from planwire.transport.pointers import PointerPlan, PointerTensor
from planwire.transport.session import Frame
from planwire.transport.spec import PlanSource, PlanVariant

log = logging.getLogger("planwire.client")

DRAIN_AT = 64  # read finished replies once this many requests are in flight
INLINE_MAX = 64 << 10  # run results up to this size come back with the run's reply: get() then costs nothing
FREE_BATCH = 64  # frees of collected or fetched results go out together, or before any awaited request


class Client:
    """Worker handle: the same API whether the worker is in this process or across a network."""

    id: str
    timeout: float | None = None

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._keys = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._in_flight: dict[int, str] = {}  # request id -> what it was, for errors and timeouts
        self._detached: set[int] = set()  # fire-and-forget requests: their replies are not awaited
        self._done: dict[int, tuple[m._Message, list[memoryview]]] = {}
        self._plans: set[str] = set()  # plan ids registered in the worker's current session
        self._pointers: weakref.WeakKeyDictionary[Any, PointerPlan] = weakref.WeakKeyDictionary()
        self._garbage: list[str] = []
        self._inline_runs: dict[int, list[weakref.ref[PointerTensor]]] = {}  # run id -> its result pointers
        self.inline_max = INLINE_MAX
        self.session: str | None = None
        self.providers: list[str] = []
        self.limits: m.Limits | None = None
        self.identity = ""  # issued by the worker at hello (without CURVE); presented again after a reconnect
        self._greeting = False

    # -- moving frames: subclasses -----------------------------------------------------------------

    def _send(self, frames: list[Frame]) -> None:
        raise NotImplementedError

    def _recv(self, timeout: float | None) -> list[Frame] | None:
        """The next reply's frames, or None if none came within ``timeout`` seconds."""
        raise NotImplementedError

    # -- requests -----------------------------------------------------------------------------------

    def new_key(self) -> str:
        return f"{self._prefix}-{next(self._keys)}"

    def submit(
        self,
        make: Any,
        buffers: Sequence[Frame] = (),
        *,
        what: str = "",
        detached: bool = False,
        background: bool = False,
    ) -> int:
        """Send ``make(request_id)`` without waiting; returns the request id. The reply to a
        ``detached`` request is read and dropped (errors stay on the worker, see run). Pending frees go
        first, unless this is a ``background`` request (a run) and fewer than FREE_BATCH are pending.
        After the connection dropped, a hello goes first: it presents the client's identity again, so the
        worker knows the new connection as the owner of the client's objects."""
        if not self._greeting and self._connection_lost():
            self._plans.clear()
            self._greeting = True  # the welcome is read with the replies (_accept), never waited for
            try:
                self.submit(lambda rid: m.Hello(id=rid, client="planwire", identity=self.identity), detached=True)
            finally:
                self._greeting = False
        if self._garbage and (not background or len(self._garbage) >= FREE_BATCH):
            keys, self._garbage = self._garbage, []
            rid = next(self._ids)
            self._detached.add(rid)
            self._post(m.Delete(id=rid, keys=keys), (), "free")
        rid = next(self._ids)
        if detached:
            self._detached.add(rid)
        msg = make(rid)
        self._post(msg, buffers, what or m.type_name(type(msg)))
        if len(self._in_flight) > DRAIN_AT:
            self._drain()
        return rid

    def _post(self, msg: m._Message, buffers: Sequence[Frame], what: str) -> None:
        frames = session.pack(msg, buffers)
        if buffers and self.limits is not None:
            self._check_size(frames, what, self.limits)
        self._in_flight[msg.id] = what  # type: ignore[attr-defined]
        self._send(frames)

    def _check_size(self, frames: list[Frame], what: str, limits: m.Limits) -> None:
        """ValueError for a message the worker would refuse: far enough past its limit, ZeroMQ would drop the
        connection instead of letting it answer, and the caller would wait for a timeout."""
        size = sum(map(len, frames))
        if size > limits.max_message_bytes:
            raise ValueError(
                f"{what} is a message of {size} bytes, over worker {self.id!r}'s limit of "
                f"{limits.max_message_bytes} bytes (plan-worker --max-message-mb): send less per message"
            )
        if len(frames) - 2 > limits.max_frames:
            raise ValueError(
                f"{what} has {len(frames) - 2} tensor frames, over worker {self.id!r}'s limit of {limits.max_frames}"
            )

    def _read_one(self, rid: int) -> None:
        frames = self._recv(self.timeout)
        if frames is None:
            what = self._in_flight.get(rid, "request")
            raise RemoteTimeoutError(
                f"worker {self.id!r} did not answer {what} (request #{rid}) within {self.timeout} s"
            )
        self._accept(frames)

    def settle(self, rid: int) -> None:
        """Read replies until the run ``rid`` has answered (its inline results are then on its pointers)."""
        while rid in self._inline_runs:
            self._read_one(rid)

    def wait(self, rid: int) -> tuple[m._Message, list[memoryview]]:
        """The reply to request ``rid``; RemoteError when it is an error reply."""
        while rid not in self._done:
            self._read_one(rid)
        reply, buffers = self._done.pop(rid)
        if isinstance(reply, m.Error):
            raise remote_error(self.id, reply.code, reply.message)
        return reply, buffers

    def request(
        self, make: Any, buffers: Sequence[Frame] = (), *, what: str = ""
    ) -> tuple[m._Message, list[memoryview]]:
        return self.wait(self.submit(make, buffers, what=what))

    def _drain(self) -> None:
        while (frames := self._recv(0)) is not None:
            self._accept(frames)

    def _accept(self, frames: list[Frame]) -> None:
        reply, buffers = session.unpack_reply(frames)
        if reply.session != self.session:  # type: ignore[attr-defined]
            if self.session is not None:
                log.warning("worker %r restarted (new session): its plans and tensors are gone", self.id)
                self._plans.clear()
            self.session = reply.session  # type: ignore[attr-defined]
        if isinstance(reply, m.Welcome):  # also after a reconnect: a restarted worker issues a new identity
            self.providers, self.limits, self.identity = reply.providers, reply.limits, reply.identity
        rid = reply.re  # type: ignore[attr-defined]
        what = self._in_flight.pop(rid, None)
        refs = self._inline_runs.pop(rid, None)
        if refs is not None:  # a run's reply: keep the values it carries on their pointers
            self._attach([p for ref in refs if (p := ref()) is not None], reply, buffers)
            return  # an error reply: the worker keeps the failure against the outputs for get()
        if rid in self._detached:  # fire-and-forget: a failed run is kept by the worker for .get()
            self._detached.discard(rid)
            if isinstance(reply, m.Error):
                log.debug("%s refused by %r: %s", what, self.id, reply.message)
            return
        self._done[rid] = (reply, buffers)

    def hello(self) -> m.Welcome:
        self._greeting = True
        try:
            reply, _ = self.request(lambda rid: m.Hello(id=rid, client="planwire", identity=self.identity))
        finally:
            self._greeting = False
        assert isinstance(reply, m.Welcome)
        return reply

    def ping(self) -> None:
        self.request(lambda rid: m.Ping(id=rid))

    # -- tensors ------------------------------------------------------------------------------------

    def put(self, value: Any, *, tags: Sequence[str] | None = None, key: str | None = None) -> PointerTensor:
        """Store a tensor on the worker; the pointer owns it (frees it when collected)."""
        tags = tuple(tags_of(value) if tags is None else tags)
        return self.put_many({key or self.new_key(): value}, tags=tags)[0]

    def put_many(
        self, values: Mapping[str, Any], *, tags: Sequence[str] = (), owned: bool = True
    ) -> list[PointerTensor]:
        """Store several tensors under the given keys in one message (overwriting what those keys held)."""
        items, buffers = [], []
        for key, value in values.items():
            wire, shape, buf = codec.to_frame(as_array(value))
            items.append(m.PutTensor(key=key, dtype=wire, shape=shape, frame=len(buffers), tags=list(tags)))
            buffers.append(buf)
        what = f"put of {', '.join(map(repr, values))}" if len(values) <= 3 else f"put of {len(values)} tensors"
        self.request(lambda rid: m.Put(id=rid, tensors=items), buffers, what=what)
        return [PointerTensor(self, t.key, t.dtype, tuple(t.shape), tuple(tags), owned=owned) for t in items]

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the worker's tensors that carry all ``tags`` (they do not own the data)."""
        reply, _ = self.request(lambda rid: m.Search(id=rid, tags=list(tags)))
        return [self._pointer_of(t) for t in reply.tensors]  # type: ignore[attr-defined]

    def describe(self, *pointers: PointerTensor) -> list[m.TensorInfo]:
        reply, _ = self.request(lambda rid: m.Describe(id=rid, keys=[p.key for p in pointers]))
        return reply.tensors  # type: ignore[attr-defined]

    def fetch(self, pointer: PointerTensor, keep: bool = False) -> Any:
        """Value of a pointer's tensor; moved off the worker unless ``keep``. A value that came back with
        its run's reply costs no round trip: a move then frees the stored copy with the next frees."""
        self._check_pointer(pointer)
        if pointer._pending is not None:
            self.settle(pointer._pending)
        inline = pointer._inline
        if inline is None:
            return wrap(self.fetch_arrays([pointer.key], keep=keep)[0])
        if not keep:
            pointer._inline = None
            self.release(pointer.key)
        return wrap(inline)

    def fetch_arrays(self, keys: list[str], keep: bool = False) -> list[np.ndarray]:
        reply, buffers = self.request(lambda rid: m.Get(id=rid, keys=keys, keep=keep), ())
        return [self._decode(t, buffers) for t in reply.tensors]  # type: ignore[attr-defined]

    def delete(self, *pointers: PointerTensor) -> None:
        self.request(lambda rid: m.Delete(id=rid, keys=[p.key for p in pointers]))
        for p in pointers:
            p.consumed = True

    def release(self, key: str) -> None:
        """Free a remote tensor later (called from __del__: sent with the next request, never re-entrant)."""
        self._garbage.append(key)

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

    def _attach(self, pointers: Sequence[PointerTensor], reply: m._Message, buffers: list[memoryview]) -> None:
        """Keep on each pointer the value a run's reply carries for it (read back by ``get()``)."""
        values = {t.key: t for t in reply.tensors} if isinstance(reply, m.Tensors) else {}
        for p in pointers:
            p._pending = None
            t = values.get(p.key)
            if t is not None:
                p._inline = self._decode(t, buffers)

    @staticmethod
    def _decode(t: m.KeyedTensor, buffers: list[memoryview]) -> np.ndarray:
        return codec.from_frame(t.dtype, t.shape, session.frame_at(buffers, t.frame, f"tensor {t.key!r}"))

    def _check_pointer(self, p: PointerTensor) -> None:
        if p.worker is not self:
            raise ValueError(f"{p!r} points to worker {p.worker.id!r}, not {self.id!r}: move it there first")
        if p.consumed:
            raise ValueError(
                f"{p!r} was already fetched with .get() (which moves the tensor off the worker); "
                "use .get(keep=True) to copy"
            )

    # -- plans --------------------------------------------------------------------------------------

    def plan_pointer(self, source: PlanSource) -> PointerPlan:
        """A PointerPlan for ``source`` on this worker; its bytes are sent once per worker session."""
        pointer = self._pointers.get(source)
        if pointer is None:
            pointer = self._pointers[source] = PointerPlan(source, self)
        for variant in getattr(source, "variants", ()):
            self.ensure_plan(variant, source.name)
        return pointer

    def _connection_lost(self) -> bool:
        """Whether the transport saw the connection drop since last asked (never, in process)."""
        return False

    def check_connection(self) -> None:
        """After the connection dropped, learn the worker's session again: a restarted worker has lost its
        plans and tensors, so plans are registered again on demand instead of failing the next run."""
        if self._connection_lost():
            self._plans.clear()
            self.hello()  # the reply carries the worker's (possibly new) session; the identity goes back

    def ensure_plan(self, variant: PlanVariant, name: str = "") -> None:
        """Register a plan variant unless this worker session already has it (waits: errors show here)."""
        self.check_connection()
        if variant.id in self._plans and self.session is not None:
            return
        limits = self.limits
        if limits is not None and len(variant.data) > limits.max_plan_bytes:
            raise ValueError(
                f"plan {name!r} is {len(variant.data)} bytes, over worker {self.id!r}'s limit of "
                f"{limits.max_plan_bytes} bytes per plan (plan-worker --max-plan-mb)"
            )
        reply, _ = self.request(
            lambda rid: m.RegisterPlan(id=rid, frame=0, name=name), [variant.data], what=f"plan {name!r}"
        )
        if reply.plan != variant.id:  # type: ignore[attr-defined]
            raise ProtocolError("bad_plan", f"worker {self.id!r} registered plan {name!r} under an unexpected id")
        self._plans.add(variant.id)

    def delete_plan(self, plan: str) -> None:
        """Unregister a plan (by id) on the worker, freeing its place under ``--max-plans``."""
        self.request(lambda rid: m.DeletePlan(id=rid, plan=plan))
        self._plans.discard(plan)

    def signature_of(self, arg: Any) -> tuple[str, tuple[int, ...]]:
        """(wire dtype, shape) of a plan argument, pointer or local tensor."""
        if isinstance(arg, PointerTensor):
            self._check_pointer(arg)
            return arg.dtype, arg.shape
        array = as_array(arg)
        return codec.dtypes.to_wire(array.dtype), array.shape

    def run(
        self,
        variant: PlanVariant,
        args: Sequence[Any],
        *,
        outputs: Sequence[str | None] | None = None,
        fetch: Sequence[int] = (),
        name: str = "",
        wait: bool = True,
        inline_max: int | None = None,
    ) -> list[PointerTensor]:
        """Run a registered plan on pointers and/or local tensors (sent inline). Returns result pointers
        at once. ``outputs[i]`` names the key of output i: None (or no ``outputs``) makes a fresh key the
        result pointer owns, a string a key the caller owns (e.g. state a training step updates in place).
        Outputs listed in ``fetch`` and, without ``outputs``, every output of at most ``inline_max`` bytes
        ride on the run's reply and ``get()`` reads them there, so ``plan(x).get()`` is one message each
        way; with ``fetch`` and ``wait`` the call waits for that reply (errors raise here)."""
        wire_args, buffers = [], []
        for a in args:
            if isinstance(a, PointerTensor):
                self._check_pointer(a)
                wire_args.append(m.Arg(ref=a.key))
            else:
                wire, shape, buf = codec.to_frame(as_array(a))
                wire_args.append(m.Arg(tensor=m.Tensor(dtype=wire, shape=shape, frame=len(buffers))))
                buffers.append(buf)
        named = list(outputs) if outputs is not None else [None] * len(variant.outputs)
        keys = [k or self.new_key() for k in named]
        results = [
            PointerTensor(self, k, dtype, shape, owned=n is None)
            for k, n, (dtype, shape) in zip(keys, named, variant.results, strict=True)
        ]
        if inline_max is None:
            inline_max = self.inline_max if outputs is None else 0
        fetch = list(fetch)
        make = lambda rid: m.Run(  # noqa: E731
            id=rid, plan=variant.id, args=wire_args, outputs=keys, fetch=fetch, inline_max=inline_max
        )
        what = f"run of plan {name!r}"
        if fetch and wait:
            reply, bufs = self.wait(self.submit(make, buffers, what=what))
            self._attach(results, reply, bufs)
        elif fetch or inline_max:
            rid = self.submit(make, buffers, what=what, background=True)
            self._inline_runs[rid] = [weakref.ref(r) for r in results]
            for r in results:
                r._pending = rid
        else:
            self.submit(make, buffers, what=what, detached=True, background=True)
        return results

    # -- lifetime -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every request sent so far has been answered (and pending frees are sent)."""
        self.request(lambda rid: m.Ping(id=rid))

    def close(self) -> None:
        pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"
