// The worker's tensors by owner and key, with tags, privacy, quotas and remembered failures (as
// worker/store.py). Every method validates before it mutates, so a refused request loses nothing.
//
// Every client has a key space of its own: it sees, reads, overwrites, moves and deletes only its own
// tensors, and another client's key reads exactly like a missing one. Beside them sits the worker's own
// data (--data), visible to every client and marked as the worker's: plans may read it, no client may
// overwrite or delete it, and a client's key may not shadow it. Private tensors never leave the worker:
// its own data (unless it was started public) and every result derived from private data (flow.js).
// Quotas count clients' tensors in total and per client; the worker's own data is not counted.

import { ProtocolError } from "./messages.js";
import { pyRepr } from "./json.js";
import { PRIVATE_TEXT } from "./release.js";

const MB = 1 << 20;
const mb = (n) => (n < 10 * MB ? `${(n / MB).toFixed(1)} MiB` : `${Math.floor(n / MB)} MiB`);

/** {tensor, tags, private, worker, pending, rows}: `rows` is a private tensor's fewest rows of the
 * worker's data it was computed from (its own: its leading axis); `pending` its release (release.js). */
function entry(tensor, tags, { isPrivate = false, worker = false, pending = null, rows = 0 } = {}) {
  return { tensor, tags: [...tags], private: isPrivate, worker, pending, rows };
}

export class Store {
  constructor({ isPublic = false, maxBytes = null, maxClientBytes = null } = {}) {
    this.public = isPublic;
    this.maxBytes = maxBytes;
    this.maxClientBytes = maxClientBytes;
    this.bytes = 0; // clients' tensors, all together
    this.byClient = new Map();
    this.own = new Map(); // the worker's own data: key -> entry
    this.spaces = new Map(); // client -> Map(key -> entry)
    this.failed = new Map(); // client -> Map(output key -> why the run that made it failed)
  }

  /** Every stored tensor as [owner, entry]: the worker's own data (owner null) first, then each client's. */
  *entries() {
    for (const e of this.own.values()) yield [null, e];
    for (const [client, space] of this.spaces) for (const e of space.values()) yield [client, e];
  }

  get size() {
    let n = this.own.size;
    for (const s of this.spaces.values()) n += s.size;
    return n;
  }

  /** One of the worker's own tensors (at start): private unless the worker is public. */
  putOwn(key, tensor, tags = []) {
    const rows = tensor.shape.length ? tensor.shape[0] : 1;
    this.own.set(key, entry(tensor, tags, { isPrivate: !this.public, worker: true, rows }));
  }

  /** Refuse to overwrite the worker's own data (a client's key may not shadow it). */
  checkWritable(keys) {
    for (const key of keys) {
      if (this.own.has(key)) {
        throw new ProtocolError("forbidden", `tensor ${pyRepr(key)} is this worker's own data and cannot be overwritten`);
      }
    }
  }

  /** quota_exceeded unless storing [key, nbytes] items for `client` keeps both caps (a key listed twice
   * counts once, with its last size; what a key held before is given back). */
  checkQuota(client, sizes, what) {
    if (this.maxBytes === null && this.maxClientBytes === null) return;
    // proven by a bound first (every item new, none giving bytes back: never less than the exact count)
    let bound = 0;
    for (const item of sizes) bound += item[1];
    const held = this.byClient.get(client) ?? 0;
    if ((this.maxBytes === null || this.bytes + bound <= this.maxBytes) && (this.maxClientBytes === null || held + bound <= this.maxClientBytes)) return;
    const fresh = new Map(sizes);
    let mine = 0;
    for (const n of fresh.values()) mine += n;
    const space = this.spaces.get(client);
    for (const key of fresh.keys()) {
      const old = space?.get(key);
      if (old !== undefined) mine -= old.tensor.nbytes;
    }
    if (this.maxBytes !== null && this.bytes + mine > this.maxBytes) {
      throw new ProtocolError(
        "quota_exceeded",
        `${what} needs ${mb(mine)} more, but the worker's store holds ${mb(this.bytes)} of its limit of ` +
          `${mb(this.maxBytes)}: get or delete tensors first, or start plan-worker with a larger --max-store-mb`,
      );
    }
    if (this.maxClientBytes !== null && held + mine > this.maxClientBytes) {
      throw new ProtocolError(
        "quota_exceeded",
        `${what} needs ${mb(mine)} more, but this client's tensors take ${mb(held)} of its limit of ` +
          `${mb(this.maxClientBytes)}: get or delete tensors first, or start plan-worker with a larger ` +
          "--max-client-store-mb",
      );
    }
  }

