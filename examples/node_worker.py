"""Starting the Node.js plan-worker (worker/node) from the examples, like planwire's WorkerProcess starts
the Python one. ``node_missing()`` says why it cannot run here (no ``node``, or its packages not installed:
``make demo`` installs them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from planwire.worker.process import WorkerProcess

NODE_DIR = Path(__file__).resolve().parents[1] / "worker" / "node"
PACKAGES = tuple(json.loads((NODE_DIR / "package.json").read_text())["dependencies"])  # what npm ci installs


def node_missing() -> str | None:
    """Why the Node.js worker cannot run here, or None."""
    if shutil.which("node") is None:
        return "no `node` on PATH (Node 20+)"
    if not all((NODE_DIR / "node_modules" / p / "package.json").is_file() for p in PACKAGES):
        return "its packages are not installed (ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix worker/node)"
    return None


class NodeWorkerProcess(WorkerProcess):
    """A Node.js plan-worker child process: the same flags, ready line and SIGTERM as plan-worker."""

    def __init__(
        self,
        id: str = "worker",
        *,
        listen: str = "tcp://127.0.0.1:0",
        data: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> None:
        self.id = id
        self.log_path = Path(tempfile.mkstemp(prefix=f"plan-worker-node-{id}-", suffix=".log")[1])
        self._workdir = tempfile.mkdtemp(prefix=f"plan-worker-node-{id}-")
        cmd = ["node", str(NODE_DIR / "bin" / "plan-worker.js"), "--listen", listen, "--id", id]
        for d in data:
            cmd += ["--data", d]
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([*cmd, *extra], stdout=self._log, stderr=subprocess.STDOUT, cwd=self._workdir)
        self.url = self._wait_ready(30.0)
