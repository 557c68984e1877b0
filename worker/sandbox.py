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
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from planwire.transport import codec, dtypes
from planwire.transport.errors import ProtocolError
from planwire.worker import pipe
from planwire.worker.device import Device
from planwire.worker.resident import Resident
from planwire.worker.store import Entry

log = logging.getLogger("planwire.worker")

# Before sleeping on the runner's pipe, the supervisor watches it for a while after sending a run alone
# (a tiny call): not sleeping saves a wake-up per call. For how long: twice the time the runner's recent
# answers to that plan took (a moving average), at most SPIN_MAX; and only while spinning pays (pipe.Spin:
# most spins catch the answer, and the supervisor gets the CPU it spins on, i.e. the host has a core to
# spare). Cost: at most SPIN_MAX of one core per call, only while calls come one at a time and answer
# within it.
SPIN_MAX = 300e-6
# A tensor the runner computed gets its host copy (so that it survives the runner) once it has been kept
# this long while the worker is idle: a training loop's state, replaced every step, never crosses to the
# host; what a client leaves on the worker does, within about this long.
SYNC_AFTER = 1.0
FETCH_TIMEOUT = 60.0  # seconds a runner may take to copy tensors to the host
CRASH_SIGNALS = {signal.SIGFPE, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP}


@dataclass
class Sent:
    """A request in flight to the runner: what it was, the handles its outputs will be held under, and the
    shared copies of its arguments (alive, files too, until it is answered)."""

    kind: str  # "load", "run" or "fetch"
    out: list[int] = field(default_factory=list)
    keep: list[np.ndarray] = field(default_factory=list)


