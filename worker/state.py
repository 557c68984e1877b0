"""Durable state (``plan-worker --state-dir DIR``): a worker's tensors, plans, client identities and session
on disk, so that after ``kill -9`` (or a crash, or a reboot) and a restart on the same directory every
acknowledged request's effect is back, under the same session: clients go on without registering again.

Every change is on disk before the request that made it is answered. A file is written whole under a
temporary name, fsynced, renamed over the old one, and its directory fsynced: a crash leaves the old file
or the new one, never half of one. A put, a run's outputs, a move by ``get``, a ``delete``, a failed run's
record, a plan registered or unregistered, an identity issued at ``hello``, a client freed by
``--idle-ttl``: each is durable when its reply leaves. A request that was not answered may be partly there.

The directory is held and written by worker/statedir.py, read back as hostile input by worker/stateread.py; its
format is worker/statefiles.py.

:func:`attach` restores what the directory holds into a Service, then has its changes written through:
an observer on its Store (worker/store.py's StoreObserver hooks), Owners and PlanHolders that write
through, a journal for its Releaser, and the supervisor's group commit (:class:`ReplyGate`).
A private result's pending release (worker/release.py) is kept with its tensor, and the privacy budget
each client spent in the ``privacy`` file: a release writes the spent budget first, then the value it
released, before it returns; a restored result is released as the policy in force at the restart says
(its rule found again by fingerprint), and the same released value is returned again. Not kept:
connections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from planwire.transport.errors import ProtocolError
from planwire.worker import flow
from planwire.worker.owners import Owners, PlanHolders
from planwire.worker.release import Pending, Releaser
from planwire.worker.resident import host_of
from planwire.worker.statedir import Restored, StateDir, StateError
from planwire.worker.statefiles import KeptRelease, write_atomic
from planwire.worker.store import ClientId, Entry

if TYPE_CHECKING:
    from planwire.worker.service import Service

log = logging.getLogger("planwire.worker")

__all__ = [
    "DurableHolders",
    "DurableOwners",
    "DurableTensors",
    "ReplyGate",
    "Restored",
    "StateDir",
    "StateError",
    "attach",
    "write_atomic",
]


# -- the worker's parts, writing through ---------------------------------------------------------------


class DurableTensors:
    """The store's observer (worker/store.py's StoreObserver): every change to a client's tensors is written
    to the state directory, a put or failure before it is made in memory (so a refused write changes
    nothing), a removal after. Also the Releaser's journal (worker/release.py's Journal)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state

    def check(self, client: ClientId, nbytes: int, what: str) -> None:
        self.state.check_room(nbytes, what)

    def put(self, client: ClientId, key: str, entry: Entry) -> None:
        # durable means on the host: a result the runner holds is copied out first
        self.state.save_tensor(
            client, key, host_of(entry.array), entry.tags, entry.private, entry.rows, _kept(entry.pending)
        )

    def failed(self, client: ClientId, key: str, why: str) -> None:
        # Never refused: a failed run's outputs are marked failed in memory whatever the disk says (else a
        # fire-and-forget client would read the key's old value); when the record cannot be written, the
        # old value's file goes, so a restart cannot bring it back either.
        try:
            self.state.save_failure(client, key, why)
        except (OSError, ProtocolError) as e:
            log.error("--state-dir: cannot record that %r failed (%s): its old value is removed", key, e)
            try:
                self.state.remove_tensors(client, [key])
            except (OSError, ProtocolError) as e2:
                log.error("--state-dir: cannot remove %r either (%s): a restart may show its old value", key, e2)

    def removed(self, client: ClientId, keys: list[str]) -> None:
        self.state.remove_tensors(client, keys)

    def dropped(self, client: ClientId) -> None:
        try:
            self.state.remove_owner(client)
        except OSError as e:  # freed in memory; its files come back at a restart, to be freed again
            log.error("--state-dir: cannot remove a freed client's tensors: %s", e)

    # -- the Releaser's journal (worker/release.py): written before a release returns ------------------

    def spent(self, spent: dict[ClientId, dict[float, int]]) -> None:
        self.state.save_spent(spent)

    def released(self, client: ClientId, key: str, entry: Entry) -> None:
        self.put(client, key, entry)  # the tensor again, now with its released value


