"""The tiny call's log of a worker's Stats (worker/stats.py): its runs, counted in batches.

The tiny call's path (worker/tiny.py) does not count its runs one by one: ``ran`` appends them to a log (a
deque), and ``settle`` counts the log in one batch, with the same rows and counts as one ``Stats.observe``
per run, before the next ``observe``, any read of the stats, or once the log holds
``RAN_BATCH`` entries.

A mixin of :class:`~planwire.worker.stats.Stats`: it works on its rows, holdings and metrics, under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from planwire.transport import messages as m
from planwire.worker.owners import label

RAN_BATCH = 256  # runs logged by ``ran`` counted together at most this many at a time


class TinyLog:
    """ran and settle: the tiny path's runs, counted in batches."""

    def ran(
        self, frames: Sequence[object], conn: bytes, owner_id: bytes, msg: m.Run, seconds: float, sizes: list[int]
    ) -> None:
        """``observe`` of a run that succeeded and stored its outputs, of ``sizes`` bytes each (worker/tiny.py).
        Logged here and counted in a batch by :meth:`settle` (the same rows and counts as ``observe``, except
        that past ``max_rows`` connections the rows folded within one batch may differ), before
        any read of the stats and any other request is observed: a tiny call pays a list append."""
        log = self._ran
        log.append((self.peer(frames, conn), owner_id, msg, seconds, sizes, time.time()))
        if len(log) >= RAN_BATCH:
            self.settle()

    def settle(self) -> None:
        """Count the runs :meth:`ran` logged (any thread: the log is a deque, appended by the serving thread)."""
        if self._ran:
            with self._lock:
                self._settle()

    def _settle(self) -> None:
        """:meth:`settle` under the lock: per connection and owner, the runs are counted once (in the order of
        their last run, as one ``observe`` after another would leave the rows), then each run in order."""
        log, batch = self._ran, []
        while log:
            batch.append(log.popleft())
        if not batch:
            return
        groups: dict[tuple[str, bytes], tuple[int, float]] = {}  # (connection, owner) -> runs, last seen
        for client, owner_id, _, _, _, when in batch:
            n, _ = groups.pop((client, owner_id), (0, 0.0))
            groups[client, owner_id] = n + 1, when
        names = {}
        for (client, owner_id), (n, when) in groups.items():
            owner = names[client, owner_id] = label(owner_id) if owner_id else client
            self._seen(client, owner, "run", False, when, n)
            self.metrics.request("run", "", n)
        # Each run counted (per plan, in the order of their first run), the durations in order; what the runs
        # stored applied once per tensor, as the last run writing it left it.
        per_plan: dict[str, int] = {}
        last: dict[tuple[str, str], tuple[str, int]] = {}  # (owner, key) -> (connection, bytes)
        seconds = []
        for client, owner_id, msg, took, sizes, _ in batch:
            owner = names[client, owner_id]
            pid = msg.plan
            per_plan[pid] = per_plan.get(pid, 0) + 1
            seconds.append(took)
            for key, nbytes in zip(msg.outputs, sizes, strict=True):
                last[owner, key] = client, nbytes
        plans, metrics = self.plans, self.metrics
        for pid, n in per_plan.items():
            plan = plans.get(pid)
            if plan is not None:
                plan.runs += n
            metrics.ran(plan.name if plan is not None else "(unknown plan)", pid[:12], n)
        metrics.timed(seconds)
        self.durations.extend(seconds)
        self.runs += len(batch)
        hold = self._hold
        for (owner, key), held in last.items():
            hold(owner, key, *held)
        self._fold(time.time())