class Sandbox:
    """One runner process at a time, with its bounds: ``memory_mb`` (RLIMIT_DATA over its start-up use)
    and ``timeout`` (seconds per load or run, enforced by the caller through ``deadline``)."""

    def __init__(
        self,
        *,
        device: Device | None = None,
        threads: int,
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
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._reader: pipe.Reader | None = None
        self.inflight: deque[Sent] = deque()  # requests sent and not answered yet, in order
        self._answered: Sent | None = None  # the request the last answer received was for
        self._batch: list | None = None  # packed requests held back by ``hold`` until ``flush``
        # Bytes of requests not yet taken by the pipe: the supervisor never blocks writing to the runner,
        # which may itself be blocked writing answers the supervisor has to read (a deadlock otherwise).
        self._out: deque[memoryview] = deque()
        self._writing = False  # the poll also watches for room in the pipe (POLLOUT)
        self._sent_at = 0.0  # perf_counter when the request in flight alone was sent (0: none such)
        self._sent_plan = ""
        self._answer_s: dict[str, float] = {}  # plan: moving average of the runner's answer time to it alone
        self._spin = pipe.Spin()
        self._killed = ""  # why we killed the runner, if we did
        self.started_at = 0.0
        # Tensors the runner holds (worker/resident.py): handles of this runner generation, what to free.
        self.gen = 0
        self.residents: weakref.WeakValueDictionary[int, Resident] = weakref.WeakValueDictionary()
        self.unsaved: weakref.WeakValueDictionary[int, Resident] = weakref.WeakValueDictionary()  # no host copy
        self._handles = itertools.count(1)
        # handles to free with the next request: an array, not a list of ints kept across a burst (each
        # would pin the allocator arena it sits in: bench/load.py's RSS)
        self._free = array("q")
        self.on_lost: Callable[[list[Resident], str], None] | None = None  # the supervisor fails their keys
        self.counts = dict.fromkeys(
            (
                "uploads",
                "upload_bytes",
                "downloads",
                "download_bytes",
                "reused",
                "host_copies",
                "lost",
                "in_flight_max",
            ),
            0,
        )

    # -- life ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> None:
        """Start a runner unless one runs; it reports Ready once its bounds are in place."""
        if self._proc is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [
            sys.executable,
            "-m",
            "planwire.worker.runner",
            "--fd",
            str(theirs.fileno()),
            "--dir",
            self.dir,
            "--device",
            str(self.device),
            "--gpu-mem-limit",
            str(self.device.mem_limit_mb),
            "--threads",
            str(self.threads),
            "--memory-mb",
            str(self.memory_mb),
        ]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, cwd=os.getcwd())
        finally:
            theirs.close()
        self._sock = ours
        self._reader = pipe.replies(ours)
        self._poll = select.poll()
        self._poll.register(ours.fileno(), select.POLLIN)
        self.ready = False
        self.loaded = set()
        self.gen += 1
        self._killed = ""
        self.started_at = time.monotonic()

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def kill(self, why: str) -> None:
        """Kill the runner now (timeout, cancel, shutdown); ``why`` is what ``died`` will say."""
        if self._proc is not None and self._proc.poll() is None:
            self._killed = why
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def stop(self, why: str) -> None:
        """Kill the runner and reap it now (timeout, cancel): the next job starts a fresh one."""
        if self._proc is not None:
            self.kill(why)
            self.died()

    def died(self) -> tuple[str, str]:
        """(code, words) for the runner that just closed its pipe; reaps it and forgets it."""
        proc, killed = self._proc, self._killed
        assert proc is not None
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        self._reset()
        code, words = _why(rc, killed)
        self._lose(words)
        return code, words

    def _lose(self, words: str) -> None:
        """The runner ended: its tensors with a host copy are uploaded again when used; the others are lost."""
        held = list(self.residents.values())
        self.residents, self.unsaved = weakref.WeakValueDictionary(), weakref.WeakValueDictionary()
        self._free = array("q")
        lost = []
        why = (
            f"it was held only by the worker's sandboxed runner ({self.device}), which ended before a host copy "
            f"was made ({words}); run the plan that made it again"
        )
        for r in held:
            r.gen = -1
            if r.host is None:
                r.lost = why
                lost.append(r)
        self.counts["lost"] += len(lost)
        if lost and self.on_lost is not None:
            self.on_lost(lost, why)

    @property
    def _busy(self) -> bool:
        return bool(self.inflight)

    def _reset(self) -> None:
        self.inflight.clear()
        self._batch = None
        self._out.clear()
        self._writing = False
        self._sent_at = 0.0
        self._answered = None
        pid = self._proc.pid if self._proc is not None else 0
        if self._sock is not None:
            self._sock.close()
        self._proc, self._sock, self._poll, self.ready, self.loaded = None, None, None, False, set()
        self._reader = None
        self._drop = set()
        prefix = f"o{pid}-"
        with contextlib.suppress(OSError):  # outputs the dead runner wrote but never reported
            for name in os.listdir(self.dir):
                if name.startswith(prefix):
                    os.unlink(os.path.join(self.dir, name))

    def close(self) -> None:
        if self._proc is not None:
            self.kill("the worker is shutting down")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._reset()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------------------------

    def forget(self, pid: str) -> None:
        """Plan ``pid`` was unregistered: the runner drops its session with the next request (nothing is
        sent now)."""
        self._answer_s.pop(pid, None)
        if pid in self.loaded:
            self.loaded.discard(pid)
            self._drop.add(pid)

    def _dropped(self, pid: str) -> list[str]:
        drop, self._drop = self._drop, set()
        drop.discard(pid)  # this request loads it again
        return sorted(drop)

    def drop(self, resident: Resident) -> None:
        """A Resident is garbage: the runner frees its handle with the next request."""
        if resident.gen == self.gen and self._proc is not None:
            self._free.append(resident.handle)

    def _take_free(self) -> list[int]:
        free, self._free = self._free, array("q")
        return free.tolist()

    def send_load(self, pid: str, name: str, data: bytes) -> None:
        load = pipe.Load(plan=pid, name=name, drop=self._dropped(pid), free=self._take_free())
        self.inflight.append(Sent("load"))
        self._send(load, [data])

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
    ) -> None:
        """Send a run. An argument the runner holds goes by handle; any other crosses (a large one through
        shared memory) and, when it is a stored tensor (``entries[i]``), the runner holds it from then on
        (the entry's array becomes a Resident with that host copy). The ``outputs`` stay in the runner,
        under new handles; those in ``fetch`` and those of at most ``inline_max`` bytes come back too (all,
        with ``save``: their host copies, so that a run sent behind this one cannot lose them).
        ProtocolError (nothing sent) when an argument was lost with an earlier runner."""
        refs, buffers = [], []
        keep: list = []
        load = pid not in self.loaded
        if load:
            buffers.append(data)
        for i, (arr, entry) in enumerate(zip(args, entries, strict=True)):
            holder: Resident | None = None
            if isinstance(arr, Resident):
                if arr.gen == self.gen:
                    refs.append(pipe.TensorRef(dtypes.to_wire(arr.dtype), list(arr.shape), handle=arr.handle))
                    continue
                if arr.host is None:
                    raise ProtocolError("run_failed", f"argument {i} is gone: {arr.lost or 'not held by the runner'}")
                holder, arr = arr, arr.host
            elif entry is not None and entry.array is arr:  # a stored tensor's first use: held from now on
                holder = Resident(self, 0, -1, arr.dtype, arr.shape, host=arr)
                entry.array = holder
            wire, shape, buf = codec.to_frame(arr)
            loc = pipe.segment_of(arr) if buf.nbytes > pipe.INLINE_MAX else None
            if loc is None and buf.nbytes > pipe.INLINE_MAX:
                try:
                    shared = pipe.to_segment(self.dir, "i", arr, unlink=True)
                except OSError as e:  # shared memory full: this call copies through the pipe
                    log.warning("shared memory unavailable (%s): argument of %s bytes sent inline", e, buf.nbytes)
                else:
                    if holder is not None:
                        holder.host = shared  # the host copy is the shared one (on CPU the runner wraps it)
                    keep.append(shared)  # alive (its file too) until the runner has answered
                    loc = pipe.segment_of(shared)
            handle = 0
            if holder is not None:
                handle = next(self._handles)
                holder.handle, holder.gen = handle, self.gen
                self.residents[handle] = holder
            self.counts["uploads"] += 1
            self.counts["upload_bytes"] += buf.nbytes
            if loc is None:
                refs.append(pipe.TensorRef(wire, shape, index=len(buffers), handle=handle))
                buffers.append(buf)
            else:
                seg, offset = loc
                refs.append(
                    pipe.TensorRef(wire, shape, segment=os.path.basename(seg.path), offset=offset, handle=handle)
                )
        out = [next(self._handles) for _ in range(outputs)]
        run = pipe.Run(
            plan=pid,
            name=name,
            args=refs,
            load=load,
            drop=self._dropped(pid),
            free=self._take_free(),
            out=out,
            fetch=list(fetch),
            inline_max=inline_max,
            save=save,
        )
        self._sent_at = time.perf_counter() if not self.inflight else 0.0
        self._sent_plan = pid
        self.inflight.append(Sent("run", out, keep))
        self.counts["in_flight_max"] = max(self.counts["in_flight_max"], len(self.inflight))
        self._send(run, buffers)
        if load:
            self.loaded.add(pid)

    def _send(self, msg: pipe.ToRunner, buffers: list) -> None:
        if self._batch is None:
            self._write(pipe.pack(msg, buffers))  # type: ignore[arg-type]
        else:
            self._batch += pipe.pack(msg, buffers)

    def _write(self, parts: list) -> None:
        """Queue ``parts`` after what waits to be written and write what the pipe takes now, without blocking
        (the rest goes as the runner reads: ``wait`` watches for room). OSError when the runner is gone."""
        self._out.extend(v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes)
        self._push()

    def _push(self) -> None:
        out, sock = self._out, self._sock
        while out and sock is not None:
            try:
                sent = sock.sendmsg(list(itertools.islice(out, pipe.MAX_PARTS)), (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            while sent:
                n = out[0].nbytes
                if sent < n:
                    out[0] = out[0][sent:]
                    break
                out.popleft()
                sent -= n
        writing = bool(out)
        if writing != self._writing and self._poll is not None and sock is not None:
            self._poll.modify(sock.fileno(), select.POLLIN | select.POLLOUT if writing else select.POLLIN)
            self._writing = writing

    def hold(self) -> None:
        """Keep the loads and runs sent from now on until ``flush``: the runner wakes once for all of them."""
        if self._batch is None:
            self._batch = []

    def flush(self) -> None:
        """Send what ``hold`` kept; OSError when the runner is gone (its closed pipe says how)."""
        batch, self._batch = self._batch, None
        if batch and self._sock is not None:
            self._write(batch)

    def wait(self, seconds: float) -> bool:
        """Whether the runner has something to say (an answer, or its closed pipe) within ``seconds``."""
        if self._poll is None:
            return False
        if self._reader is not None and self._reader.pending():
            return True
        poll = self._poll.poll
        if seconds and self._sent_at and len(self.inflight) == 1 and not self._out:
            spin = self._answer_s.get(self._sent_plan, SPIN_MAX) * 2
            if spin <= SPIN_MAX and self._spin.allowed() and self._spin.until(lambda: poll(0), self._sent_at + spin):
                return True
        end = time.monotonic() + seconds
        while True:
            events = poll(max(0, int((end - time.monotonic()) * 1e3)))
            if any(ev & ~select.POLLOUT for _, ev in events):
                return True  # an answer, or the pipe closed
            if not events:
                return False
            try:  # room in the pipe: more of the requests waiting to be written
                self._push()
            except OSError:
                return True  # the runner is gone: its closed pipe says how

    def receive(self) -> tuple[pipe.FromRunner, list[memoryview]]:
        """The runner's next message; PipeClosed when it died (then call ``died``). An answer is to the oldest
        request in flight (``answered``), whose outputs' handles are freed when it failed."""
        try:
            msg, buffers = self._reader.read()  # type: ignore[union-attr]
        except (ConnectionError, OSError) as e:
            raise pipe.PipeClosed(str(e)) from None
        except Exception as e:  # a malformed message: the runner is not to be trusted any more
            self.kill(f"the runner sent a malformed message ({type(e).__name__})")
            raise pipe.PipeClosed(str(e)) from None
        if not isinstance(msg, pipe.Ready):
            if not self.inflight:
                self.kill("the runner answered a request it was not sent")
                raise pipe.PipeClosed("unexpected answer")
            self._answered = sent = self.inflight.popleft()
            if self._sent_at:  # a lone run's answer time, for the next spin
                took, was = time.perf_counter() - self._sent_at, self._answer_s.get(self._sent_plan)
                self._answer_s[self._sent_plan] = took if was is None else was + (took - was) / 4
                self._sent_at = 0.0
            if isinstance(msg, pipe.Failed) and sent.out:  # outputs it may have held before failing
                self._free.extend(sent.out)
                sent.out = []
        return msg, buffers

    def outputs(self, ran: pipe.Ran, buffers: list[memoryview]) -> list[Resident]:
        """The outputs of a Ran message as Residents (with a host copy where the runner sent the data,
        checked: dtype × shape against the bytes there)."""
        sent, self._answered = self._answered, None
        handles = sent.out if sent is not None else []
        if len(ran.outputs) != len(handles):
            self._free.extend(handles)
            raise ProtocolError("internal", f"runner answered {len(ran.outputs)} outputs for {len(handles)}")
        out = []
        try:
            for i, (h, ref) in enumerate(zip(handles, ran.outputs, strict=True)):
                host = self._data(ref, buffers, f"runner output {i}") if ref.has_data else None
                try:
                    r = Resident(self, h, self.gen, dtypes.to_numpy(ref.dtype), tuple(ref.shape), host)
                except (ValueError, TypeError) as e:
                    raise ProtocolError("internal", f"runner output {i}: {e}") from None
                self.residents[h] = r
                if host is None:
                    self.unsaved[h] = r
                out.append(r)
        except Exception:
            self._free.extend(handles[len(out) :])
            raise
        self.counts["reused"] += ran.reused
        return out

    def _data(self, ref: pipe.TensorRef, buffers: list[memoryview], what: str) -> np.ndarray:
        if ref.segment:
            if not ref.segment.startswith("o"):
                raise ProtocolError("internal", f"{what}: runner named segment {ref.segment!r}")
            seg = pipe.open_segment(self.dir, ref.segment, unlink=True)
            # the supervisor's now: renamed, so that a runner's end (which removes its leftovers) keeps it
            held = os.path.join(self.dir, f"h{next(self._handles)}")
            os.rename(seg.path, held)
            seg.path = held
            try:
                array = pipe.array_in(seg, ref.dtype, ref.shape, ref.offset)
            except ValueError as e:
                raise ProtocolError("internal", f"{what}: {e}") from None
        else:
            if not 0 <= ref.index < len(buffers):
                raise ProtocolError("internal", f"{what} points to a missing buffer")
            array = codec.from_frame(ref.dtype, ref.shape, buffers[ref.index], what=what)
        self.counts["downloads"] += 1
        self.counts["download_bytes"] += array.nbytes
        return array

    def copies(self) -> dict[str, int]:
        """What crossed between host and runner so far, and the tensors it holds now (any thread)."""
        return {**self.counts, "held": len(self.residents)}

    # -- host copies --------------------------------------------------------------------------------

    def fetch(self, residents: list[Resident]) -> None:
        """Give each Resident its host copy now (a client reads it), waiting for the runner; ProtocolError
        when one was lost, or the runner is busy or ends meanwhile (then its unsaved tensors are lost)."""
        todo = [r for r in residents if r.host is None]
        if not todo:
            return
        for r in todo:
            if r.lost or r.gen != self.gen:
                raise ProtocolError("run_failed", f"tensor lost: {r.lost or 'not held by the runner'}")
        if self._busy or self._sock is None:
            raise ProtocolError("internal", "the runner is busy: a tensor on the device cannot be read now; retry")
        unique = list({r.handle: r for r in todo}.values())
        rebind = not self.device.cuda  # a CPU runner then holds it by the shared copy: its own memory goes
        try:
            self.inflight.append(Sent("fetch"))
            pipe.send(self._sock, pipe.Fetch(handles=[r.handle for r in unique], rebind=rebind, free=self._take_free()))
            if not self.wait(FETCH_TIMEOUT):
                self.kill(f"it did not copy tensors to the host within {FETCH_TIMEOUT:g} s")
            msg, buffers = self.receive()
        except (pipe.PipeClosed, OSError):
            _, words = self.died()
            raise ProtocolError("run_failed", f"tensor lost: the runner ended while copying it ({words})") from None
        if isinstance(msg, pipe.Failed) or not isinstance(msg, pipe.Fetched) or len(msg.tensors) != len(unique):
            detail = msg.message if isinstance(msg, pipe.Failed) else type(msg).__name__
            raise ProtocolError("internal", f"the runner could not copy tensors to the host: {detail}")
        for r, ref in zip(unique, msg.tensors, strict=True):
            r.host = self._data(ref, buffers, f"tensor #{r.handle}")
            self.unsaved.pop(r.handle, None)
            self.counts["host_copies"] += 1

    def protect(self, spare: set[int]) -> int:
        """Before a run: a host copy of every tensor the runner computed that has none, but those in ``spare``
        (ids of Residents stored only under the run's output keys: a failed run fails those keys anyway).
        So a run that crashes, times out or is cancelled loses nothing else (the containment promise); a
        training loop, whose step overwrites its state, copies nothing. Returns how many were copied."""
        if self._busy or not self.ready or not self.unsaved:
            return 0
        due = [r for r in self.unsaved.values() if r.host is None and id(r) not in spare]
        return self._save(due)

    def sync(self, now: float | None = None) -> int:
        """The lazy host copy: tensors the runner computed and that have been kept ``sync_after`` seconds get
        one (call while idle), so that they survive the runner even if it dies idle. Returns how many."""
        if self._busy or not self.ready or not self.unsaved or self.sync_after <= 0:
            return 0
        now = time.monotonic() if now is None else now
        after = self.sync_after
        return self._save([r for r in self.unsaved.values() if r.host is None and now - r.born >= after])

    def _save(self, due: list[Resident]) -> int:
        if not due:
            return 0
        try:
            self.fetch(due)
        except ProtocolError as e:
            log.warning("host copy of %d tensors failed: %s", len(due), e.message)
            return 0
        return len(due)


def _why(rc: int, killed: str) -> tuple[str, str]:
    """(code, words) for a runner that ended with status ``rc`` (``killed``: why we killed it, if we did)."""
    if killed:
        return "", killed
    if rc < 0:
        sig = signal.Signals(-rc)
        if sig == signal.SIGKILL:
            return "out_of_memory", "the runner was killed (SIGKILL), most likely by the out-of-memory killer"
        if sig in CRASH_SIGNALS:
            hint = " (an allocation past --max-run-memory-mb can end this way)" if sig == signal.SIGABRT else ""
            return "plan_crashed", f"the runner crashed with {sig.name}{hint}"
        return "plan_crashed", f"the runner was ended by {sig.name}"
    return "plan_crashed", f"the runner exited with status {rc}"
