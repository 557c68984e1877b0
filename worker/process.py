"""Start and stop local plan-worker processes (for demos, tests and benchmarks)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

_READY = re.compile(r"ready on (\S+?)(?:,| \()")


class WorkerProcess:
    """A plan-worker child process; ``url`` is its first bound endpoint once ready."""

    def __init__(
        self,
        id: str = "worker",
        *,
        listen: str = "tcp://127.0.0.1:0",
        data: Sequence[str] = (),
        extra: Sequence[str] = (),
        ready_timeout: float = 30.0,
        log_level: str = "info",
    ) -> None:
        self.id = id
        self.log_path = Path(tempfile.mkstemp(prefix=f"plan-worker-{id}-", suffix=".log")[1])
        self._workdir = tempfile.mkdtemp(prefix=f"plan-worker-{id}-")  # its own cwd: nothing to read there
        cmd = [
            sys.executable,
            "-m",
            "planwire.worker",
            "--listen",
            listen,
            "--id",
            id,
            "--log-level",
            log_level,
        ]
        for d in data:
            cmd += ["--data", str(Path(d).resolve()) if ":" not in d else d]
        cmd += list(extra)
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self._workdir)
        self.url = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"plan-worker {self.id!r} exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"plan-worker {self.id!r} not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns the exit code (killed with SIGKILL if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self

    def close(self) -> None:
        """Stop it and remove its log (set PLANWIRE_KEEP_LOGS=1 to keep logs for a post-mortem)."""
        self.stop()
        if not os.environ.get("PLANWIRE_KEEP_LOGS"):
            self.log_path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
