"""Supervisor: a plan-worker's main loop. It holds the data and never runs a plan.

Registrations and runs execute in the sandboxed runner (worker/sandbox.py), one at a time; meanwhile the
loop keeps reading its socket. ``ping`` and ``hello`` are answered at once, ``describe`` too unless it
names an output of a queued or running run, and ``cancel`` at once; every other request waits in one
FIFO behind the running job, so each connection's requests still execute in the order they came
(a pipelined ``p(p(x))`` sees its first run's output). A runner that crashes, exhausts its memory, runs
past ``--run-timeout`` or is cancelled costs that job only: its caller gets ``plan_crashed``,
``out_of_memory``, ``plan_timeout`` or ``cancelled`` naming the plan, the run's outputs are marked failed
with that reason, and the next job starts a fresh runner, which re-creates sessions from the kept bytes.

Each request keeps its client (CURVE key or routing id) from the socket to its reply, so a run completed
later is counted against, and its outputs owned by, the client that asked; every reply sent, a job's
completion included (with its duration), is observed by the service's stats. ``delete_plan`` waits behind
the running job like other mutations, and the runner drops the plan's session before its next job.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import zmq

from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.server import Server
from planwire.worker import pipe
from planwire.worker.resident import Resident
from planwire.worker.runtime import Ports
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Job, Origin, RegisterJob, RunJob, Service

log = logging.getLogger("planwire.worker")

MAX_QUEUED = 10_000  # requests waiting behind a job; past it the socket is not read (ZeroMQ's HWM pushes back)
READY_TIMEOUT = 120.0  # seconds a runner may take to start (imports on a loaded host)
POLL_MS = 100  # the stop flag is checked at least this often
BUSY_MS = 10  # while a job runs, the socket is read at least this often (ping, cancel)


@dataclass
class _Queued:
    """A request waiting behind the running job (``msg`` None: one refused as it was read, whose reply frames
    are ``buffers``: it waits too, so a connection's replies keep the order of its requests)."""

    peer: bytes
    client: bytes
    frames: list
    msg: m._Message | None
    buffers: list


@dataclass
class _Current:
    peer: bytes
    job: Job
    deadline: float  # monotonic; while the runner starts: its start deadline


class Supervisor:
    """Serves ``service`` on ``server``'s socket, executing jobs in ``sandbox``."""

    def __init__(self, service: Service, server: Server, sandbox: Sandbox) -> None:
        self.service = service
        self.server = server
        self.sandbox = sandbox
        self.queue: deque[_Queued] = deque()
        self.current: _Current | None = None
        self._sent = False  # whether the current job has gone to the runner
        self._rcvtimeo = -2
        sandbox.on_lost = self._lost
        self.gate = service.durable.install(server) if service.durable is not None else None  # group commit

    # -- loop -------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        # Idle, the loop blocks in the socket's receive (as a plain server would: one call per request);
        # while a job runs it waits on the runner's pipe in slices of BUSY_MS and, between slices, reads
        # what arrived on the socket. No zmq_poll over both: the tiny-call path pays nothing for control.
        sock, sandbox = self.server.socket, self.sandbox  # the socket: receive timeout and readiness only
        sandbox.start()  # warm: the first registration does not wait for onnxruntime to load
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
        if self._sent:
            if sandbox.wait(BUSY_MS / 1e3):
                self._from_runner()
                return
            self.server.tend()  # while a job runs, new connections are counted (and refused past the limit) too
            self._read(sock)
        else:
            if sandbox.wait(0):  # Ready, or the runner died while idle
                self._from_runner()
            if self.current is None and not self.queue:
                sandbox.sync()  # host copies of what the runner computed and clients kept (worker/resident.py)
            want = BUSY_MS if self.current is not None else POLL_MS
            if want != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, want)
                self._rcvtimeo = want
            if len(self.queue) < MAX_QUEUED:
                try:
                    peer, client, frames = self.server.receive()
                except zmq.Again:
                    pass
                else:
                    self._request(bytes(peer), client, frames)
                    self._read(sock)
        if self.current is not None and time.monotonic() > self.current.deadline:
            self._overdue()

    def _read(self, sock: zmq.Socket) -> None:
        """Requests already waiting on the socket (none: returns at once, without an exception)."""
        for _ in range(64):  # a burst, then back to the runner's answer
            if len(self.queue) >= MAX_QUEUED or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                peer, client, frames = self.server.receive(zmq.NOBLOCK)
            except zmq.Again:  # what was there came on a refused connection
                return
            self._request(bytes(peer), client, frames)

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, peer: bytes, client: bytes, frames: list) -> None:
        t0 = time.perf_counter()
        service, send = self.service, self.server.send
        msg, buffers = service.decode(frames, client, t0=t0)
        if msg is None:  # refused as read: answered in its turn (PROTOCOL.md §4.2)
            if self.current is not None or self.queue:
                self.queue.append(_Queued(peer, client, frames, None, buffers))
            else:
                send(peer, buffers)
            return
        kind = type(msg)
        if kind is m.Ping or kind is m.Hello:
            send(peer, service.answer(msg, buffers, frames, client, t0=t0))
        elif kind is m.Cancel:
            self._cancel(peer, client, frames, msg)  # type: ignore[arg-type]
        elif self.current is not None or self.queue:
            if kind is m.Describe and not set(msg.keys) & self._pending_outputs():  # type: ignore[attr-defined]
                send(peer, service.answer(msg, buffers, frames, client, t0=t0))
            else:
                self.queue.append(_Queued(peer, client, frames, msg, buffers))
        else:
            self._process(_Queued(peer, client, frames, msg, buffers))

    def _process(self, q: _Queued) -> None:
        msg = q.msg
        if msg is None:
            self.server.send(q.peer, q.buffers)
            return
        if isinstance(msg, m.Run | m.RegisterPlan):
            job = self.service.begin(msg, q.buffers, q.frames, q.client)
            if isinstance(job, RunJob | RegisterJob):
                self._start(q.peer, job)
                return
            reply = job
        else:
            reply = self.service.answer(msg, q.buffers, q.frames, q.client)
            if isinstance(msg, m.DeletePlan):
                self.sandbox.forget(msg.plan)  # the runner drops its session before its next job
        self.server.send(q.peer, reply)

    def _advance(self) -> None:
        while self.current is None and self.queue:
            self._process(self.queue.popleft())

    def _pending_outputs(self) -> set[str]:
        keys = set()
        if self.current is not None and isinstance(self.current.job, RunJob):
            keys.update(self.current.job.msg.outputs)
        for q in self.queue:
            if isinstance(q.msg, m.Run):
                keys.update(q.msg.outputs)
        return keys

    def _cancel(self, peer: bytes, client: bytes, frames: list, msg: m.Cancel) -> None:
        service, send = self.service, self.server.send
        origin = Origin(frames, client)
        for i, q in enumerate(self.queue):
            if q.peer == peer and isinstance(q.msg, m.Run) and q.msg.id == msg.run:
                del self.queue[i]
                why = ProtocolError("cancelled", f"run #{q.msg.id} was cancelled (request #{msg.id}) before it started")
                send(peer, service.drop(q.msg, why, q.frames, q.client))
                send(peer, service.reply(origin, msg, m.Ok(re=msg.id, session=service.session)))
                return
        cur = self.current
        if cur is not None and cur.peer == peer and isinstance(cur.job, RunJob) and cur.job.msg.id == msg.run:
            self.sandbox.stop("cancelled")
            name = cur.job.plan.name
            why = ProtocolError("cancelled", f"run #{msg.run} of plan {name!r} was cancelled (request #{msg.id})")
            self._finish(why, then=service.reply(origin, msg, m.Ok(re=msg.id, session=service.session)))
            return
        error = ProtocolError(
            "bad_argument", f"cancel: no run #{msg.run} of this connection is queued or running (finished?)"
        )
        send(peer, service.refuse(msg.id, error, origin, msg))

    # -- jobs -------------------------------------------------------------------------------------

    def _start(self, peer: bytes, job: Job) -> None:
        self.current = _Current(peer, job, time.monotonic() + READY_TIMEOUT)
        self._sent = False
        self.sandbox.start()
        if self.sandbox.ready:
            self._dispatch()

    def _dispatch(self) -> None:
        cur = self.current
        assert cur is not None
        job, sandbox = cur.job, self.sandbox
        try:
            if isinstance(job, RegisterJob):
                sandbox.send_load(job.pid, job.name, job.data)
            else:
                msg = job.msg
                owner = self.service.owners.owner(job.origin.client)
                found = (self.service.store.find(owner, key) for key in msg.outputs)
                sandbox.protect({id(e.array) for e in found if e is not None})
                if not sandbox.running:  # it ended while copying: a fresh one runs the job once Ready
                    sandbox.start()
                    cur.deadline = time.monotonic() + READY_TIMEOUT
                    return
                sandbox.send_run(
                    msg.plan,
                    job.plan.name,
                    job.plan.data,
                    job.args,
                    job.entries,
                    outputs=len(job.plan.ports.outputs),
                    fetch=msg.fetch,
                    inline_max=msg.inline_max,
                )
        except OSError:  # the runner died before reading: its closed pipe says how
            pass
        except ProtocolError as e:  # an argument was lost with an earlier runner: nothing was sent
            self._finish(e)
            return
        self._sent = True
        cur.deadline = time.monotonic() + sandbox.timeout

    def _from_runner(self) -> None:
        sandbox = self.sandbox
        try:
            msg, buffers = sandbox.receive()
        except pipe.PipeClosed:
            was_ready = sandbox.ready
            code, words = sandbox.died()
            if self.current is not None:
                self._finish(self._death(code, words, was_ready))
            else:
                log.warning("the sandboxed runner ended while idle: %s", words)
            return
        if isinstance(msg, pipe.Ready):
            sandbox.ready = True
            sandbox.memory_limit = msg.memory_limit
            log.info("runner %d ready (data memory limit %s)", msg.pid, _mib(msg.memory_limit))
            if self.current is not None and not self._sent:
                self._dispatch()
            return
        cur = self.current
        if cur is None:
            log.error("unexpected message from the runner: %s", type(msg).__name__)
            return
        job = cur.job
        outcome: Ports | list | ProtocolError
        try:
            if isinstance(msg, pipe.Failed):
                if isinstance(job, RunJob):
                    sandbox.loaded.discard(job.msg.plan)
                outcome = self._failed(job, msg)
            elif isinstance(msg, pipe.Loaded) and isinstance(job, RegisterJob):
                sandbox.loaded.add(job.pid)
                outcome = Ports(job.name, msg.inputs, msg.outputs, placement=msg.placement)
            elif isinstance(msg, pipe.Ran) and isinstance(job, RunJob):
                outcome = sandbox.outputs(msg, buffers)
            else:
                outcome = ProtocolError(
                    "internal", f"the runner answered {type(msg).__name__} to a {type(job).__name__}"
                )
        except Exception as e:  # e.g. an output segment that cannot be mapped
            outcome = e if isinstance(e, ProtocolError) else ProtocolError("internal", f"runner's answer: {e}")
        self._finish(outcome)

    def _finish(self, outcome: Ports | list | ProtocolError, then: list | None = None) -> None:
        """Answer the current job (and send ``then``, a reply to the same peer), then start what waits."""
        cur = self.current
        assert cur is not None
        self.current = None
        self._sent = False
        self.server.send(cur.peer, self.service.complete(cur.job, outcome))
        if then is not None:
            self.server.send(cur.peer, then)
        self._advance()

    def _overdue(self) -> None:
        cur = self.current
        assert cur is not None
        if not self._sent:
            self.sandbox.stop("did not start in time")
            self._finish(ProtocolError("internal", f"the sandboxed runner did not start within {READY_TIMEOUT:.0f} s"))
            return
        self.sandbox.stop("timeout")
        what = _what(cur.job)
        log.warning("%s ran past --run-timeout %g s: runner stopped", what, self.sandbox.timeout)
        words = f"ran past the worker's --run-timeout of {self.sandbox.timeout:g} s and was stopped"
        self._finish(ProtocolError("plan_timeout", f"{what} {words}; {_after(cur.job)}"))

    def _lost(self, lost: list[Resident], why: str) -> None:
        """The runner ended holding tensors that had no host copy yet: their keys fail with ``why``."""
        ids = {id(r) for r in lost}
        store, n = self.service.store, 0
        for client in store.clients():
            for key, entry in list(store.space(client).items()):
                if id(entry.array) in ids:
                    store.fail(client, key, f"tensor {key!r} was lost: {why}")
                    n += 1
        if n:
            log.warning("%d stored tensors lost with the runner (no host copy yet): %s", n, why)

    # -- error wording ----------------------------------------------------------------------------

    def _failed(self, job: Job, failed: pipe.Failed) -> ProtocolError:
        wid = self.service.id
        name = job.name if isinstance(job, RegisterJob) else job.plan.name
        if failed.code == "out_of_memory":
            bound = f"--max-run-memory-mb {self.sandbox.memory_mb}" if self.sandbox.memory_mb else "memory"
            doing = "loading" if isinstance(job, RegisterJob) else "running"
            return ProtocolError(
                "out_of_memory",
                f"plan {name!r} ran out of memory {doing} on worker {wid!r} ({bound}): {failed.message}",
            )
        if failed.code == "run_failed":
            return ProtocolError("run_failed", f"plan {name!r} failed on worker {wid!r}: {failed.message}")
        code = failed.code if failed.code in m.ErrorCode.__args__ else "internal"  # type: ignore[attr-defined]
        return ProtocolError(code, failed.message)

    def _death(self, code: str, words: str, was_ready: bool) -> ProtocolError:
        cur = self.current
        assert cur is not None
        what = _what(cur.job)
        if not was_ready:
            return ProtocolError("internal", f"the sandboxed runner failed to start ({words}): see the worker's log")
        log.warning("%s: %s; runner restarted", what, words)
        return ProtocolError(code or "plan_crashed", f"{what}: {words}; {_after(cur.job)}")


def _what(job: Job) -> str:
    if isinstance(job, RegisterJob):
        return f"plan {job.name!r} (registering)"
    return f"plan {job.plan.name!r} (run #{job.msg.id})"


def _after(job: Job) -> str:
    if isinstance(job, RegisterJob):
        return "it was not registered; the worker kept every stored tensor and plan"
    return "the worker kept every stored tensor and plan"


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n else "none"
