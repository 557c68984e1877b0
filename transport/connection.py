"""Connection: owns a request from its id to its reply, over any link that moves frames.

One object holds everything a client's requests share: the request ids, the table of requests in flight,
the worker session the replies carry, the batched frees of remote tensors, and the bounded window of
requests in flight. Each request is a :class:`Call`, entered in the in-flight table *before* its frames
are sent, and its reply is filed on that Call and nowhere else: whoever holds the Call finds the reply
there, and a reply nobody holds is dropped with its Call. A link that drops (the worker died or
restarted) fails every Call in flight at once with :class:`WorkerLost`.

The link is composed, not subclassed: anything with ``send(frames)``, ``recv(timeout)``, ``dropped()``,
``reset()`` and ``close()`` (a ZeroMQ DEALER, or an in-process worker).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from planwire.transport import codec, framing
from planwire.transport import messages as m
from planwire.transport.errors import RemoteError, RemoteTimeoutError, WorkerLost, remote_error
from planwire.transport.framing import Frame

log = logging.getLogger("planwire.client")

WINDOW = 512  # requests in flight per connection: past it, sending first reads replies (bounded memory)
FREE_BATCH = 64  # frees of collected or fetched results go out together, or before any awaited request

# Looked up once: every reply goes through these.
_Tensors, _Welcome, _Error = m.Tensors, m.Welcome, m.Error
_unpack_reply, _from_copied_frame = framing.unpack_reply, codec.from_copied_frame


class LinkDropped(Exception):
    """Raised by a link when its connection to the worker dropped: what was in flight is lost."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Link(Protocol):
    """Moves whole messages (lists of frames) to and from one worker."""

    timeout: float | None  # how long a send may wait for a connection (kept equal to the Connection's)

    def send(self, frames: list[Frame]) -> None:
        """Send one message; LinkDropped if the connection dropped before it could be sent."""
        ...

    def recv(self, timeout: float | None) -> list[Frame] | None:
        """The next reply, or None if none came within ``timeout`` s (0: only one already there);
        LinkDropped if the connection dropped while waiting."""
        ...

    def dropped(self) -> str | None:
        """Why the connection dropped since last asked (cheap, never blocks), or None."""
        ...

    def reset(self) -> None:
        """Forget the connection and everything queued on it; the next send connects afresh."""
        ...

    def close(self) -> None: ...


class Call:
    """One request: its id and what it was, then its reply (and raw frames) or the error that ended it."""

    __slots__ = ("buffers", "conn", "error", "id", "reply", "taken", "what")

    def __init__(self, conn: Connection, id: int, what: str) -> None:
        self.conn, self.id, self.what = conn, id, what
        self.reply: m.Reply | None = None
        self.buffers: list[Frame] = []
        self.error: Exception | None = None
        self.taken: set[int] | None = None  # frames already handed out as arrays (replies of several tensors)

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def wait(self) -> m.Reply:
        """The reply, as sent (an error reply is returned, not raised); WorkerLost if it can never come."""
        if self.reply is None:
            self.conn.wait(self)
        if self.error is not None:
            raise self.error
        return self.reply  # type: ignore[return-value]

    def result(self) -> tuple[m.Reply, list[Frame]]:
        """The reply and its raw frames; an error reply raises the matching RemoteError."""
        reply = self.wait()
        if type(reply) is m.Error:
            raise remote_error(self.conn.name, reply.code, reply.message)
        return reply, self.buffers

    def tensor(self, key: str) -> np.ndarray | None:
        """The value of tensor ``key`` if the reply carried it (a run's fetched or small outputs), else None.
        Each value read from a reply has memory of its own, even if the worker pointed two tensors at one frame."""
        reply = self.reply
        if reply is None:
            self.conn.wait(self)
            reply = self.reply
        if self.error is not None:
            raise self.error
        if type(reply) is not _Tensors:
            return None
        tensors = reply.tensors
        if len(tensors) == 1:  # the usual run reply: one output, one frame
            t = tensors[0]
            return decode(t, self.buffers) if t.key == key else None
        for t in tensors:
            if t.key == key:
                if self.taken is None:
                    self.taken = set()
                return _own(decode(t, self.buffers), t.frame, self.taken)
        return None


def decode(t: m.KeyedTensor, buffers: list[Frame]) -> np.ndarray:
    """The numpy view of a reply's tensor ``t`` (a small frame the link copied is read in place)."""
    i = t.frame
    frame = buffers[i] if i < len(buffers) else framing.frame_at(buffers, i, f"tensor {t.key!r}")
    return _from_copied_frame(t.dtype, t.shape, frame)


