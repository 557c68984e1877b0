"""The words of the window's errors (worker/window.py): a runner's failed answer, its death, its timeout.

A run's or registration's error names the plan and what the worker kept, so the client knows what to do;
the runner's own text is kept (the supervisor redacts it where the run read private data).
"""

from __future__ import annotations

import logging

from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.worker import pipe
from planwire.worker.jobs import Job, RegisterJob

log = logging.getLogger("planwire.worker")


def failed(job: Job, answer: pipe.Failed, worker: str, memory_mb: int) -> ProtocolError:
    """The error of ``job`` the runner answered ``answer`` to (``memory_mb``: its --max-run-memory-mb)."""
    name = job.name if isinstance(job, RegisterJob) else job.plan.name
    if answer.code == "out_of_memory":
        bound = f"--max-run-memory-mb {memory_mb}" if memory_mb else "memory"
        doing = "loading" if isinstance(job, RegisterJob) else "running"
        return ProtocolError(
            "out_of_memory", f"plan {name!r} ran out of memory {doing} on worker {worker!r} ({bound}): {answer.message}"
        )
    if answer.code == "run_failed":
        return ProtocolError("run_failed", f"plan {name!r} failed on worker {worker!r}: {answer.message}")
    code = answer.code if answer.code in m.ErrorCode.__args__ else "internal"  # type: ignore[attr-defined]
    return ProtocolError(code, answer.message)


def death(job: Job, code: str, words: str, was_ready: bool) -> ProtocolError:
    """The error of ``job``, executing when the runner ended (``code``, ``words``: why_ended's)."""
    if not was_ready:
        return ProtocolError("internal", f"the sandboxed runner failed to start ({words}): see the worker's log")
    log.warning("%s: %s; runner restarted", what(job), words)
    return ProtocolError(code or "plan_crashed", f"{what(job)}: {words}; {after(job)}")


def what(job: Job) -> str:
    if isinstance(job, RegisterJob):
        return f"plan {job.name!r} (registering)"
    return f"plan {job.plan.name!r} (run #{job.msg.id})"


def after(job: Job) -> str:
    if isinstance(job, RegisterJob):
        return "it was not registered; the worker kept every stored tensor and plan"
    return "the worker kept every stored tensor and plan"


def mib(n: int) -> str:
    return f"{n >> 20} MiB" if n else "none"
