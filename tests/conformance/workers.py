"""The workers the conformance suite can start: the Python reference ``plan-worker`` and the Node.js one
(worker/node). ``PLANWIRE_WORKERS=python,node`` (the default: both) picks which ones the suite runs against;
the Node worker's tests skip, saying why, when ``node`` or worker/node/node_modules is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from planwire.worker.process import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "worker" / "node"
PACKAGES = tuple(json.loads((NODE_DIR / "package.json").read_text())["dependencies"])  # what npm ci installs
NODE_BIN = NODE_DIR / "bin" / "plan-worker.js"
KINDS = ("python", "node")


def kinds() -> list[str]:
    """Worker kinds to test, from PLANWIRE_WORKERS (comma-separated; default: all)."""
    wanted = [k.strip() for k in os.environ.get("PLANWIRE_WORKERS", ",".join(KINDS)).split(",") if k.strip()]
    unknown = sorted(set(wanted) - set(KINDS))
    if unknown:
        raise ValueError(f"PLANWIRE_WORKERS: unknown worker kind(s) {unknown}; known: {', '.join(KINDS)}")
    return wanted


def node_missing() -> str | None:
    """Why the Node worker cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "the Node.js worker needs `node` (Node 20+) on PATH"
    modules = NODE_DIR / "node_modules"
    if not all((modules / p / "package.json").is_file() for p in PACKAGES):
        return (
            "the Node.js worker's packages are not installed: run "
            "`ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix worker/node` (make test does)"
        )
    return None


class NodeWorkerProcess(WorkerProcess):
    """A Node.js plan-worker child process, started and stopped like WorkerProcess."""

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
        reason = node_missing()
        if reason:
            raise RuntimeError(reason)
        self.id = id
        self.log_path = Path(tempfile.mkstemp(prefix=f"plan-worker-node-{id}-", suffix=".log")[1])
        self._workdir = tempfile.mkdtemp(prefix=f"plan-worker-node-{id}-")
        cmd = ["node", str(NODE_BIN), "--listen", listen, "--id", id, "--log-level", log_level]
        for d in data:
            cmd += ["--data", str(Path(d).resolve()) if ":" not in d else d]
        cmd += list(extra)
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self._workdir)
        self.url = self._wait_ready(ready_timeout)


def start(kind: str, id: str, **kwargs) -> WorkerProcess:
    """A running worker of ``kind`` (python or node)."""
    return NodeWorkerProcess(id, **kwargs) if kind == "node" else WorkerProcess(id, **kwargs)
