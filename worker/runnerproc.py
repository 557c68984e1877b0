"""The sandboxed runner's process: started with its bounds, killed, reaped, and why it ended, in words.

One process at a time (worker/runner.py), given one end of a socket pair and its bounds on the command line
(data memory, threads, device); it bounds itself and reports Ready over the pipe (worker/runnerlink.py).
When it ends, what it wrote to the shared-memory directory and never reported goes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

from planwire.worker.device import Device

CRASH_SIGNALS = {signal.SIGFPE, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP}
REAP_WAIT = 5.0  # seconds a runner that closed its pipe (or was told to end) gets to exit before SIGKILL


class RunnerProcess:
    """The runner process, if one runs: ``memory_mb`` (RLIMIT_DATA over its start-up use) and ``threads``
    (onnxruntime's) are its bounds; its shared-memory segments live in ``directory``."""

    def __init__(self, *, directory: str, device: Device, threads: int, nchwc: bool = True, memory_mb: int) -> None:
        self.dir, self.device, self.threads, self.memory_mb = directory, device, threads, memory_mb
        self.nchwc = nchwc  # plans' eligible Convs as onnxruntime's NCHWc kernels (worker/nchwc.py)
        self.proc: subprocess.Popen | None = None
        self.killed = ""  # why we killed it, if we did

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> socket.socket:
        """Start a runner (none may run); returns the supervisor's end of its pipe."""
        assert self.proc is None
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
            *([] if self.nchwc else ["--no-nchwc"]),
        ]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, cwd=os.getcwd())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.killed = ""
        return ours

    def kill(self, why: str) -> None:
        """Kill the runner now (timeout, cancel, shutdown); ``why`` is what ``reap`` will say."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = why
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def reap(self) -> tuple[str, str]:
        """(code, words) for the runner that closed its pipe: waits for it (killing it if it does not exit)
        and forgets it."""
        proc, killed = self.proc, self.killed
        assert proc is not None
        try:
            rc = proc.wait(REAP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        self.forget()
        return why_ended(rc, killed)

    def end(self, why: str) -> None:
        """Kill the runner and give it a moment to exit (shutdown), then forget it."""
        if self.proc is not None:
            self.kill(why)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(REAP_WAIT)
            self.forget()

    def forget(self) -> None:
        """No runner from now on; the outputs it wrote but never reported are removed."""
        pid = self.proc.pid if self.proc is not None else 0
        self.proc = None
        prefix = f"o{pid}-"
        with contextlib.suppress(OSError):
            for name in os.listdir(self.dir):
                if name.startswith(prefix):
                    os.unlink(os.path.join(self.dir, name))


def why_ended(rc: int, killed: str) -> tuple[str, str]:
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