  /** Store `client`'s tensor (after checkWritable and checkQuota). */
  put(client, key, tensor, tags = [], { isPrivate = false, pending = null, rows = 0 } = {}) {
    this.pop(client, key);
    let space = this.spaces.get(client);
    if (space === undefined) this.spaces.set(client, (space = new Map()));
    space.set(key, entry(tensor, tags, { isPrivate, pending, rows }));
    this.bytes += tensor.nbytes;
    this.byClient.set(client, (this.byClient.get(client) ?? 0) + tensor.nbytes);
    this.failed.get(client)?.delete(key);
  }

  /** Remove `client`'s `key` and give its bytes back. */
  pop(client, key) {
    const space = this.spaces.get(client);
    const e = space?.get(key);
    if (e === undefined) return;
    space.delete(key);
    this.bytes -= e.tensor.nbytes;
    const left = this.byClient.get(client) - e.tensor.nbytes;
    if (left) this.byClient.set(client, left);
    else this.byClient.delete(client);
    if (!space.size) this.spaces.delete(client);
  }

  /** Remember that `client`'s `key` will not come: a later read reports why. */
  fail(client, key, why) {
    this.pop(client, key);
    let failed = this.failed.get(client);
    if (failed === undefined) this.failed.set(client, (failed = new Map()));
    failed.set(key, why);
  }

  entry(client, key) {
    const e = this.spaces.get(client)?.get(key) ?? this.own.get(key);
    if (e !== undefined) return e;
    const why = this.failed.get(client)?.get(key);
    if (why !== undefined) throw new ProtocolError("run_failed", why);
    throw new ProtocolError("unknown_tensor", `no tensor ${pyRepr(key)} on this worker (never stored, deleted, or already moved by get)`);
  }

  /** [entries, tensors that may be sent to `client`]: a private result only through `release` (the
   * owner's policy), the worker's own private data never. */
  readable(client, keys, release = null) {
    const entries = keys.map((k) => this.entry(client, k));
    const values = keys.map((key, i) => {
      const e = entries[i];
      if (!e.private) return e.tensor;
      if (e.worker) {
        throw new ProtocolError("forbidden", `tensor ${pyRepr(key)} is this worker's own data: it may be used by plans but never leaves the worker`);
      }
      if (release !== null) return release(key, e);
      throw new ProtocolError("private_data", `tensor ${pyRepr(key)} ${PRIVATE_TEXT}`);
    });
    return [entries, values];
  }

  /** Tensors for a get; moved out unless `keep` (the worker's own data is copied, never removed). */
  take(client, keys, keep, release = null) {
    const [entries, values] = this.readable(client, keys, release);
    if (!keep) keys.forEach((key, i) => entries[i].worker || this.pop(client, key));
    return values;
  }

  delete(client, keys) {
    const space = this.spaces.get(client);
    for (const key of keys) {
      if (this.own.has(key) && !space?.has(key)) {
        throw new ProtocolError("forbidden", `tensor ${pyRepr(key)} is this worker's own data and cannot be deleted`);
      }
    }
    const failed = this.failed.get(client);
    for (const key of keys) {
      this.pop(client, key);
      failed?.delete(key);
    }
    if (failed !== undefined && !failed.size) this.failed.delete(client);
  }

  /** The worker's own tensors, then `client`'s, that carry all `tags`: [key, entry] pairs. */
  search(client, tags) {
    const out = [];
    const match = (e) => tags.every((t) => e.tags.includes(t));
    for (const [k, e] of this.own) if (match(e)) out.push([k, e]);
    for (const [k, e] of this.spaces.get(client) ?? []) if (match(e)) out.push([k, e]);
    return out;
  }

  /** Forget every tensor of `client`; returns [tensors, bytes] freed. */
  dropClient(client) {
    const space = this.spaces.get(client);
    let n = 0;
    let nbytes = 0;
    for (const key of [...(space?.keys() ?? [])]) {
      nbytes += space.get(key).tensor.nbytes;
      n++;
      this.pop(client, key);
    }
    this.failed.delete(client);
    return [n, nbytes];
  }
}
