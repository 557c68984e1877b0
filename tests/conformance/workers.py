"""The workers the conformance suite can start: the Python reference ``plan-worker`` and the Node.js one
(worker/node). ``PLANWIRE_WORKERS=python,node`` (the default: both) picks which ones the suite runs against;
the Node worker's tests skip, saying why, when ``node`` or worker/node/node_modules is missing."""

from __future__ import annotations

import os

from planwire.worker.process import NODE_BIN, NODE_DIR, NodeWorkerProcess, WorkerProcess, node_missing

KINDS = ("python", "node")
__all__ = ["NODE_BIN", "NODE_DIR", "KINDS", "NodeWorkerProcess", "WorkerProcess", "kinds", "node_missing", "start"]


def kinds() -> list[str]:
    """Worker kinds to test, from PLANWIRE_WORKERS (comma-separated; default: all)."""
    wanted = [k.strip() for k in os.environ.get("PLANWIRE_WORKERS", ",".join(KINDS)).split(",") if k.strip()]
    unknown = sorted(set(wanted) - set(KINDS))
    if unknown:
        raise ValueError(f"PLANWIRE_WORKERS: unknown worker kind(s) {unknown}; known: {', '.join(KINDS)}")
    return wanted


def start(kind: str, id: str, **kwargs) -> WorkerProcess:
    """A running worker of ``kind`` (python or node)."""
    return NodeWorkerProcess(id, **kwargs) if kind == "node" else WorkerProcess(id, **kwargs)
