"""The tiny call's log of a worker's Stats (worker/stats.py): its runs and deletes, counted in batches.

The tiny call's path (worker/tiny.py) does not count its requests one by one: ``ran`` and ``deleted`` append
them to a log (a deque), and ``settle`` counts the log in one batch, with the same rows and counts as one
``Stats.observe`` per request, before the next ``observe``, any read of the stats, or once the log holds
``RAN_BATCH`` entries.

A mixin of :class:`~planwire.worker.stats.Stats`: it works on its rows, holdings and metrics, under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from planwire.transport import messages as m
from planwire.worker.owners import label

RAN_BATCH = 256  # runs and deletes logged by ``ran`` and ``deleted`` counted together at most this many at a time


class TinyLog:
    """ran, deleted and settle: the tiny path's requests, counted in batches."""

    def ran(
        self, frames: Sequence[object], conn: bytes, owner_id: bytes, msg: m.Run, seconds: float, sizes: list[int]
    ) -> None:
        """``observe`` of a run that succeeded and stored its outputs, of ``sizes`` bytes each (worker/tiny.py).
        Logged here and counted in a batch by :meth:`settle` (the same rows and counts as ``observe``, except
        that past ``max_rows`` connections the rows folded within one batch may differ), before
        any read of the stats and any other request is observed: a tiny call pays a list append."""
        log = self._ran
        log.append(("run", self.peer(frames, conn), owner_id, msg, seconds, sizes, time.time()))
        if len(log) >= RAN_BATCH:
            self.settle()

    def deleted(self, frames: Sequence[object], conn: bytes, owner_id: bytes, msg: m.Delete) -> None:
        """``observe`` of a delete that succeeded (worker/tiny.py: the frees of a client's tiny calls), logged
        and counted in order with the runs :meth:`ran` logged."""
        log = self._ran
        log.append(("delete", self.peer(frames, conn), owner_id, msg, 0.0, None, time.time()))
        if len(log) >= RAN_BATCH:
            self.settle()

    def settle(self) -> None:
        """Count the runs and deletes :meth:`ran` and :meth:`deleted` logged (any thread: the log is a deque,
        appended by the serving thread)."""
        if self._ran:
            with self._lock:
                self._settle()

    def _settle(self) -> None:
        """:meth:`settle` under the lock: per connection and owner, the requests are counted once per kind (in
        the order of their last request, as one ``observe`` after another would leave the rows), then each run
        and delete in the order they came."""
        log, batch = self._ran, []
        while log:
            batch.append(log.popleft())
        if not batch:
            return
        groups: dict[tuple[str, bytes], tuple[dict[str, int], float]] = {}  # (connection, owner) -> counts, last seen
        for kind, client, owner_id, _, _, _, when in batch:
            g = groups.pop((client, owner_id), None)
            counts = g[0] if g else {}
            counts[kind] = counts.get(kind, 0) + 1
            groups[client, owner_id] = counts, when
        names = {}
        for (client, owner_id), (counts, when) in groups.items():
            owner = names[client, owner_id] = label(owner_id) if owner_id else client
            for kind, n in counts.items():
                self._seen(client, owner, kind, False, when, n)
                self.metrics.request(kind, "", n)
        # Each run counted; what the runs stored and the deletes freed applied once per tensor, as its last
        # change left it (a tiny call's result freed within the batch is never held).
        plans, metrics, durations = self.plans, self.metrics, self.durations
        last: dict[tuple[str, str], tuple[str, int] | None] = {}  # (owner, key) -> (connection, bytes); None: freed
        runs = 0
        for kind, client, owner_id, msg, seconds, sizes, _ in batch:
            owner = names[client, owner_id]
            if kind == "run":
                runs += 1
                plan = plans.get(msg.plan)
                if plan is not None:
                    plan.runs += 1
                metrics.run(plan.name if plan is not None else "(unknown plan)", msg.plan[:12], seconds, False)
                durations.append(seconds)
                for key, nbytes in zip(msg.outputs, sizes, strict=True):
                    last[owner, key] = client, nbytes
            else:
                for key in msg.keys:
                    last[owner, key] = None
        self.runs += runs
        hold, drop = self._hold, self._drop
        for (owner, key), held in last.items():
            if held is None:
                drop(owner, key)
            else:
                hold(owner, key, *held)
        self._fold(time.time())
