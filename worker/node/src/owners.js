// Owners: who a request comes from, which plans each client holds, and freeing clients long gone
// (as worker/owners.py).
//
// An owner is a stable identity, not a connection: the first connection a client came on ("c:" + its
// routing id in hex), to which the worker issues an identity at `hello` (a 256-bit random token in
// `welcome`). The client presents it again in the `hello` after a reconnect: the new connection then acts
// for the same owner and the client keeps its objects. Only identities this worker issued (and has not
// expired) are accepted; with any other, the connection keeps its own owner and gets a new identity.
//
// Under CURVE too: zeromq.js does not expose a message's ZAP `User-Id`, so this worker cannot tell which
// admitted key a connection authenticated with; it issues identities as without CURVE (PROTOCOL.md §12).
//
// Owners not seen for `idleTtl` seconds are freed (their tensors and plan holdings), with a log line.

import { randomBytes } from "node:crypto";
import { log } from "./log.js";

export const DAY = 86_400;

/** A short printable name of an owner for logs and the audit log (never the token itself). */
export function label(owner) {
  return owner.startsWith("c:") ? "conn:" + owner.slice(2) : owner;
}

export class Owners {
  constructor({ idleTtl = DAY } = {}) {
    this.idleTtl = idleTtl; // seconds, or null: never
    this.byConn = new Map(); // connection -> owner, bound by hello
    this.byToken = new Map(); // identities this worker issued -> their owners
    this.tokenOf = new Map();
    this.lastSeen = new Map(); // owner -> performance.now() / 1000
    this.lastConn = null; // owner()'s last unbound connection, and its owner
    this.lastOwn = "";
    this.nextSweep = now() + this.period();
  }

  period() {
    return this.idleTtl === null ? 60 : Math.min(60, Math.max(this.idleTtl / 4, 0.05));
  }

  /** The owner behind `conn` (the routing id, hex). */
  owner(conn) {
    const bound = this.byConn.get(conn);
    if (bound !== undefined) return bound;
    // the connection's own owner, made once per connection in a row: one string whose hash Maps keep
    if (conn !== this.lastConn) (this.lastConn = conn), (this.lastOwn = "c:" + conn);
    return this.lastOwn;
  }

  /** The live owner behind `conn`, or null when it was freed (--idle-ttl) or never seen. */
  liveOwner(conn) {
    const owner = this.owner(conn);
    return this.lastSeen.has(owner) ? owner : null;
  }

  /** Every live owner with the seconds since it was last seen. */
  idle() {
    const t = now();
    return [...this.lastSeen].map(([owner, seen]) => [owner, t - seen]);
  }

  /** Bind `conn` to an owner at hello: the one of a presented identity this worker issued, else the
   * connection's own owner (objects made before the hello stay its), to which an identity is issued.
   * Returns [owner, identity]. */
  hello(conn, presented) {
    let owner = presented ? this.byToken.get(presented) : undefined;
    let token = presented;
    if (owner === undefined) {
      if (presented) log.info("a client presented an unknown or expired identity: it gets a new one");
      owner = this.owner(conn);
      token = this.tokenOf.get(owner);
      if (token === undefined) {
        token = randomBytes(32).toString("base64url");
        this.tokenOf.set(owner, token);
        this.byToken.set(token, owner);
      }
    }
    this.byConn.set(conn, owner);
    this.lastSeen.set(owner, now());
    return [owner, token];
  }

  /** Note a request of `owner`; now and then, `free` every owner idle past the TTL. */
  seen(owner, free) {
    const t = now();
    this.lastSeen.set(owner, t);
    if (t >= this.nextSweep) {
      this.nextSweep = t + this.period();
      if (this.idleTtl !== null) this.sweep(t, free);
    }
  }

  /** Free the owners not seen for `idleTtl` seconds; returns them. */
  sweep(t, free) {
    const gone = [...this.lastSeen].filter(([, seen]) => t - seen > this.idleTtl).map(([o]) => o);
    if (!gone.length) return gone;
    const dead = new Set(gone);
    for (const owner of gone) {
      this.lastSeen.delete(owner);
      const token = this.tokenOf.get(owner);
      if (token !== undefined) {
        this.tokenOf.delete(owner);
        this.byToken.delete(token);
      }
      free(owner);
    }
    for (const [conn, owner] of this.byConn) if (dead.has(owner)) this.byConn.delete(conn);
    return gone;
  }
}

/** Which owners registered each plan: a plan is visible only to them, while identical bytes share one
 * loaded session inside the worker. */
export class PlanHolders {
  constructor() {
    this.holders = new Map(); // plan id -> Set of owners
  }

  add(pid, owner) {
    let h = this.holders.get(pid);
    if (h === undefined) this.holders.set(pid, (h = new Set()));
    h.add(owner);
  }

  holds(pid, owner) {
    const h = this.holders.get(pid);
    return h !== undefined && h.has(owner);
  }

  /** Drop `owner`'s hold; true when nobody holds the plan any more. */
  remove(pid, owner) {
    const h = this.holders.get(pid);
    if (h === undefined || !h.has(owner)) return false;
    h.delete(owner);
    if (h.size) return false;
    this.holders.delete(pid);
    return true;
  }

  /** Drop every hold of `owner`; returns the plans nobody holds any more. */
  dropOwner(owner) {
    const held = [...this.holders].filter(([, h]) => h.has(owner)).map(([p]) => p);
    return held.filter((pid) => this.remove(pid, owner));
  }
}

function now() {
  return performance.now() / 1000;
}