def _kept(pending: Any) -> KeptRelease | None:
    if not isinstance(pending, Pending):
        return None
    base = None if pending.base is None else host_of(pending.base)
    how = pending.how
    noised = how.how == "update" and pending.rule.noise_multiplier
    released = pending.released if noised else None  # only a noised value cannot be computed again
    return KeptRelease(pending.rule.fingerprint, pending.output, how.how, how.param, pending.rows, base, released)


def _pending(releaser: Releaser, kept: KeptRelease | None, key: str) -> Pending | None:
    """A kept release under the rule the policy in force has for its plan (None, logged: not releasable)."""
    if kept is None:
        return None
    policy = releaser.policy
    rule = policy.rules.get(kept.plan) if policy is not None else None
    how = rule.outputs.get(kept.output) if rule is not None else None
    if how is None or how.how != kept.how or how.param != kept.param:
        log.info(
            "--state-dir: tensor %r stays private: the policy no longer releases output %r of plan %s as %s",
            key,
            kept.output,
            kept.plan[:12],
            kept.how,
        )
        return None
    assert rule is not None
    return Pending(rule, kept.output, how, kept.base, kept.rows, kept.released)


class DurableOwners(Owners):
    """Owners whose issued identities are written to the state directory (before welcome is sent)."""

    def __init__(self, state: StateDir, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state

    def hello(self, conn: bytes, presented: str) -> tuple[ClientId, str]:
        issued = len(self._by_token)
        owner, token = super().hello(conn, presented)
        if len(self._by_token) != issued:
            self.state.save_tokens(self._by_token)
        return owner, token

    def sweep(self, now: float, free: Callable[[ClientId], None]) -> list[ClientId]:
        gone = super().sweep(now, free)
        if gone:  # on the way to serving some request: a failure here is logged, never raised
            try:
                self.state.save_tokens(self._by_token)
            except Exception as e:  # noqa: BLE001
                log.error("--state-dir: the freed clients' identities are still on disk: %s", e)
        return gone

    def restore(self, tokens: dict[str, ClientId], owners: Iterable[ClientId]) -> None:
        now = time.monotonic()
        for token, owner in tokens.items():
            self._by_token[token] = owner
            self._token_of[owner] = token
        for owner in [*tokens.values(), *owners]:
            self.last_seen[owner] = now  # --idle-ttl counts again from the restart


class DurableHolders(PlanHolders):
    """PlanHolders whose plans (bytes, ports) and holders are written to the state directory."""

    def __init__(self, state: StateDir, plan_of: Callable[[str], Any]) -> None:
        super().__init__()
        self.state = state
        self._plan_of = plan_of  # pid -> the service's Plan (name, data, ports)
        self._kept: set[str] = set()

    def add(self, pid: str, owner: ClientId) -> None:
        if self.holds(pid, owner):
            return
        if pid not in self._kept:
            plan = self._plan_of(pid)
            self.state.save_plan(pid, plan.name, plan.data, plan.ports)
            self._kept.add(pid)
        self.state.save_holders(pid, [*self._holders.get(pid, ()), owner])
        super().add(pid, owner)

    def remove(self, pid: str, owner: ClientId) -> bool:
        if not self.holds(pid, owner):
            return False
        left = [o for o in self._holders[pid] if o != owner]
        if left:
            self.state.save_holders(pid, left)
        else:
            self.state.remove_plan(pid)
            self._kept.discard(pid)
        return super().remove(pid, owner)

    def restore(self, pid: str, owners: Iterable[ClientId]) -> None:
        self._kept.add(pid)
        for owner in owners:
            super().add(pid, owner)


class ReplyGate:
    """Group commit for the supervisor's loop (worker/supervisor.py calls :meth:`install` once and
    :meth:`flush` after each step). While a change waits in the state directory every reply is held, in
    order; a flush makes the burst's changes durable at once (StateDir.commit: one fsync per file, run
    concurrently, then one per directory) and sends the held replies. A reply never leaves before the
    writes of its request are durable, and many requests that came together share one commit."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.held: list[tuple[Any, Any]] = []
        self._send: Callable[[Any, Any], None] | None = None

    def install(self, server: Any) -> ReplyGate | None:
        """Route ``server.send`` through the gate and stage the directory's writes (None: nothing to group,
        as with ``--state-sync none``, whose writes cost no fsync)."""
        self.state.group()
        if not self.state.grouped:
            return None
        self._send = server.send
        server.send = self.send
        return self

    def send(self, peer: Any, reply: Any) -> None:
        if self.held or self.state.dirty:
            self.held.append((peer, reply))
        else:
            self._send(peer, reply)  # type: ignore[misc]

    def flush(self) -> None:
        if self.state.dirty:
            self.state.commit()
        if self.held:
            held, self.held = self.held, []
            for peer, reply in held:
                self._send(peer, reply)  # type: ignore[misc]


def attach(service: Service, state: StateDir) -> Restored:
    """Make ``service`` keep its state in ``state`` and restore what is there (before it serves anything)."""
    from planwire.worker.jobs import Plan

    store = service.store
    owners = DurableOwners(state, curve=service.owners.curve, idle_ttl=service.owners.idle_ttl)
    holders = DurableHolders(state, lambda pid: service.plans[pid])
    service.owners, service.holders = owners, holders

    session, new = state.load_session(service.session)
    service.session = session
    done = Restored(session=session, new=new)
    seen: set[ClientId] = set()
    for pid, name, data, ports, any_rank, held_by in state.load_plans(service.limits.max_plan_bytes):
        try:
            analysed = flow.analyze(data, [n for n, _, _ in ports.inputs], [n for n, _, _ in ports.outputs])
        except Exception as e:  # a plan that passed the checks but not the flow analysis: not restored
            state.skip(state.plans / f"{pid}.plan", f"data flow: {type(e).__name__}: {e}")
            continue
        service.plans[pid] = Plan(name, data, ports)
        service.flows[pid] = analysed
        if any_rank:
            service._any_rank[pid] = any_rank
        holders.restore(pid, held_by)
        seen.update(held_by)
        done.plans += 1
    own = {key for key, _ in store.own()}
    store.observer = None  # what is read back is not written again
    for owner, key, h, array, kept in state.load_tensors():
        if key in own:
            state.skip(state.tensor_path(owner, key), f"key {key!r} is now the worker's own data")
            continue
        if array is None:
            store.fail(owner, key, h.failed or "")
            done.failed += 1
        else:
            pending = _pending(service.releaser, kept, key)
            store.put(owner, key, array, h.tags, private=h.private, pending=pending, rows=h.rows)
            done.releases += pending is not None
            done.tensors += 1
            done.tensor_bytes += array.nbytes
        seen.add(owner)
    store.observer = tensors = DurableTensors(state)
    try:
        spent = state.load_spent()
    except ValueError as e:  # logged; never served as a clean slate
        service.releaser.blocked = str(e)
    else:
        service.releaser.restore(spent)
        done.budgets = len(spent)
    service.releaser.journal = tensors
    service.durable = ReplyGate(state)
    tokens = state.load_tokens()
    owners.restore(tokens, seen)
    done.identities = len(tokens)
    done.owners = len(seen | set(tokens.values()))
    done.skipped = len(state.skipped)
    if store.max_bytes is not None and store.bytes > store.max_bytes:
        log.warning("--state-dir: restored %d bytes of tensors, over --max-store-mb: new puts are refused", store.bytes)
    if service.max_plans is not None and len(service.plans) > service.max_plans:
        log.warning("--state-dir: restored %d plans, over --max-plans: new plans are refused", len(service.plans))
    return done
