// The worker's tensors by key, with tags, ownership, quotas and remembered failures (as worker/store.py).
// Every method validates before it mutates, so a refused request loses nothing.

import { ProtocolError } from "./messages.js";
import { pyRepr } from "./json.js";

const MB = 1 << 20;
const mb = (n) => (n < 10 * MB ? `${(n / MB).toFixed(1)} MiB` : `${Math.floor(n / MB)} MiB`);

export class Store {
  constructor({ isPublic = false, maxBytes = null, maxClientBytes = null } = {}) {
    this.public = isPublic;
    this.maxBytes = maxBytes;
    this.maxClientBytes = maxClientBytes;
    this.bytes = 0;
    this.byClient = new Map();
    this.tensors = new Map(); // key -> {tensor, tags, private, owner}
    this.failed = new Map(); // key -> why
  }

  get size() {
    return this.tensors.size;
  }

  checkWritable(keys) {
    for (const key of keys) {
      const e = this.tensors.get(key);
      if (e && e.private) {
        throw new ProtocolError("forbidden", `tensor ${pyRepr(key)} is this worker's own data and cannot be overwritten`);
      }
    }
  }

  checkQuota(client, sizes, what) {
    if (this.maxBytes === null && this.maxClientBytes === null) return;
    const fresh = new Map(sizes);
    let total = 0;
    for (const n of fresh.values()) total += n;
    let mine = total;
    for (const key of fresh.keys()) {
      const old = this.tensors.get(key);
      if (old && !old.private) {
        total -= old.tensor.nbytes;
        if (old.owner === client) mine -= old.tensor.nbytes;
      }
    }
    if (this.maxBytes !== null && this.bytes + total > this.maxBytes) {
      throw new ProtocolError(
        "quota_exceeded",
        `${what} needs ${mb(total)} more, but the worker's store holds ${mb(this.bytes)} of its limit of ` +
          `${mb(this.maxBytes)}: get or delete tensors first, or start plan-worker with a larger --max-store-mb`,
      );
    }
    const held = this.byClient.get(client) ?? 0;
    if (this.maxClientBytes !== null && held + mine > this.maxClientBytes) {
      throw new ProtocolError(
        "quota_exceeded",
        `${what} needs ${mb(mine)} more, but this client's tensors take ${mb(held)} of its limit of ` +
          `${mb(this.maxClientBytes)}: get or delete tensors first, or start plan-worker with a larger ` +
          "--max-client-store-mb",
      );
    }
  }

  put(key, tensor, tags = [], { isPrivate = false, owner = "" } = {}) {
    this.pop(key);
    this.tensors.set(key, { tensor, tags: [...tags], private: isPrivate, owner });
    if (!isPrivate) {
      this.bytes += tensor.nbytes;
      this.byClient.set(owner, (this.byClient.get(owner) ?? 0) + tensor.nbytes);
    }
    this.failed.delete(key);
  }

  pop(key) {
    const e = this.tensors.get(key);
    if (e === undefined) return;
    this.tensors.delete(key);
    if (!e.private) {
      this.bytes -= e.tensor.nbytes;
      const left = this.byClient.get(e.owner) - e.tensor.nbytes;
      if (left) this.byClient.set(e.owner, left);
      else this.byClient.delete(e.owner);
    }
  }

  fail(key, why) {
    this.pop(key);
    this.failed.set(key, why);
  }

  entry(key) {
    const e = this.tensors.get(key);
    if (e !== undefined) return e;
    const why = this.failed.get(key);
    if (why !== undefined) throw new ProtocolError("run_failed", why);
    throw new ProtocolError(
      "unknown_tensor",
      `no tensor ${pyRepr(key)} on this worker (never stored, deleted, or already moved by get)`,
    );
  }

  take(keys, keep) {
    const entries = keys.map((k) => this.entry(k));
    keys.forEach((key, i) => {
      if (entries[i].private && !this.public) {
        throw new ProtocolError(
          "forbidden",
          `tensor ${pyRepr(key)} is this worker's own data: it may be used by plans but never leaves the worker`,
        );
      }
    });
    if (!keep) keys.forEach((key, i) => entries[i].private || this.pop(key));
    return entries.map((e) => e.tensor);
  }

  delete(keys) {
    for (const key of keys) {
      const e = this.tensors.get(key);
      if (e && e.private) {
        throw new ProtocolError("forbidden", `tensor ${pyRepr(key)} is this worker's own data and cannot be deleted`);
      }
    }
    for (const key of keys) {
      this.pop(key);
      this.failed.delete(key);
    }
  }

  search(tags) {
    const out = [];
    for (const [k, e] of this.tensors) if (tags.every((t) => e.tags.includes(t))) out.push([k, e]);
    return out;
  }
}
