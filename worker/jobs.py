"""What a Service (worker/service.py) hands between validating a request and answering it: a registered
``Plan``, and the jobs that execute (``RegisterJob``: create a session; ``RunJob``: run), each with the
``Origin`` of its request. A plan-worker's supervisor has the sandboxed runner execute them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from planwire.transport import messages as m
from planwire.transport.framing import Frame
from planwire.worker.runtime import Signature
from planwire.worker.store import ClientId, Entry


@dataclass
class Plan:
    """A registered plan: its bytes (kept, so a restarted runner can re-create its session) and ports."""

    name: str
    data: bytes
    ports: Signature


@dataclass
class Origin:
    """Who asked for a job and when it began: its request frames (the connection, for logs and stats),
    the client it counts against (quotas, owner of its outputs) and ``perf_counter`` at its start."""

    frames: Sequence[Frame] = ()
    client: ClientId = b""
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class RegisterJob:
    """A registration that needs a session created (by the sandbox's runner, or in process)."""

    msg: m.RegisterPlan
    pid: str
    name: str
    data: bytes
    any_rank: frozenset[str] = frozenset()  # its ports of unknown rank
    origin: Origin = field(default_factory=Origin)

    @property
    def rid(self) -> int:
        return self.msg.id


@dataclass
class RunJob:
    """A validated run: the plan, its argument arrays and, for stored ones, their store entries."""

    msg: m.Run
    plan: Plan
    args: list[np.ndarray]
    entries: list[Entry | None]
    reads_private: bool = False  # an argument is private: a failure's message must not quote values
    private: frozenset[int] = frozenset()  # outputs computed from private data
    pending: dict = field(default_factory=dict)  # their releases the owner's policy allows
    rows: int = 0  # the fewest rows of the worker's data they were computed from
    origin: Origin = field(default_factory=Origin)


Job = RegisterJob | RunJob
