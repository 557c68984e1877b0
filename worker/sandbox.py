"""Sandbox: the supervisor's handle on its runner process (worker/runner.py), one request at a time.

Starts the runner, sends it loads and runs (tensors over ``INLINE_MAX`` by shared-memory segment, so a
stored tensor crosses at most once, on its first use), reads its answers, kills it on timeout or cancel,
and says in words why it died. The runner starts again lazily, when the next request needs it; its
sessions are re-created from the plan bytes the supervisor keeps (``loaded`` says which it has).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from planwire.transport import codec
from planwire.transport.errors import ProtocolError
from planwire.worker import pipe
from planwire.worker.store import Entry

log = logging.getLogger("planwire.worker")

# Before sleeping on the runner's pipe, watch it this long: a tiny run answers in tens of microseconds,
# and on a host with a free core not sleeping saves a wake-up per call. On a busy host (load average at
# or over the core count, checked every second) the runner needs that core more: no spinning then.
SPIN_S = 30e-6
CRASH_SIGNALS = {signal.SIGFPE, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP}


class Sandbox:
    """One runner process at a time, with its bounds: ``memory_mb`` (RLIMIT_DATA over its start-up use)
    and ``timeout`` (seconds per load or run, enforced by the caller through ``deadline``)."""

    def __init__(self, *, providers: Sequence[str], threads: int, memory_mb: int, timeout: float) -> None:
        self.providers = list(providers)
        self.threads = threads
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
        self._keep: list[np.ndarray] = []  # shared copies of a pending run's arguments
        self._spin_ok, self._spin_checked = False, -1e9
        self._killed = ""  # why we killed the runner, if we did
        self.started_at = 0.0

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
            "--providers",
            ",".join(self.providers),
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
        self._poll = select.poll()
        self._poll.register(ours.fileno(), select.POLLIN)
        self.ready = False
        self.loaded = set()
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

    def _reset(self) -> None:
        pid = self._proc.pid if self._proc is not None else 0
        if self._sock is not None:
            self._sock.close()
        self._proc, self._sock, self._poll, self.ready, self.loaded = None, None, None, False, set()
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
        """Plan ``pid`` was unregistered: the runner drops its session with the next request (one message
        in flight at a time: nothing is sent now)."""
        if pid in self.loaded:
            self.loaded.discard(pid)
            self._drop.add(pid)

    def _dropped(self, pid: str) -> list[str]:
        drop, self._drop = self._drop, set()
        drop.discard(pid)  # this request loads it again
        return sorted(drop)

    def send_load(self, pid: str, name: str, data: bytes) -> None:
        pipe.send(self._sock, pipe.Load(plan=pid, name=name, drop=self._dropped(pid)), [data])  # type: ignore[arg-type]

    def send_run(
        self, pid: str, name: str, data: bytes, args: Sequence[np.ndarray], entries: Sequence[Entry | None]
    ) -> None:
        """Send a run; a large argument not yet in shared memory is copied there once and, when it is a
        stored tensor (``entries[i]``), the store keeps the shared copy for later runs."""
        refs, buffers = [], []
        keep = self._keep = []
        load = pid not in self.loaded
        if load:
            buffers.append(data)
        for arr, entry in zip(args, entries, strict=True):
            wire, shape, buf = codec.to_frame(arr)
            loc = pipe.segment_of(arr) if buf.nbytes > pipe.INLINE_MAX else None
            if loc is None and buf.nbytes > pipe.INLINE_MAX:
                try:
                    shared = pipe.to_segment(self.dir, "i", arr, unlink=True)
                except OSError as e:  # shared memory full: this call copies through the pipe
                    log.warning("shared memory unavailable (%s): argument of %s bytes sent inline", e, buf.nbytes)
                else:
                    if entry is not None and entry.array is arr:
                        entry.array = shared
                    keep.append(shared)  # alive (its file too) until the runner has answered
                    loc = pipe.segment_of(shared)
            if loc is None:
                refs.append(pipe.TensorRef(wire, shape, index=len(buffers)))
                buffers.append(buf)
            else:
                seg, offset = loc
                refs.append(pipe.TensorRef(wire, shape, segment=os.path.basename(seg.path), offset=offset))
        run = pipe.Run(plan=pid, name=name, args=refs, load=load, drop=self._dropped(pid))
        pipe.send(self._sock, run, buffers)  # type: ignore[arg-type]
        if load:
            self.loaded.add(pid)

    def wait(self, seconds: float) -> bool:
        """Whether the runner has something to say (an answer, or its closed pipe) within ``seconds``."""
        if self._poll is None:
            return False
        if seconds and self._spin():
            end = time.perf_counter() + SPIN_S
            while time.perf_counter() < end:
                if self._poll.poll(0):
                    return True
        return bool(self._poll.poll(int(seconds * 1e3)))

    def _spin(self) -> bool:
        now = time.monotonic()
        if now - self._spin_checked > 1.0:
            self._spin_checked = now
            try:
                self._spin_ok = os.getloadavg()[0] < (os.cpu_count() or 1)
            except OSError:
                self._spin_ok = False
        return self._spin_ok

    def receive(self) -> tuple[pipe.FromRunner, list[memoryview]]:
        """The runner's next message; PipeClosed when it died (then call ``died``)."""
        self._keep = []
        try:
            return pipe.recv_reply(self._sock)  # type: ignore[arg-type]
        except (ConnectionError, OSError) as e:
            raise pipe.PipeClosed(str(e)) from None
        except Exception as e:  # a malformed message: the runner is not to be trusted any more
            self.kill(f"the runner sent a malformed message ({type(e).__name__})")
            raise pipe.PipeClosed(str(e)) from None

    def outputs(self, ran: pipe.Ran, buffers: list[memoryview]) -> list[np.ndarray]:
        """The arrays of a Ran message, checked (dtype × shape against the bytes there)."""
        out = []
        for i, ref in enumerate(ran.outputs):
            if ref.segment:
                if not ref.segment.startswith("o"):
                    raise ProtocolError("internal", f"runner named output segment {ref.segment!r}")
                seg = pipe.open_segment(self.dir, ref.segment, unlink=True)
                try:
                    out.append(pipe.array_in(seg, ref.dtype, ref.shape, ref.offset))
                except ValueError as e:
                    raise ProtocolError("internal", f"runner output {i}: {e}") from None
            else:
                if not 0 <= ref.index < len(buffers):
                    raise ProtocolError("internal", f"runner output {i} points to a missing buffer")
                out.append(codec.from_frame(ref.dtype, ref.shape, buffers[ref.index], what=f"runner output {i}"))
        return out
