"""The window: the jobs in flight to the sandboxed runner, and what waits behind them (a mixin of
:class:`~planwire.worker.supervisor.Supervisor`, whose loop reads the socket and calls in here).

Runs are pipelined to the runner: up to ``WINDOW`` are in flight at once (the runner answers each in turn,
the supervisor reads every answer there is in one wake-up), so a client's burst of tiny calls does not pay
a round trip to the runner per call. A run joins the window only when nothing it reads or writes is an
output of a run in flight (a ``p(p(x))`` on a dynamic shape waits for the first run: its argument's shape is
known, and checked, only then), when it reads no private data, and when every run ahead of it sends its
outputs' host copies back (``save``), so that a crash behind them loses none. The exception: a run chained
behind the head (worker/chain.py: the next training step, reading outputs of declared shapes; those it
overwrites need no host copy). Anything else (a registration, a put, a get, ...) waits until the window is
empty: a barrier.

A runner that crashes, exhausts its memory, runs past ``--run-timeout`` or is cancelled costs the run it
was executing only (the head of the window): its caller gets ``plan_crashed``, ``out_of_memory``,
``plan_timeout`` or ``cancelled`` naming the plan, the run's outputs are marked failed with that reason,
and the runs behind it go to a fresh runner, which re-creates sessions from the kept bytes. A run's
timeout clock starts when it is sent or when the run ahead of it answered, whichever is later.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections import deque
from dataclasses import dataclass, field

from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.server import Server
from planwire.worker import pipe, wording
from planwire.worker.cancels import Cancels
from planwire.worker.chain import Chain, Chains, covers, reads
from planwire.worker.jobs import Job, RegisterJob, RunJob
from planwire.worker.resident import Resident
from planwire.worker.runtime import Signature
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service

log = logging.getLogger("planwire.worker")

WINDOW = 32  # runs in flight to the runner at most
READY_TIMEOUT = 120.0  # seconds a runner may take to start (imports on a loaded host)
CANCEL_GRACE = 0.5  # seconds a cancelled run that reached the runner may take before the runner is stopped
_array = operator.attrgetter("array")  # of an Entry


@dataclass
class Queued:
    """A request waiting behind the running job (``msg`` None: one refused as it was read, whose reply frames
    are ``buffers``: it waits too, so a connection's replies keep the order of its requests). ``job``: its
    run, validated already (the direct lane declined it)."""

    peer: bytes
    client: bytes
    frames: list
    msg: m._Message | None
    buffers: list
    job: Job | None = None
    chain: dict | None = None  # what it reads of the head's outputs, when it joins chained behind it (_joins)


@dataclass
class Slot:
    """A place in the window: a job, or (``job`` None) a reply that waits for the replies ahead of it."""

    peer: bytes
    job: Job | None
    reply: list | None = None
    sent: bool = False  # gone to the runner
    save: bool = False  # sent asking for its outputs' host copies
    deadline: float = 0.0  # monotonic, once it is the head: sent + timeout, or the runner's start deadline
    cancelled: bool = False  # answered already (cancelled once sent): its answer is thrown away
    out: list[int] = field(default_factory=list)  # the handles its outputs are held under (once sent)
    chain: Chain | None = None  # a run chained behind the one ahead of it, until its inputs are settled
    again: list[tuple[str, str]] = field(default_factory=list)  # a reply's (key, why) to fail again when sent
    owner: bytes = b""  # (whose keys those are)


class Window(Chains, Cancels):
    """The window's half of the supervisor: admission, dispatch to the runner, answers, restarts, deadlines."""

    service: Service
    server: Server
    sandbox: Sandbox
    queue: deque[Queued]
    window: deque[Slot]

    def _advance(self) -> None:  # the supervisor's: move what may go from the queue into the window
        raise NotImplementedError

    def _send_held(self) -> None:
        with contextlib.suppress(OSError):  # the runner died before reading: its closed pipe says how
            self.sandbox.flush()

    def _joins(self, q: Queued) -> bool:
        """Whether queued ``q`` may be executed while the window holds jobs (the module's docstring says when;
        ``q.chain`` set when it joins chained behind the head). One pass over the window."""
        msg = q.msg
        if msg is None:
            return True
        q.chain = None
        if type(msg) is not m.Run or len(self.window) >= WINDOW:
            return False
        service = self.service
        owners, store = service.owners, service.store
        me = owners.owner(q.client)
        keys = reads(msg)
        keys.update(msg.outputs)
        head = None  # the head, when q reads or writes its outputs
        for s in self.window:
            job = s.job
            if job is None:  # a reply waiting its turn: a refused chained run's fails its outputs again then
                if s.again and s.owner == me and not keys.isdisjoint(k for k, _ in s.again):
                    return False
                continue
            if not s.cancelled and (type(job) is RegisterJob or not s.save and not self._covered(me, msg, job)):
                return False
            if type(job) is RunJob and not keys.isdisjoint(job.msg.outputs) and owners.owner(job.origin.client) == me:
                if s is not self.window[0] or q.job is not None:
                    return False
                head = s
        if self.sandbox.unsaved and not self._spared(me, msg):
            return False  # a tensor only the runner holds, which a run behind must not risk
        if any(e is not None and e.private for e in store.found(me, keys)):
            return False
        if head is None:
            return True
        q.chain = self._chainable(me, msg, head)
        return q.chain is not None

    def _lets_join(self, job: RunJob, q: Queued) -> bool:
        """Whether ``job``'s ``save`` may let queued ``q`` join behind it. Not when ``q`` is the same owner's run
        that reads or writes an output of ``job`` and overwrites each one not fetched: a training step's next
        step, which joins without it (worker/chain.py) or waits. That state stays in the runner, as for
        synchronous steps (``protect``)."""
        msg = q.msg
        if type(msg) is not m.Run:
            return False
        mine, overwritten = job.msg, set(msg.outputs)
        if not covers(overwritten, mine):
            return True
        owner = self.service.owners.owner
        if owner(q.client) != owner(job.origin.client):
            return True  # another owner's keys: it may join
        return overwritten.union(reads(msg)).isdisjoint(mine.outputs)

    def _window_outputs(self) -> set[tuple[bytes, str]]:
        """(owner, key) of every output of a run in the window: keys are compared per owner, so that another
        client's run never delays (nor, by the delay, reveals) a request on a key of the same name."""
        owner = self.service.owners.owner
        keys = {
            (owner(s.job.origin.client), k) for s in self.window if isinstance(s.job, RunJob) for k in s.job.msg.outputs
        }
        keys.update((s.owner, k) for s in self.window if s.again for k, _ in s.again)
        return keys

    def _head(self) -> Slot | None:
        """The oldest job in the window (replies ahead of it are sent as soon as they are at the front)."""
        return self.window[0] if self.window else None

    # -- jobs -------------------------------------------------------------------------------------

    def _start_chained(self, q: Queued) -> None:
        """Validate queued run ``q`` (``_joins`` chained it behind the head) against the head's outputs as
        declared, and start it; refused, its reply waits its turn and fails its outputs again then."""
        head, msg = self.window[0], q.msg
        assert type(msg) is m.Run and q.chain is not None
        me = self.service.owners.owner(q.client)
        ahead = self._ahead(q.chain)
        job = self.service.begin(msg, q.buffers, q.frames, q.client, ahead=ahead)
        if not isinstance(job, RunJob):
            self.window.append(Slot(q.peer, None, job, again=self._refused(me, msg, head), owner=me))  # type: ignore[arg-type]
            return
        links = [(key, ahead[key].array, j) for key, (j, _) in q.chain.items()]
        self._start(q.peer, job, Chain(head, links) if links else None)  # type: ignore[misc]

    def _start(self, peer: bytes, job: Job, chain: Chain | None = None) -> None:
        slot = Slot(peer, job, chain=chain)
        first = not self.window
        self.window.append(slot)
        if first:
            slot.deadline = time.monotonic() + READY_TIMEOUT
            self.sandbox.start()
        if self.sandbox.ready:
            self._dispatch(slot)

    def _dispatch(self, slot: Slot) -> None:
        """Send ``slot``'s job to the runner (it is ready; every slot ahead of it was sent)."""
        job, sandbox = slot.job, self.sandbox
        head = slot is self.window[0]
        try:
            if isinstance(job, RegisterJob):
                sandbox.send_load(job.pid, job.name, job.data)
            else:
                assert isinstance(job, RunJob)
                msg = job.msg
                if slot.chain is not None and not self._link(slot.chain, job):
                    slot.chain = None  # its producer was answered: it reads the stored values
                if head:  # host copies of what only the runner holds, before a run that may crash it
                    owner = self.service.owners.owner(job.origin.client)
                    found = filter(None, self.service.store.found(owner, msg.outputs))  # (an Entry is true)
                    sandbox.protect(set(map(id, map(_array, found))))
                    if not sandbox.running:  # it ended while copying: a fresh one runs the job once Ready
                        self._restart()
                        return
                # when runs follow it into the window, it sends its outputs' host copies back
                behind = self.window[-1] is not slot
                slot.save = behind or bool(self.queue) and self._lets_join(job, self.queue[0])
                slot.out = sandbox.send_run(
                    msg.plan,
                    job.plan.name,
                    job.plan.data,
                    job.args,
                    job.entries,
                    outputs=len(job.plan.ports.outputs),
                    fetch=msg.fetch,
                    inline_max=msg.inline_max,
                    save=slot.save,
                )
        except OSError:  # the runner died before reading: its closed pipe says how
            pass
        except ProtocolError as e:  # an argument was lost with an earlier runner: nothing was sent
            slot.job, slot.reply = None, self.service.complete(job, e)  # type: ignore[arg-type]
            self._flush()
            return
        slot.sent = True
        if head:
            slot.deadline = time.monotonic() + sandbox.timeout

    def _restart(self) -> None:
        """The runner is gone: the jobs left in the window go, in order, to a fresh one once it is Ready."""
        for slot in [s for s in self.window if s.cancelled]:  # answered already: not run again
            self.window.remove(slot)
        for slot in self.window:
            slot.sent = False
        while self.window and self.window[0].job is None:
            self._send_reply(self.window.popleft())
        head = self._head()
        if head is not None:
            self.sandbox.start()
            head.deadline = time.monotonic() + READY_TIMEOUT

    def _from_runner(self) -> None:
        """The messages the runner has sent so far: at most one per request in flight (and a Ready), so that a
        runner that keeps talking cannot keep the loop from requests and deadlines."""
        sandbox = self.sandbox
        for _ in range(len(sandbox.inflight) + 1):
            self._one_from_runner()
            if not sandbox.running or not sandbox.wait(0):
                return

    def _one_from_runner(self) -> None:
        sandbox = self.sandbox
        try:
            msg, buffers = sandbox.receive()
        except pipe.PipeClosed:
            was_ready = sandbox.ready
            code, words = sandbox.died()
            head = self._head()
            if head is None:
                log.warning("the sandboxed runner ended while idle: %s", words)
            elif head.cancelled:  # stopped (or died) while executing a run already answered as cancelled
                self.window.popleft()
                self._flush()
            elif head.sent or not was_ready:
                self._finish(wording.death(head.job, code, words, was_ready))
            self._restart()
            return
        if isinstance(msg, pipe.Ready):
            if sandbox.ready:  # a runner says Ready once: one that says it again is not to be trusted
                sandbox.kill("the runner said it was ready twice")
                return
            sandbox.ready = True
            sandbox.memory_limit = msg.memory_limit
            log.info("runner %d ready (data memory limit %s)", msg.pid, wording.mib(msg.memory_limit))
            sandbox.hold()
            try:
                for slot in list(self.window):
                    if slot.job is not None and not slot.sent and slot in self.window:
                        self._dispatch(slot)
                        if not sandbox.running or not sandbox.ready:  # it ended (a fresh one starts)
                            break
            finally:
                self._send_held()
            return
        head = self._head()
        if head is None or not head.sent:
            log.error("unexpected message from the runner: %s", type(msg).__name__)
            return
        job = head.job
        assert job is not None
        outcome: Signature | list | ProtocolError
        try:
            if isinstance(msg, pipe.Failed):
                if isinstance(job, RunJob):
                    sandbox.loaded.discard(job.msg.plan)
                outcome = wording.failed(job, msg, self.service.id, self.sandbox.memory_mb)
            elif isinstance(msg, pipe.Loaded) and isinstance(job, RegisterJob):
                sandbox.loaded.add(job.pid)
                outcome = Signature(job.name, msg.inputs, msg.outputs, placement=msg.placement, nchwc=msg.nchwc)
            elif isinstance(msg, pipe.Ran) and isinstance(job, RunJob):
                outcome = sandbox.outputs(msg, buffers)
            else:
                outcome = ProtocolError(
                    "internal", f"the runner answered {type(msg).__name__} to a {type(job).__name__}"
                )
        except Exception as e:  # e.g. an output segment that cannot be mapped
            outcome = e if isinstance(e, ProtocolError) else ProtocolError("internal", f"runner's answer: {e}")
        if head.chain is not None and not head.cancelled:  # what it read is checked against what was stored
            outcome = self._settled(head.chain, job, outcome)  # type: ignore[arg-type,assignment]
            head.chain = None
        del job  # (see _finish)
        if head.cancelled:  # answered already; what it computed is dropped (its handles freed)
            self.window.popleft()
            self._flush()
        else:
            self._finish(outcome)

    def _finish(self, outcome: Signature | list | ProtocolError, then: list | None = None) -> None:
        """Answer the head job (and send ``then``, a reply to the same peer), then what waits behind it."""
        head = self.window.popleft()
        job, head.job = head.job, None
        assert job is not None
        self.server.send(head.peer, self.service.complete(job, outcome))
        self._witness(head)  # the runs chained behind it read what it left now (worker/chain.py)
        del job, outcome  # its arguments (a step's old state) go before the next is sent: protect must not copy them
        if then is not None:
            self.server.send(head.peer, then)
        self._flush()

    def _send_reply(self, slot: Slot) -> None:
        """Send the reply of ``slot`` (now at the front); a refused chained run's outputs fail again now."""
        for key, why in slot.again:
            self.service.store.fail(slot.owner, key, why)
        self.server.send(slot.peer, slot.reply)

    def _flush(self) -> None:
        """Send the replies now at the front of the window; the next job's clock starts now."""
        window = self.window
        while window and window[0].job is None:
            self._send_reply(window.popleft())
        if window:
            head = window[0]
            now = time.monotonic()
            if head.sent:
                head.deadline = now + (CANCEL_GRACE if head.cancelled else self.sandbox.timeout)
            elif not self.sandbox.running:
                self._restart()
            elif head.deadline < now:
                head.deadline = now + READY_TIMEOUT
        else:
            self._advance()

    def _overdue(self, head: Slot) -> None:
        if head.job is None:
            return
        if head.cancelled:  # a cancelled run the runner is still executing
            self.sandbox.stop("cancelled")
            self.window.popleft()
            self._restart()
            self._flush()
            return
        if not head.sent:
            self.sandbox.stop("did not start in time")
            self._finish(ProtocolError("internal", f"the sandboxed runner did not start within {READY_TIMEOUT:.0f} s"))
            return
        self.sandbox.stop("timeout")
        what = wording.what(head.job)
        log.warning("%s ran past --run-timeout %g s: runner stopped", what, self.sandbox.timeout)
        words = f"ran past the worker's --run-timeout of {self.sandbox.timeout:g} s and was stopped"
        self._finish(ProtocolError("plan_timeout", f"{what} {words}; {wording.after(head.job)}"))
        self._restart()

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
