"""Start and stop local plan-worker processes (for demos, tests and benchmarks): the Python plan-worker,
and the Node.js one (worker/node), which takes the same flags and prints the same ready line."""

from __future__ import annotations

import json
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
NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_BIN = NODE_DIR / "bin" / "plan-worker.js"


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
        self.log_path = Path(tempfile.mkstemp(prefix=f"{self.prefix}-{id}-", suffix=".log")[1])
        self._workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-{id}-")  # its own cwd: nothing to read there
        cmd = [*self.program(), "--listen", listen, "--id", id, "--log-level", log_level]
        for d in data:
            cmd += ["--data", str(Path(d).resolve()) if ":" not in d else d]
        cmd += list(extra)
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self._workdir)
        self.url = self._wait_ready(ready_timeout)

    prefix = "plan-worker"  # of its log file and working directory

    def program(self) -> list[str]:
        """The command that runs this kind of worker (its flags follow)."""
        return [sys.executable, "-m", "planwire.worker"]

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


def node_missing() -> str | None:
    """Why the Node.js worker cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "the Node.js worker needs `node` (Node 20+) on PATH"
    modules = NODE_DIR / "node_modules"
    try:  # every package npm ci installs
        packages = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        return f"no Node.js worker sources at {NODE_DIR} (a source checkout has them)"
    if not all((modules / p / "package.json").is_file() for p in packages):
        return (
            "the Node.js worker's packages are not installed: run "
            "`ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix worker/node` (make test and make demo do)"
        )
    return None


class NodeWorkerProcess(WorkerProcess):
    """A Node.js plan-worker child process (worker/node), started and stopped like WorkerProcess;
    RuntimeError saying why (:func:`node_missing`) when it cannot run here."""

    prefix = "plan-worker-node"

    def program(self) -> list[str]:
        reason = node_missing()
        if reason:
            raise RuntimeError(reason)
        return ["node", str(NODE_BIN)]
