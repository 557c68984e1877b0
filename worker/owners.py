"""Owners: who a request comes from, which plans each client holds, and freeing clients long gone.

An owner is a stable identity, not a connection:

* with CURVE, the client's public key (ZAP's ``User-Id``): ``k:<z85 key>``;
* without CURVE, the first connection it came on (``c:<routing id>``), to which the worker issues an
  identity at ``hello`` (a 256-bit random token in ``welcome``). The client presents it again in the
  ``hello`` after a reconnect: the new connection then acts for the same owner and the client keeps its
  objects. Only identities this worker issued (and has not expired) are accepted; with any other, the
  connection keeps its own owner and gets a new identity.

Owners not seen for ``idle_ttl`` seconds are freed (their tensors and plan holdings), with a log line.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable

from planwire.worker.store import ClientId

log = logging.getLogger("planwire.worker")

DAY = 86_400.0


@functools.lru_cache(maxsize=4096)  # named on every request (stats): a lookup, not a decode
def label(owner: ClientId) -> str:
    """A short printable name of an owner for logs and the audit log (never the token itself)."""
    kind, _, rest = owner.partition(b":")
    if kind == b"k":
        return "key:" + rest.decode("ascii", "replace")
    return "conn:" + rest.hex()


class Owners:
    """Maps connections to owners and tracks when each owner was last seen."""

    def __init__(self, *, curve: bool = False, idle_ttl: float | None = DAY) -> None:
        self.curve = curve
        self.idle_ttl = idle_ttl
        self._by_conn: dict[bytes, ClientId] = {}  # connection -> owner, bound by hello (no CURVE)
        self._by_token: dict[str, ClientId] = {}  # identities this worker issued -> their owners
        self._token_of: dict[ClientId, str] = {}
        self.last_seen: dict[ClientId, float] = {}
        self._next_sweep = time.monotonic() + self._period()

    def _period(self) -> float:
        return 60.0 if self.idle_ttl is None else min(60.0, max(self.idle_ttl / 4, 0.05))

    def owner(self, conn: bytes) -> ClientId:
        """The owner behind ``conn`` (the server's client id: routing id, or CURVE User-Id)."""
        if self.curve:
            return b"k:" + conn
        return self._by_conn.get(conn) or b"c:" + conn

    def hello(self, conn: bytes, presented: str) -> tuple[ClientId, str]:
        """Bind ``conn`` to an owner at hello: the one of a presented identity this worker issued, else the
        connection's own owner (objects made before the hello stay its), to which an identity is issued.
        Returns (owner, identity for welcome: empty with CURVE, where the key is the identity)."""
        if self.curve:
            return b"k:" + conn, ""
        owner = self._by_token.get(presented) if presented else None
        if owner is None:
            if presented:
                log.info("a client presented an unknown or expired identity: it gets a new one")
            owner = self.owner(conn)
            token = self._token_of.get(owner)
            if token is None:
                token = self._token_of[owner] = secrets.token_urlsafe(32)
                self._by_token[token] = owner
        else:
            token = presented
        self._by_conn[conn] = owner
        self.last_seen[owner] = time.monotonic()
        return owner, token

    def seen(self, owner: ClientId, free: Callable[[ClientId], None]) -> None:
        """Note a request of ``owner``; now and then, ``free`` every owner idle past the TTL."""
        now = time.monotonic()
        self.last_seen[owner] = now
        if now >= self._next_sweep:
            self._next_sweep = now + self._period()
            if self.idle_ttl is not None:
                self.sweep(now, free)

    def sweep(self, now: float, free: Callable[[ClientId], None]) -> list[ClientId]:
        """Free the owners not seen for ``idle_ttl`` seconds; returns them."""
        assert self.idle_ttl is not None
        gone = [o for o, t in self.last_seen.items() if now - t > self.idle_ttl]
        if not gone:
            return gone
        dead = set(gone)
        for owner in gone:
            del self.last_seen[owner]
            token = self._token_of.pop(owner, None)
            if token is not None:
                del self._by_token[token]
            free(owner)
        self._by_conn = {c: o for c, o in self._by_conn.items() if o not in dead}
        return gone


class PlanHolders:
    """Which owners registered each plan: a plan is visible only to them, while identical bytes share one
    loaded session inside the worker."""

    def __init__(self) -> None:
        self._holders: dict[str, set[ClientId]] = {}

    def add(self, pid: str, owner: ClientId) -> None:
        self._holders.setdefault(pid, set()).add(owner)

    def holds(self, pid: str, owner: ClientId) -> bool:
        holders = self._holders.get(pid)
        return holders is not None and owner in holders

    def remove(self, pid: str, owner: ClientId) -> bool:
        """Drop ``owner``'s hold; True when nobody holds the plan any more."""
        holders = self._holders.get(pid)
        if holders is None or owner not in holders:
            return False
        holders.discard(owner)
        if holders:
            return False
        del self._holders[pid]
        return True

    def drop_owner(self, owner: ClientId) -> list[str]:
        """Drop every hold of ``owner``; returns the plans nobody holds any more."""
        return [pid for pid in [p for p, h in self._holders.items() if owner in h] if self.remove(pid, owner)]

    def count(self, owner: ClientId) -> int:
        return sum(owner in h for h in self._holders.values())
