"""Sandbox: the supervisor's handle on its runner process (worker/runner.py) and the requests in flight to it.

Starts the runner, sends it loads and runs (tensors over ``INLINE_MAX`` by shared-memory segment, so a
stored tensor crosses at most once, on its first use), reads its answers, kills it on timeout or cancel,
and says in words why it died. Several runs may be in flight (``inflight``, in order; the runner answers each
in turn); loads and host copies go alone. The runner starts again lazily, when the next request needs it; its
sessions are re-created from the plan bytes the supervisor keeps (``loaded`` says which it has).

The runner keeps the tensors it was sent and the results it computed on its device, by handle
(worker/resident.py, worker/devstore.py): a run sends a held tensor as its handle, results come back as
Residents, and handles the Store dropped are freed with the next request. ``fetch``, ``protect`` and
``sync`` make host copies; ``copies`` counts what crossed.

The parts, one job each, tied together here: worker/runnerproc.py (the process: start, kill, reap, why it
ended), worker/runnerlink.py (the pipe: requests written without blocking, in flight in order, answers read
back), worker/handles.py (the tensors it holds, by handle: host copies, what to free, what crossed).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.worker import pipe
from planwire.worker.device import Device
from planwire.worker.handles import Handles, Unsaved
from planwire.worker.resident import Resident
from planwire.worker.runnerlink import RunnerLink, Sent, Untrusted
from planwire.worker.runnerproc import RunnerProcess
from planwire.worker.store import Entry

log = logging.getLogger("planwire.worker")

# A tensor the runner computed gets its host copy (so that it survives the runner) once it has been kept
# this long while the worker is idle: a training loop's state, replaced every step, never crosses to the
# host; what a client leaves on the worker does, within about this long.
SYNC_AFTER = 1.0
# Seconds a runner may take to copy tensors to the host: the whole of a fetch, request written and answer
# read (the request goes without blocking, like every other: worker/runnerlink.py), is bounded by it.
FETCH_TIMEOUT = 60.0


class Sandbox:
    """One runner process at a time, with its bounds: ``memory_mb`` (RLIMIT_DATA over its start-up use)
    and ``timeout`` (seconds per load or run, enforced by the caller through ``deadline``)."""

    def __init__(
        self,
        *,
        device: Device | None = None,
        threads: int,
        nchwc: bool = True,
        memory_mb: int,
        timeout: float,
        providers: Sequence[str] = (),
        sync_after: float = SYNC_AFTER,
    ) -> None:
        self.device = (
            device if device is not None else Device("cuda" if "CUDAExecutionProvider" in providers else "cpu")
        )
        self.providers = self.device.providers
        self.threads = threads
        self.sync_after = sync_after  # seconds; 0: never (host copies only when read, or before a later run)
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.dir = pipe.shm_dir()
        self.loaded: set[str] = set()  # plans whose sessions the current runner holds
        self._drop: set[str] = set()  # of those, plans unregistered: dropped with the next request
        self.ready = False
        self.memory_limit = 0
        self.process = RunnerProcess(
            directory=self.dir, device=self.device, threads=threads, nchwc=nchwc, memory_mb=memory_mb
        )
        self.link = RunnerLink()
        self.handles = Handles(self.fetch, self.dir)  # the tensors the runner holds (worker/resident.py)
        self.on_lost: Callable[[list[Resident], str], None] | None = None  # the supervisor fails their keys

    # -- what it holds ------------------------------------------------------------------------------

    @property
    def inflight(self) -> deque[Sent]:
        """Requests sent and not answered yet, in order."""
        return self.link.inflight

    @property
    def unsaved(self) -> Unsaved:
        """Tensors only the runner holds (no host copy yet), by handle."""
        return self.handles.unsaved

    def copies(self) -> dict[str, int]:
        """What crossed between host and runner so far, and the tensors it holds now (any thread)."""
        return self.handles.copies()

    # -- life ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self) -> None:
        """Start a runner unless one runs; it reports Ready once its bounds are in place."""
        if self.process.running:
            return
        self.link.open(self.process.start())
        self.ready = False
        self.loaded = set()
        self.handles.new_generation()

    def kill(self, why: str) -> None:
        """Kill the runner now (timeout, cancel, shutdown); ``why`` is what ``died`` will say."""
        self.process.kill(why)

    def stop(self, why: str) -> None:
        """Kill the runner and reap it now (timeout, cancel): the next job starts a fresh one."""
        if self.process.running:
            self.kill(why)
            self.died()

    def died(self) -> tuple[str, str]:
        """(code, words) for the runner that just closed its pipe; reaps it and forgets it."""
        code, words = self.process.reap()
        self._reset()
        self._lose(words)
        return code, words

    def _lose(self, words: str) -> None:
        """The runner ended: its tensors with a host copy are uploaded again when used; the others are lost."""
        why = (
            f"it was held only by the worker's sandboxed runner ({self.device}), which ended before a host copy "
            f"was made ({words}); run the plan that made it again"
        )
        lost = self.handles.lose(why)
        if lost and self.on_lost is not None:
            self.on_lost(lost, why)

    def _reset(self) -> None:
        self.link.close()
        self.ready, self.loaded, self._drop = False, set(), set()

    def close(self) -> None:
        if self.process.running:
            self.process.end("the worker is shutting down")
            self._reset()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------------------------

    def forget(self, pid: str) -> None:
        """Plan ``pid`` was unregistered: the runner drops its session with the next request (nothing is
        sent now)."""
        self.link.forget(pid)
        if pid in self.loaded:
            self.loaded.discard(pid)
            self._drop.add(pid)

    def _dropped(self, pid: str) -> list[str]:
        drop, self._drop = self._drop, set()
        drop.discard(pid)  # this request loads it again
        return sorted(drop)

    def send_load(self, pid: str, name: str, data: bytes) -> None:
        load = pipe.Load(plan=pid, name=name, drop=self._dropped(pid), free=self.handles.take_free())
        self.link.request(Sent("load"), load, [data])

    def send_run(
        self,
        pid: str,
        name: str,
        data: bytes,
        args: Sequence[np.ndarray | Resident],
        entries: Sequence[Entry | None],
        *,
        outputs: int = 0,
        fetch: Sequence[int] = (),
        inline_max: int = 0,
        save: bool = False,
    ) -> list[int]:
        """Send a run; returns the handles its outputs will be held under. An argument the runner holds goes
        by handle; any other crosses (a large one through shared memory) and, when it is a stored tensor
        (``entries[i]``), the runner holds it from then on (the entry's array becomes a Resident with that host
        copy). The ``outputs`` stay in the runner, under those handles; those in ``fetch`` and those of at most
        ``inline_max`` bytes come back too (all, with ``save``: their host copies, so that a run sent behind this
        one cannot lose them). ProtocolError (nothing sent) when an argument was lost with an earlier runner."""
        load = pid not in self.loaded
        buffers: list = [data] if load else []
        refs, keep = self.handles.arguments(args, entries, buffers)
        out = self.handles.new_handles(outputs)
        run = pipe.Run(
            plan=pid,
            name=name,
            args=refs,
            load=load,
            drop=self._dropped(pid),
            free=self.handles.take_free(),
            out=out,
            fetch=list(fetch),
            inline_max=inline_max,
            save=save,
        )
        counts, link = self.handles.counts, self.link
        counts["in_flight_max"] = max(counts["in_flight_max"], len(link.inflight) + 1)
        link.request(Sent("run", out, keep), run, buffers, plan=pid)
        if load:
            self.loaded.add(pid)
        return out

    def hold(self) -> None:
        """Keep the loads and runs sent from now on until ``flush``: the runner wakes once for all of them."""
        self.link.hold()

    def flush(self) -> None:
        """Send what ``hold`` kept; OSError when the runner is gone (its closed pipe says how)."""
        self.link.flush()

    def wait(self, seconds: float, also: int | None = None) -> bool:
        """Whether the runner has something to say (an answer, or its closed pipe) within ``seconds``; with
        ``also``, False as soon as that file descriptor is readable (the socket: a request came)."""
        return self.link.wait(seconds, also)

    def receive(self) -> tuple[pipe.FromRunner, list[memoryview]]:
        """The runner's next message; PipeClosed when it died (then call ``died``). An answer is to the oldest
        request in flight, whose outputs' handles are freed when it failed."""
        try:
            msg, buffers = self.link.receive()
        except Untrusted as e:  # the runner is not to be trusted any more
            self.kill(e.why)
            raise pipe.PipeClosed(str(e)) from None
        if isinstance(msg, pipe.Failed):
            sent = self.link.answered
            if sent is not None and sent.out:  # outputs it may have held before failing
                self.handles.free_later(sent.out)
                sent.out = []
        return msg, buffers

    def outputs(self, ran: pipe.Ran, buffers: list[memoryview]) -> list[Resident]:
        """The outputs of a Ran message as Residents (with a host copy where the runner sent the data,
        checked: dtype × shape against the bytes there)."""
        sent, self.link.answered = self.link.answered, None
        return self.handles.outputs(sent.out if sent is not None else [], ran, buffers)

    # -- host copies --------------------------------------------------------------------------------

    def fetch(self, residents: list[Resident]) -> None:
        """Give each Resident its host copy now (a client reads it), waiting for the runner at most
        FETCH_TIMEOUT; ProtocolError when one was lost, or the runner is busy or ends meanwhile (then its
        unsaved tensors are lost)."""
        todo = [r for r in residents if r.host is None]
        if not todo:
            return
        for r in todo:
            if r.lost or r.gen != self.handles.gen:
                raise ProtocolError("run_failed", f"tensor lost: {r.lost or 'not held by the runner'}")
        link = self.link
        if link.inflight or link.sock is None:
            raise ProtocolError("internal", "the runner is busy: a tensor on the device cannot be read now; retry")
        unique = list({r.handle: r for r in todo}.values())
        rebind = not self.device.cuda  # a CPU runner then holds it by the shared copy: its own memory goes
        request = pipe.Fetch(handles=[r.handle for r in unique], rebind=rebind, free=self.handles.take_free())
        try:
            link.request(Sent("fetch"), request, [], now=True)  # not held back by a ``hold``: answered here
            if not link.wait(FETCH_TIMEOUT):
                self.kill(f"it did not copy tensors to the host within {FETCH_TIMEOUT:g} s")
            msg, buffers = self.receive()
        except (pipe.PipeClosed, OSError):
            _, words = self.died()
            raise ProtocolError("run_failed", f"tensor lost: the runner ended while copying it ({words})") from None
        if isinstance(msg, pipe.Failed) or not isinstance(msg, pipe.Fetched) or len(msg.tensors) != len(unique):
            detail = msg.message if isinstance(msg, pipe.Failed) else type(msg).__name__
            raise ProtocolError("internal", f"the runner could not copy tensors to the host: {detail}")
        for r, ref in zip(unique, msg.tensors, strict=True):
            self.handles.copied(r, self.handles.data(ref, buffers, f"tensor #{r.handle}"))

    def protect(self, spare: set[int]) -> int:
        """Before a run: a host copy of every tensor the runner computed that has none, but those in ``spare``
        (ids of Residents stored only under the run's output keys: a failed run fails those keys anyway).
        So a run that crashes, times out or is cancelled loses nothing else (the containment promise); a
        training loop, whose step overwrites its state, copies nothing. Returns how many were copied."""
        unsaved = self.handles.unsaved
        if self.link.inflight or not self.ready or not unsaved:
            return 0
        return self._save([r for r in unsaved.values() if r.host is None and id(r) not in spare])

    def sync(self, now: float | None = None) -> int:
        """The lazy host copy: tensors the runner computed and that have been kept ``sync_after`` seconds get
        one (call while idle), so that they survive the runner even if it dies idle. Returns how many."""
        unsaved = self.handles.unsaved
        if self.link.inflight or not self.ready or not unsaved or self.sync_after <= 0:
            return 0
        now = time.monotonic() if now is None else now
        return self._save([r for r in unsaved.born_by(now - self.sync_after) if r.host is None])

    def _save(self, due: list[Resident]) -> int:
        if not due:
            return 0
        try:
            self.fetch(due)
        except ProtocolError as e:
            log.warning("host copy of %d tensors failed: %s", len(due), e.message)
            return 0
        return len(due)
