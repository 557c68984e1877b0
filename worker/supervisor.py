"""Supervisor: a plan-worker's main loop. It holds the data and runs no plan that could harm it.

Registrations and runs execute in the sandboxed runner (worker/sandbox.py), but for the direct lane's runs
(worker/direct.py): a tiny run of a plan of float arithmetic only, when nothing is queued or in flight ahead
of it, is executed here and completed like a runner's answer (``Service.complete``). Meanwhile the loop
keeps reading its socket. ``ping`` and ``hello`` are answered at once, ``describe`` too unless it names an output
of a queued or running run, and ``cancel`` at once; every other request waits in one FIFO, so each
connection's requests still execute in the order they came. The jobs sent to the runner, and what waits
behind them, are the window's (worker/window.py: admission, dispatch, answers, restarts, deadlines).

The tiny call's path is short: idle, the loop blocks in the socket's receive, and a run the direct lane
takes is decoded, validated, executed and answered at once by the prepared path (worker/tiny.py), before
anything else is read; any other request, or a run that path leaves, takes the general path (decode, then
a direct-lane run validated, executed and answered at once); nothing else is paid per request. Runs that
come in a burst (pipelined: the request was there already when read) have their replies held and sent
together once no request waits, so ZeroMQ's I/O thread wakes once per burst, not once per reply. The idle
chores (a runner that died while idle, the lazy host copies) run at every receive timeout and at most every
``CHORES_S`` while requests keep coming. A run the lane declines, and every other request, is queued with
the rest of its burst first, so a run sent to the runner knows whether runs follow.

Each request keeps its client (CURVE key or routing id) from the socket to its reply, so a run completed
later is counted against, and its outputs owned by, the client that asked; every reply sent, a job's
completion included (with its duration), is observed by the service's stats. ``delete_plan`` waits behind
the runs in flight like other mutations, and the runner drops the plan's session before its next job.

A bug that raises while a request is handled costs that request only: it is answered ``internal`` naming
the failure (a run's outputs marked failed), nothing stored is touched, and the loop goes on with the rest
(``_failed``). ``PLANWIRE_FAULT=TYPE`` (read at start; for tests) makes executing requests of that type raise.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections import deque

import zmq

from planwire.transport import framing
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.server import Server
from planwire.worker import heap
from planwire.worker.direct import DirectLane
from planwire.worker.jobs import Origin, RegisterJob, RunJob
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service
from planwire.worker.tiny import TinyPath
from planwire.worker.window import Queued, Slot, Window

log = logging.getLogger("planwire.worker")

MAX_QUEUED = 10_000  # requests waiting behind a job; past it the socket is not read (ZeroMQ's HWM pushes back)
POLL_MS = 100  # the stop flag is checked at least this often
BUSY_S = 0.1  # while a job runs, the loop also wakes this often when nothing comes (new connections, timeouts)
CHORES_S = 0.01  # while requests keep coming, the idle chores run at most this often
WAITING_S = 50e-6  # a receive that returned within this was not waited for: the request came in a burst
FAULT_ENV = "PLANWIRE_FAULT"  # tests only: a request type whose execution raises here (a bug's stand-in)
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: no enum math per call


class Supervisor(Window):
    """Serves ``service`` on ``server``'s socket, executing jobs in ``sandbox``."""

    def __init__(self, service: Service, server: Server, sandbox: Sandbox, direct: DirectLane | None = None) -> None:
        self.service = service
        self.server = server
        self.sandbox = sandbox
        self.direct = direct  # tiny runs of provably harmless plans, executed here (worker/direct.py)
        service.unloaded.append(sandbox.forget)  # a plan nobody holds (delete_plan, --idle-ttl): sessions go
        if direct is not None:
            service.unloaded.append(direct.forget)
        self.queue: deque[Queued] = deque()
        self.window: deque[Slot] = deque()  # jobs sent or about to be, in order; the head is the oldest
        self._rcvtimeo = -2
        self._burst = False  # reading a burst of requests while idle: they are queued, then executed
        self._chores_at = 0.0  # monotonic time the idle chores are due
        self.trimmer = heap.Trimmer()  # what a burst freed goes back to the system once it is quiet
        sandbox.on_lost = self._lost
        self.gate = service.durable.install(server) if service.durable is not None else None  # group commit
        self.tiny = TinyPath(service, direct) if direct is not None and self.gate is None else None
        self._fd: int = server.socket.getsockopt(zmq.FD)  # readable when the socket's events change (see _busy_wait)
        self._fault = os.environ.get(FAULT_ENV) or None

    # -- loop -------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        # Idle, the loop blocks in the socket's receive (as a plain server would: one call per request);
        # while jobs run it sleeps until the runner answers or a request comes (one poll over the runner's
        # pipe and the socket's descriptor), at least every BUSY_S, and between answers reads what arrived on
        # the socket. The idle path polls nothing but the socket: the tiny call pays nothing for control.
        sock, sandbox = self.server.socket, self.sandbox  # the socket: receive timeout and readiness only
        sandbox.start()  # warm: the first registration does not wait for onnxruntime to load
        # What start-up made (modules, onnxruntime's and numpy's objects: most of the heap) lives as long as the
        # worker: kept out of every collection, a full one walks only what requests left, not ~40 ms of heap
        gc.freeze()
        try:
            while not self.server.stopped:
                try:
                    self._step(sock, sandbox)
                    if self.gate is not None:  # a burst's writes made durable at once, then its replies sent
                        self.gate.flush()
                except Exception:  # a bug here must not take the worker (and its data) down
                    log.exception("supervisor step failed")
        finally:
            sandbox.close()

    def _step(self, sock: zmq.Socket, sandbox: Sandbox) -> None:
        if self.window:
            if sandbox.wait(*self._busy_wait(sock)):
                self._from_runner()
            else:
                self.server.tend()  # while jobs run, new connections are counted (and refused past the limit) too
            self._read(sock)
            self._advance()
        elif self.queue:  # left by a window that emptied without an answer (a cancel, a restart)
            self._advance()
        else:
            self._idle(sock, sandbox)
            return
        head = self._head()
        if head is not None and time.monotonic() > head.deadline:
            self._overdue(head)

    def _idle(self, sock: zmq.Socket, sandbox: Sandbox) -> None:
        """Nothing queued or in flight: block in the socket's receive and answer the tiny runs that come, one
        after another, in this loop (nothing else is paid per request); any other request goes to the general
        path, and the loop returns once that left something queued or in flight (or a durable gate), at a receive
        timeout, or when the idle chores find work queued. A request that was waiting already when it was read
        starts a burst (pipelined calls): the next ones are read without waiting and their replies held, then
        sent together (Server.hold) once none waits; a lone call (one waited for) is answered at once."""
        server, tiny, trimmer, monotonic = self.server, self.tiny, self.trimmer, time.monotonic
        receive, send, hold = server.receive, server.send, server.hold
        if self._rcvtimeo != POLL_MS:
            sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
            self._rcvtimeo = POLL_MS
        burst = False
        try:
            while not server.stopped:
                now = monotonic()
                if now >= self._chores_at:
                    self._chores_at = now + CHORES_S
                    if sandbox.wait(0):  # the runner died while idle
                        self._from_runner()
                    if self.queue or self.window:
                        return
                    sandbox.sync()  # host copies of what the runner computed and clients kept (worker/resident.py)
                try:
                    peer, client, frames = receive(_NOBLOCK if burst else 0)
                except zmq.Again:
                    if burst:  # the burst is read: its replies go out, then the next request is waited for
                        burst = False
                        server.flush()
                        continue
                    trimmer.idle()
                    self._chores_at = 0.0  # quiet: the chores at every timeout
                    return
                if not burst:
                    burst = monotonic() - now < WAITING_S
                trimmer.active()
                try:
                    reply = tiny(frames, client) if tiny is not None else None  # a tiny direct-lane run (tiny.py)
                    if reply is None:
                        server.flush()  # the burst's replies go now: the general path may take long (review)
                        self._idle_request(sock, peer, client, frames)  # the general path
                        if self.gate is not None or self.queue or self.window:
                            return
                        continue
                    if burst:
                        hold(peer, reply)
                    else:
                        send(peer, reply)
                except Exception as e:
                    self._failed(e, bytes(peer), client, frames)
                    return
        finally:
            server.flush()

    def _busy_wait(self, sock: zmq.Socket) -> tuple[float, int | None]:
        """How long to wait for the runner while jobs run, and the socket's descriptor to wake on as well.
        ZeroMQ's descriptor signals a change, not a level: it is watched only once EVENTS has said nothing is
        waiting (then a request that comes wakes the poll), and not while the queue is full (nothing is read
        then, and the descriptor would stay readable)."""
        head = self._head()
        seconds = BUSY_S
        if head is not None and head.deadline > 0:  # woken at the head's deadline (1 ms at least: no spinning)
            seconds = min(BUSY_S, max(1e-3, head.deadline - time.monotonic()))
        if len(self.queue) >= MAX_QUEUED:
            return seconds, None
        if sock.getsockopt(_EVENTS) & _POLLIN:
            return 0.0, None  # requests wait already: read them now
        return seconds, self._fd

    def _idle_request(self, sock: zmq.Socket, peer: bytes, client: bytes, frames: list) -> None:
        """A request read while nothing is queued or in flight, that the tiny path left (or with no tiny path). A
        run the direct lane takes is answered at once; anything else is queued with the rest of its burst first,
        then executed."""
        t0 = time.perf_counter()
        service = self.service
        msg = self.tiny.decoded(frames) if self.tiny is not None else None  # decoded there already: not again
        if msg is not None:
            buffers: list = []  # two frames: no buffers (framing.unpack_request)
        else:
            msg, buffers = service.decode(frames, client, t0=t0)
        if type(msg) is m.Delete and self.gate is None:  # the frees of a client's tiny calls: answered at once
            self.server.send(peer, service.answer(msg, buffers, frames, client, t0=t0))
            return
        queued = None
        if type(msg) is m.Run and self.direct is not None and self.gate is None:  # durable: grouped replies
            job = service.begin(msg, buffers, frames, client)
            if type(job) is not RunJob:  # refused: its reply (its outputs marked failed)
                self.server.send(peer, job)  # type: ignore[arg-type]
                return
            results = self.direct.run(job)
            if results is not None:
                self.server.send(peer, service.complete(job, results))
                return
            queued = Queued(bytes(peer), client, frames, msg, buffers, job)  # for the runner
        self._burst = True  # a run sent to the runner knows whether runs follow it
        try:
            if queued is not None:
                self.queue.append(queued)
            else:
                self._route(bytes(peer), client, frames, msg, buffers, t0)
            self._read(sock)
        finally:
            self._burst = False
        self._advance()

    def _read(self, sock: zmq.Socket) -> None:
        """Requests already waiting on the socket (none: returns at once, without an exception)."""
        for _ in range(64):  # a burst, then back to the runner's answers
            if len(self.queue) >= MAX_QUEUED or not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            try:
                peer, client, frames = self.server.receive(_NOBLOCK)
            except zmq.Again:  # what was there came on a refused connection
                return
            try:
                self._request(bytes(peer), client, frames)
            except Exception as e:
                self._failed(e, bytes(peer), client, frames)

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, peer: bytes, client: bytes, frames: list) -> None:
        t0 = time.perf_counter()
        msg, buffers = self.service.decode(frames, client, t0=t0)
        self._route(peer, client, frames, msg, buffers, t0)

    def _route(
        self, peer: bytes, client: bytes, frames: list, msg: m._Message | None, buffers: list, t0: float
    ) -> None:
        service, send = self.service, self.server.send
        busy = self.window or self.queue or self._burst
        if msg is None:  # refused as read: answered in its turn (PROTOCOL.md §4.2)
            if busy:
                self.queue.append(Queued(peer, client, frames, None, buffers))
            else:
                send(peer, buffers)
            return
        kind = type(msg)
        if (kind is m.Ping or kind is m.Hello) and (not busy or self._only_runs_ahead(peer)):
            send(peer, service.answer(msg, buffers, frames, client, t0=t0))
        elif kind is m.Cancel:
            self._cancel(peer, client, frames, msg)  # type: ignore[arg-type]
        elif busy:
            if kind is m.Describe and self._may_describe(peer, client, msg):  # type: ignore[arg-type]
                send(peer, service.answer(msg, buffers, frames, client, t0=t0))
            else:
                self.queue.append(Queued(peer, client, frames, msg, buffers))
        else:
            try:
                self._process(Queued(peer, client, frames, msg, buffers))
            except Exception as e:
                self._failed(e, peer, client, frames, msg)

    def _process(self, q: Queued) -> None:
        """Execute ``q`` (the window is empty, or ``q`` may join it): a job joins the window; a reply is sent,
        or waits in the window behind the jobs there."""
        msg = q.msg
        if msg is None:
            self._reply(q.peer, q.buffers)
            return
        if self._fault is not None and m.type_name(type(msg)) == self._fault:
            raise RuntimeError(f"fault injected by {FAULT_ENV}={self._fault}")
        if isinstance(msg, m.Run | m.RegisterPlan):
            if q.chain is not None:  # chained behind the head (worker/chain.py)
                self._start_chained(q)
                return
            job = q.job  # validated already when the direct lane declined it
            if job is None:
                job = self.service.begin(msg, q.buffers, q.frames, q.client)
                if self.direct is not None and not self.window and isinstance(job, RunJob):
                    results = self.direct.run(job)  # nothing ahead of it: a tiny safe run is answered here
                    if results is not None:
                        self.server.send(q.peer, self.service.complete(job, results))
                        return
            if isinstance(job, RunJob | RegisterJob):
                self._start(q.peer, job)
                return
            reply = job
        else:
            reply = self.service.answer(msg, q.buffers, q.frames, q.client)
        self._reply(q.peer, reply)

    def _reply(self, peer: bytes, frames: list) -> None:
        if self.window:
            self.window.append(Slot(peer, None, frames))
        else:
            self.server.send(peer, frames)

    def _advance(self) -> None:
        """Move what may go from the queue into the window, in order (the runs sent in one write)."""
        queue = self.queue
        self.sandbox.hold()
        try:
            while queue:
                q = queue[0]
                try:
                    if self.window and not self._joins(q):
                        break
                    queue.popleft()
                    self._process(q)
                except Exception as e:
                    if queue and queue[0] is q:
                        queue.popleft()
                    self._failed(e, q.peer, q.client, q.frames, q.msg)
        finally:
            self._send_held()

    def _failed(self, e: Exception, peer: bytes, client: bytes, frames: list, msg: m._Message | None = None) -> None:
        """A bug raised while request ``frames`` was handled: it is answered ``internal`` naming the failure (a
        run's outputs marked failed, as for a refused run), in its turn, unless it is still queued or the runner
        has its job (which answers it); a job of it not sent yet leaves the window. Nothing stored is touched."""
        log.error("supervisor step failed", exc_info=e)
        if any(q.frames is frames for q in self.queue):
            return
        for slot in self.window:
            if slot.job is not None and slot.job.origin.frames is frames:
                if slot.sent:
                    return
                self.window.remove(slot)
                break
        if msg is None:
            with contextlib.suppress(Exception):  # unreadable: answered with the id it may carry
                msg = framing.unpack_request(frames, self.service.limits)[0]
        rid = msg.id if msg is not None else framing.request_id(frames)  # type: ignore[attr-defined]
        what = f"{m.type_name(type(msg))} #{rid}" if msg is not None else f"request #{rid}"
        error = ProtocolError(
            "internal", f"the worker failed handling {what} ({type(e).__name__}: {e}): a bug, see its log; retry"
        )
        service = self.service
        if type(msg) is m.Run:
            reply = service.drop(msg, error, frames, client)  # type: ignore[arg-type]
        else:
            reply = service.refuse(rid, error, Origin(frames, client), msg)
        self._reply(peer, reply)

    def _only_runs_ahead(self, peer: bytes) -> bool:
        """Whether everything of connection ``peer`` queued or waiting in the window is a run: only then may a
        control request (ping, hello, describe) be answered ahead of it (PROTOCOL.md §4.2); a put, delete or
        other reply ahead keeps its place."""
        if any(q.peer == peer and not isinstance(q.msg, m.Run) for q in self.queue):
            return False
        return not any(s.peer == peer and s.job is None for s in self.window)

    def _may_describe(self, peer: bytes, client: bytes, msg: m.Describe) -> bool:
        """Whether a ``describe`` may be answered ahead (PROTOCOL.md §4.2): only runs of its connection are
        ahead of it, and it names no output of a run of its owner queued or in the window."""
        if not self._only_runs_ahead(peer):
            return False
        owner = self.service.owners.owner
        me = owner(client)
        pending = self._window_outputs()
        for q in self.queue:
            if isinstance(q.msg, m.Run):
                pending.update((owner(q.client), k) for k in q.msg.outputs)
        return not any((me, k) in pending for k in msg.keys)