def decode_all(tensors: Sequence[m.KeyedTensor], buffers: list[Frame]) -> list[np.ndarray]:
    """The values of a reply's tensors, in order, none sharing memory with another (see :func:`decode`)."""
    if len(tensors) == 1:
        return [decode(tensors[0], buffers)]
    taken: set[int] = set()
    return [_own(decode(t, buffers), t.frame, taken) for t in tensors]


def _own(value: np.ndarray, frame: int, taken: set[int]) -> np.ndarray:
    """``value``, copied if its frame was handed out before: a reply that points two tensors at one frame
    must not give the caller two arrays where writing one changes the other."""
    if frame in taken:
        return value.copy()
    taken.add(frame)
    return value


class Connection:
    """Requests to one worker over ``link``: ids, calls in flight (at most ``window``), session, frees."""

    def __init__(self, link: Link, *, name: str, timeout: float | None = None, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 request in flight, got {window}")
        self.name = name
        self._link = link
        self.timeout = timeout
        self.window = window
        self.session: str | None = None  # the worker incarnation the last reply came from
        self.limits: m.Limits | None = None
        self.identity = ""  # issued by the worker at hello (without CURVE): presented again after a reconnect
        self._send, self._recv = link.send, link.recv  # bound once: the per-call path looks up nothing else
        self.new_id = itertools.count(1).__next__  # request ids: 1, 2, ... (a C call per request)
        self._in_flight: dict[int, Call] = {}
        self._garbage: list[str] = []  # keys to free with the next request
        self.owned: dict[str, None] = {}  # keys this client owns on the worker: freed at close
        self._present = False  # the identity is to be presented (hello) before the next request

    @property
    def timeout(self) -> float | None:
        """Seconds a request may wait for its reply (and a send for a connection); None: forever."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = self._link.timeout = value

    # -- sending ------------------------------------------------------------------------------------

    def send(self, msg: m.Request, buffers: Sequence[Frame] = (), what: str = "", *, background: bool = False) -> Call:
        """Send ``msg`` (its ``id`` from :meth:`new_id`) without waiting; its Call receives the reply."""
        return self.post(msg.id, framing.pack(msg, buffers), what, background=background)  # type: ignore[attr-defined]

    def post(self, rid: int, frames: list[Frame], what: str, *, background: bool = False) -> Call:
        """Send the packed request ``rid`` (signature, header, raw frames) without waiting; its Call receives
        the reply. Pending frees go first, unless this is a ``background`` request (a run) and fewer than
        FREE_BATCH are pending. With ``window`` requests in flight, replies are read first (blocking)."""
        if self.identity and (dropped := self._link.dropped()) is not None:
            self.lose(dropped)  # ZeroMQ reconnected under the hood: say hello with the identity first
        if self._present:  # a hello after a drop could not be sent then (nobody listening): now first
            self._hello()
        garbage = self._garbage
        if garbage and (not background or len(garbage) >= FREE_BATCH):
            self._send_frees()
        in_flight = self._in_flight
        if len(in_flight) >= self.window:
            self._make_room()
        if len(frames) > 2 and self.limits is not None:
            self._check_size(frames, what, self.limits)
        call = in_flight[rid] = Call(self, rid, what)  # filed before the frames leave: the reply lands here
        try:
            try:
                self._send(frames)
            except LinkDropped as e:  # noticed before sending: what was in flight is lost, this was not sent
                del in_flight[rid]
                self.lose(e.reason)
                in_flight[rid] = call
                self._send(frames)  # once, on a fresh connection
        except WorkerLost as e:  # nobody there any more: say which request was not sent
            in_flight.pop(rid, None)
            raise WorkerLost(self.name, f"{what} not sent: {e.message}") from None
        except BaseException:
            in_flight.pop(rid, None)
            raise
        return call

    def request(self, msg: m.Request, buffers: Sequence[Frame] = (), what: str = "") -> tuple[m.Reply, list[Frame]]:
        """Send and wait; RemoteError for an error reply."""
        return self.send(msg, buffers, what or m.type_name(type(msg))).result()

    def release(self, key: str) -> None:
        """Free a remote tensor with the next request (called from __del__: never sends, never re-entrant)."""
        self.owned.pop(key, None)
        self._garbage.append(key)

    def _send_frees(self) -> None:
        keys, self._garbage = self._garbage, []
        try:
            self.send(m.Delete(id=self.new_id(), keys=keys), (), "free")
        except (RemoteError, RemoteTimeoutError):  # not sent: kept for later; the request itself says why
            self._garbage[:0] = keys

    def _check_size(self, frames: list[Frame], what: str, limits: m.Limits) -> None:
        """ValueError for a message the worker would refuse: far enough past its limit, ZeroMQ would drop the
        connection instead of letting it answer, and the caller would wait for a timeout."""
        size = sum(map(len, frames))
        if size > limits.max_message_bytes:
            raise ValueError(
                f"{what} is a message of {size} bytes, over worker {self.name!r}'s limit of "
                f"{limits.max_message_bytes} bytes (plan-worker --max-message-mb): send less per message"
            )
        if len(frames) - 2 > limits.max_frames:
            raise ValueError(
                f"{what} has {len(frames) - 2} tensor frames, over worker {self.name!r}'s limit of {limits.max_frames}"
            )

    # -- receiving ----------------------------------------------------------------------------------

    def wait(self, call: Call) -> None:
        """Read replies until ``call`` is answered or failed; RemoteTimeoutError if the worker is silent."""
        recv = self._recv
        while call.reply is None and call.error is None:
            try:
                frames = recv(self._timeout)
            except LinkDropped as e:
                self.lose(e.reason)  # fails every call in flight, ``call`` included
                continue
            if frames is None:
                raise RemoteTimeoutError(
                    f"worker {self.name!r} did not answer {call.what} (request #{call.id}) within {self._timeout} s"
                )
            self._accept(frames)

    def wait_all(self) -> None:
        """Read replies until every request sent so far is answered or failed."""
        for call in list(self._in_flight.values()):
            self.wait(call)

    def _make_room(self) -> None:
        in_flight = self._in_flight
        while len(in_flight) >= self.window:
            self.wait(next(iter(in_flight.values())))

    def _accept(self, frames: list[Frame]) -> None:
        reply, buffers = _unpack_reply(frames)
        rid = reply.re
        if reply.session != self.session:
            if self.session is not None:
                log.warning("worker %r restarted (new session): its plans and tensors are gone", self.name)
                self._fail(self._sent_before(rid), "the worker restarted (a new session)")
            self.session = reply.session
        if type(reply) is _Welcome:  # also a hello sent after a reconnect; a restarted worker issues a new one
            self.identity = reply.identity
        call = self._in_flight.pop(rid, None)
        if call is None:  # an answer to a request already failed (lost, or sent before a restart)
            log.debug("dropped a reply from %r to request #%d, which nobody awaits", self.name, rid)
            return
        call.reply, call.buffers = reply, buffers
        if type(reply) is _Error:
            log.debug("%s refused by %r: %s", call.what, self.name, reply.message)

    def _sent_before(self, rid: int) -> list[Call]:
        """Calls sent before request ``rid`` (the table keeps send order): when its reply comes from a new
        worker session, theirs went to the old incarnation and never come."""
        if rid not in self._in_flight:
            return []
        before = []
        for i, call in self._in_flight.items():
            if i == rid:
                break
            before.append(call)
        return before

    # -- losing the worker --------------------------------------------------------------------------

    def check(self) -> bool:
        """Whether the link dropped since the last check (then everything in flight has failed)."""
        reason = self._link.dropped()
        if reason is not None:
            self.lose(reason)
        return reason is not None

    def lose(self, reason: str) -> None:
        """The connection dropped: fail every call in flight at once and start afresh, so nothing queued
        for the lost worker is delivered to whatever listens at the address next."""
        self._fail(list(self._in_flight.values()), reason)
        self._link.reset()
        self._present = bool(self.identity)  # first on the new connection: act for the same client
        self._hello()

    def _hello(self) -> None:
        """Present the identity on a new connection, so the worker knows this client (and its objects)."""
        msg = m.Hello(id=self.new_id(), client="planwire", identity=self.identity)
        self._in_flight[msg.id] = Call(self, msg.id, "hello")
        try:
            self._send(framing.pack(msg))
        except Exception:  # not sent (nobody listening yet): tried again before the next request
            self._in_flight.pop(msg.id, None)
            return
        self._present = False

    def _fail(self, calls: list[Call], reason: str) -> None:
        if not calls:
            return
        log.warning("lost %d request(s) to worker %r: %s", len(calls), self.name, reason)
        for call in calls:
            self._in_flight.pop(call.id, None)
            call.error = WorkerLost(
                self.name,
                f"{call.what} (request #{call.id}) will never be answered: {reason}; "
                "what it stored there may be gone (send it again)",
            )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def release_all(self) -> bool:
        """Queue frees of everything this client still owns on the worker; whether any frees are pending."""
        self._garbage.extend(k for k in self.owned if k not in set(self._garbage))
        self.owned = {}
        return bool(self._garbage)

    def close(self) -> None:
        """Close the link; later requests raise a clear error."""
        self._link.close()
        self._send = self._recv = self._closed  # type: ignore[assignment]
        self.identity = ""  # nothing to present any more: the link is gone
        self._present = False

    def _closed(self, *_: object) -> None:
        raise RemoteError(self.name, "closed", "this client was closed: connect again to use the worker")
