"""Stats: what a worker holds, for whom, and what ran, for operators (plan-worker status, --metrics).

The Service calls ``observe`` once per request on its own thread, after answering; everything else (the
admin socket's thread, the metrics HTTP thread) reads a consistent snapshot under one lock. The tiny call's
path (worker/tiny.py) only logs its runs and deletes, counted in batches with the same rows and counts
(worker/statlog.py: ``ran``, ``deleted``, ``settle``). Clients are named by their CURVE public key when the
worker uses CURVE, else by the connection (peer address and the socket's file descriptor, from ZeroMQ's
message properties). Holdings are also kept per *owner* (the identity that owns objects, worker/owners.py:
a client that reconnects keeps its owner), with the privacy budget each owner has spent on noised releases.

Connections come and go (a client that reconnects, fd numbers reused): a connection's row is kept while it
is recent, and folded into its owner's row once it has not been seen for ``fold_after`` seconds, or when
more than ``max_rows`` rows are kept (the least recently seen first). The owner's row already counts its
requests and holdings, so folding loses no number: status stays bounded however many connections come.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from planwire.transport import dtypes
from planwire.transport import messages as m
from planwire.worker.metrics import Metrics
from planwire.worker.owners import label
from planwire.worker.peers import PeerNames
from planwire.worker.statlog import TinyLog
from planwire.worker.statrows import ClientStats, OwnerStats, PlanStats, Recent

if TYPE_CHECKING:
    from planwire.worker.service import Service

_KINDS = {cls: m.type_name(cls) for cls in m.REQUESTS}  # request class -> its type tag
WORKER = "(worker's own data)"  # owner of the tensors the worker was started with
DURATIONS_KEPT = 10_000  # p50/p99 are over the most recent runs
CONNECTIONS_SHOWN = 8  # per owner in status
FOLD_AFTER_S = 600.0  # a connection not seen for this long is folded into its owner's row
MAX_CONNECTION_ROWS = 1024  # connection rows kept at most (beyond: the least recently seen are folded)


class Stats(TinyLog):
    """Per-client tensors and plans, runs, releases of private data; mirrored into Prometheus metrics."""

    def __init__(
        self,
        service: Service,
        *,
        curve: bool = False,
        fold_after: float = FOLD_AFTER_S,
        max_rows: int = MAX_CONNECTION_ROWS,
    ) -> None:
        self.service = service
        self.curve = curve
        self.fold_after = fold_after
        self.max_rows = max_rows
        self.folded = 0  # connection rows folded into their owners' rows since the start
        self.started = time.time()
        self._ran: deque[tuple] = deque()  # runs of worker/tiny.py not counted yet (settle)
        self.metrics = Metrics(before_collect=self.settle)
        self.peer = PeerNames(curve)
        self._lock = threading.Lock()
        self.clients: dict[str, ClientStats] = {}  # connection -> its row, least recently seen first
        self.tensors: dict[tuple[str, str], tuple[str, int]] = {}  # (owner, key) -> (connection, bytes)
        self.owners: dict[str, OwnerStats] = {}  # owner label (as in the audit log) -> what it did
        self.plans: dict[str, PlanStats] = {}  # plan id -> stats
        self.requests: Counter[str] = Counter()
        self.runs = 0
        self.runs_failed = 0
        self.private_releases = 0  # tensors of the worker's own data sent to a client (get, --public only)
        self.durations = Recent(DURATIONS_KEPT)
        self._tensor_bytes = 0
        self._plan_bytes = 0
        self.device: Callable[[], dict[str, int]] | None = None  # the sandbox's host<->device counts, if any
        for key, entry in service.store.own():
            self._hold(WORKER, key, WORKER, entry.array.nbytes)
        self.metrics.track_holdings(  # plain reads of ints and dict sizes: safe from the scrape thread
            tensors=lambda: len(self.tensors),
            tensor_bytes=lambda: self._tensor_bytes,
            plans=lambda: len(self.plans),
            plan_bytes=lambda: self._plan_bytes,
            clients=lambda: len(self.clients) + self.folded,  # folded rows were clients seen too
        )

    def observe(
        self,
        frames: Sequence[object],
        msg: m._Message | None,
        reply: m._Message,
        seconds: float,
        owner_id: bytes = b"",
        conn: bytes = b"",
    ) -> None:
        """Account for one answered request from owner ``owner_id`` (worker/owners.py) over the connection ``frames``
        came on (``conn``: its routing id, or b""; called by Service.reply, on the serving thread)."""
        kind = _KINDS.get(type(msg)) or (m.type_name(type(msg)) if msg is not None else "invalid")
        client = self.peer(frames, conn)
        owner = label(owner_id) if owner_id else client
        failed = type(reply) is m.Error
        now = time.time()
        with self._lock:
            if self._ran:  # the runs before this request first
                self._settle()
            c, o = self._seen(client, owner, kind, failed, now)
            self.metrics.request(kind, reply.code if failed else "")  # type: ignore[attr-defined]
            if kind == "run":
                self._run(msg, client, owner_id, owner, failed, seconds)  # type: ignore[arg-type]
            elif failed:
                pass
            elif isinstance(msg, m.Hello):
                c.name = o.name = msg.client
            elif isinstance(msg, m.Put):
                for t in msg.tensors:
                    size = math.prod(t.shape) * dtypes.to_numpy(t.dtype).itemsize
                    self._hold(owner, t.key, client, size)
            elif isinstance(msg, m.Get):
                for key in msg.keys:
                    if (owner, key) not in self.tensors and (WORKER, key) in self.tensors:
                        self.private_releases += 1
                        self.metrics.released()
                    elif not msg.keep:
                        self._drop(owner, key)
            elif isinstance(msg, m.Delete):
                for key in msg.keys:
                    self._drop(owner, key)
            elif isinstance(msg, m.DeletePlan):
                plan = self.plans.get(msg.plan)
                if plan is not None:
                    plan.owners.discard(owner)
            elif isinstance(msg, m.RegisterPlan) and isinstance(reply, m.PlanInfo):
                plan = self.plans.get(reply.plan)
                if plan is None:
                    name = getattr(self.service.plans.get(reply.plan), "name", "") or msg.name
                    nbytes = len(frames[2 + msg.frame]) if len(frames) > 2 + msg.frame else 0  # type: ignore[arg-type]
                    plan = self.plans[reply.plan] = PlanStats(name, nbytes)
                    self._plan_bytes += nbytes
                plan.clients.add(client)
                plan.owners.add(owner)
            self._fold(now)

    def _seen(
        self, client: str, owner: str, kind: str, failed: bool, now: float, n: int = 1
    ) -> tuple[ClientStats, OwnerStats]:
        """Count ``n`` requests of ``kind`` on the rows of connection ``client`` and of ``owner`` (under the lock)."""
        o = self.owners.get(owner)
        if o is None:
            o = self.owners[owner] = OwnerStats()
        o.last_seen = now
        shown = o.connections
        if next(reversed(shown), None) != client:  # the most recent last (a no-op when it is already)
            shown.pop(client, None)
            shown[client] = None
            if len(shown) > CONNECTIONS_SHOWN:
                del shown[next(iter(shown))]
        o.requests += n
        o.refused += failed
        self.requests[kind] += n
        clients = self.clients
        c = clients.get(client)
        if c is None or next(reversed(clients)) != client:  # the most recently seen last
            c = clients.pop(client, None) or ClientStats()
            clients[client] = c
        c.owner = owner
        c.requests += n
        c.last_seen = now
        c.refused += failed
        return c, o

    def _fold(self, now: float) -> None:
        """Fold the rows of connections not seen for ``fold_after`` seconds, and the least recently seen
        beyond ``max_rows``, into their owners' rows (their holdings stay counted there)."""
        while self.clients:
            connection, c = next(iter(self.clients.items()))
            if now - c.last_seen <= self.fold_after and len(self.clients) <= self.max_rows:
                return
            del self.clients[connection]
            self.folded += 1
            o = self.owners.get(c.owner)
            if o is not None:
                o.folded += 1
                o.connections.pop(connection, None)
            for k in c.held:
                held = self.tensors.get(k)
                if held is not None and held[0] == connection:
                    self.tensors[k] = ("", held[1])  # no connection's row: its owner's
            for plan in self.plans.values():
                plan.clients.discard(connection)

    def forget(self, owner: str) -> None:
        """An owner's objects were freed (--idle-ttl): drop its row and holdings (called on the serving thread;
        what was released to it stays in the audit log, its privacy accounting in the Releaser)."""
        with self._lock:
            self._settle()
            self.owners.pop(owner, None)
            for k in [k for k in self.tensors if k[0] == owner]:
                self._drop(*k)
            for plan in self.plans.values():
                plan.owners.discard(owner)

    def _run(
        self,
        msg: m.Run,
        client: str,
        owner_id: bytes,
        name: str,
        failed: bool,
        seconds: float,
        sizes: list[int] | None = None,
    ) -> None:
        """``name``: the owner's label (``owner_id``'s, or the connection's when it has none); ``sizes``: the
        bytes of each output, all stored (else each is looked up in the store)."""
        plan = self.plans.get(msg.plan)
        self.runs += 1
        self.runs_failed += failed
        if plan is not None:
            plan.runs += 1
            plan.failed += failed
        self.metrics.run(plan.name if plan is not None else "(unknown plan)", msg.plan[:12], seconds, failed)
        self.durations.append(seconds)
        if sizes is not None:
            for key, nbytes in zip(msg.outputs, sizes, strict=True):
                self._hold(name, key, client, nbytes)
            return
        for key in msg.outputs:
            entry = self.service.store.find(owner_id, key)
            if entry is None:  # a failed run's outputs are not stored (a refused one changed nothing)
                self._drop(name, key)
            elif not failed:
                self._hold(name, key, client, entry.array.nbytes)

    def _hold(self, owner: str, key: str, connection: str, nbytes: int) -> None:
        self._drop(owner, key)
        self.tensors[owner, key] = (connection, nbytes)
        self._tensor_bytes += nbytes
        c = self.clients.get(connection)
        if c is not None:
            c.held.add((owner, key))

    def _drop(self, owner: str, key: str) -> None:
        old = self.tensors.pop((owner, key), None)
        if old is not None:
            self._tensor_bytes -= old[1]
            c = self.clients.get(old[0])
            if c is not None:
                c.held.discard((owner, key))

    def snapshot(self) -> dict:
        """Everything ``plan-worker status`` shows, as plain data (any thread)."""
        with self._lock:
            self._settle()
            per: dict[str, dict[str, int]] = {}

            def row(owner: str) -> dict[str, int]:
                return per.setdefault(owner, {"tensors": 0, "tensor_bytes": 0, "plans": 0, "plan_bytes": 0})

            by_owner: dict[str, dict[str, int]] = {}

            def owned(owner: str) -> dict[str, int]:
                return by_owner.setdefault(owner, {"tensors": 0, "tensor_bytes": 0, "plans": 0, "plan_bytes": 0})

            for (owner, _), (connection, nbytes) in self.tensors.items():
                rows = [owned(owner)]
                if owner == WORKER or connection in self.clients:  # else its connection's row was folded
                    rows.append(row(WORKER if owner == WORKER else connection))
                for r in rows:
                    r["tensors"] += 1
                    r["tensor_bytes"] += nbytes
            for p in self.plans.values():
                for owner in p.clients:
                    r = row(owner)
                    r["plans"] += 1
                    r["plan_bytes"] += p.nbytes
                for owner in p.owners:
                    r = owned(owner)
                    r["plans"] += 1
                    r["plan_bytes"] += p.nbytes
            durations = self.durations.sorted()
            now = time.time()
            clients = []
            for label in sorted(self.clients):
                c = self.clients[label]
                clients.append(
                    {
                        "client": label,
                        "name": c.name,
                        "requests": c.requests,
                        "refused": c.refused,
                        "idle_s": round(now - c.last_seen, 3),
                        **row(label),
                    }
                )
            return {
                "uptime_s": round(now - self.started, 3),
                "clients": clients,
                "clients_folded": self.folded,
                "owners": self._owner_rows(owned, now),
                "own_data": row(WORKER),
                "plans": [
                    {"plan": pid, "name": p.name, "bytes": p.nbytes, "runs": p.runs, "failed": p.failed}
                    for pid, p in self.plans.items()
                ],
                "requests": dict(self.requests),
                "runs": self.runs,
                "runs_failed": self.runs_failed,
                "run_p50_ms": _percentile(durations, 0.50) * 1e3,
                "run_p99_ms": _percentile(durations, 0.99) * 1e3,
                "private_releases": self.private_releases,
                "device_copies": dict(self.device()) if self.device is not None else {},
            }

    def _owner_rows(self, owned, now: float) -> list[dict]:
        releaser = self.service.releaser
        spent = releaser.spent()
        rows = []
        for name in sorted(self.owners.keys() - {WORKER}):
            o = self.owners[name]
            eps = spent.get(name)
            rows.append(
                {
                    "owner": name,
                    "name": o.name,
                    "connections": list(o.connections),
                    "idle_s": round(now - o.last_seen, 3),
                    "last_seen": o.last_seen,
                    "requests": o.requests,
                    "refused": o.refused,
                    "connections_folded": o.folded,
                    **owned(name),
                    "releases": releaser.releases.get(name, 0),
                    "epsilon": eps,
                    "delta": releaser.delta if eps is not None else None,
                }
            )
        return rows


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (0.0 when there are no values)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]
