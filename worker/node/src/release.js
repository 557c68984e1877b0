// Releases: the only way a result computed from private data leaves the worker, by the owner's policy
// (as worker/release.py).
//
// A run of an approved plan (policy.js) that reads private data stores each private output with a Pending
// release: what its rule allows (`as_is` or `update`), the base of an update (the parameter as the client
// last stored it) and the fewest rows of private data its computation read. The first read (get, fetch,
// inline_max) computes the released value once (clip and noise for an update), records it in the audit
// log and the client's privacy accounting, and every later read of that result returns the same value:
// reading twice never averages the noise away.

import { ProtocolError } from "./messages.js";
import { Tensor, DTYPES } from "./codec.js";
import { pyRepr } from "./json.js";
import { log } from "./log.js";
import { label } from "./owners.js";
import { pyFloat, pyG, pyValue } from "./policy.js";
import { AuditLog, PyFloat } from "./audit.js";
import { RdpAccountant, epsilonOf, gaussian, plus } from "./dp.js";

export class Pending {
  constructor(rule, output, how, base, rows) {
    Object.assign(this, { rule, output, how, base, rows, released: null });
  }

  /** Whether a read may release it (enough rows for the rule's min_batch). */
  get ready() {
    return this.rows >= this.rule.minBatch;
  }
}

export const PRIVATE_TEXT =
  "was computed from this worker's private data: it may be described and used by later runs, but never " +
  "leaves the worker (only a run of a plan the data owner approved in plan-worker --policy releases results)";

export class Releaser {
  constructor(policy = null, audit = null) {
    this.policy = policy; // replaced whole on reload (SIGHUP)
    this.log = new AuditLog(audit);
    this.accountants = new Map(); // owner -> RdpAccountant
    this.events = new Map(); // owner -> Map(noise multiplier -> noised releases made to it)
    this.total = new Map(); // every owner's noised releases together (this.events summed, kept as they change)
    this.journal = null; // --state-dir (src/durable.js): {spent(events), released(client, key, entry)}
    this.blocked = ""; // why no noised release can be made (its accounting could not be restored)
  }

  close() {
    this.log.close();
  }

  /** The releases a run of plan `pid` on private data may make, by output index; refuses (private_data)
   * a run whose inputs break the rule's bounds, before it runs. `privateArgs`: Map index -> entry. */
  prepare(pid, planName, inputs, outputs, args, privateArgs, privateOutputs, client) {
    const rule = this.policy?.rules.get(pid);
    const out = new Map();
    if (rule === undefined) return out;
    for (const [name, bound] of rule.inputs) {
      const at = inputs.indexOf(name);
      if (at < 0) continue; // the rule names an input this plan does not have: nothing to check
      const values = numbers(args[at]);
      const why = values.length !== 1 ? "must be a single number" : bound.check(values[0]);
      if (why) {
        const got = "[" + values.slice(0, 4).map((v) => show(args[at].dtype, v)).join(", ") + "]";
        const message =
          `plan ${pyRepr(planName)} is approved by the data owner's policy only with input ${pyRepr(name)} ${bound}: ` +
          `this run's ${why} (got ${got}); nothing ran`;
        this.audit("refused", client, rule, planName, [], [], { reason: message });
        throw new ProtocolError("private_data", message);
      }
    }
    let rows = Infinity;
    for (const e of privateArgs.values()) rows = Math.min(rows, e.rows);
    if (rows === Infinity) rows = 0;
    for (const i of privateOutputs) {
      const how = rule.outputs.get(outputs[i]);
      if (how === undefined) continue;
      let base = null;
      if (how.how === "update") {
        const j = inputs.indexOf(how.param);
        if (j < 0) continue;
        const before = privateArgs.get(j);
        if (before === undefined) base = args[j]; // the client's own value: the update is measured from it
        else if (before.pending instanceof Pending && before.pending.rule === rule && before.pending.base !== null) {
          base = before.pending.base; // a chain of steps of this plan: from where the client left it
        } else continue; // no base the client knows: no update can be released
      }
      out.set(i, new Pending(rule, outputs[i], how, base, rows));
    }
    return out;
  }

  /** The value of a private-derived result that may leave, computed once; ProtocolError otherwise. */
  release(client, key, entry) {
    const pending = entry.pending;
    if (!(pending instanceof Pending)) {
      const message = `tensor ${pyRepr(key)} ${PRIVATE_TEXT}`;
      this.audit("refused", client, null, "", [key], [entry.tensor], { reason: message });
      throw new ProtocolError("private_data", message);
    }
    if (pending.released !== null) return pending.released;
    const rule = pending.rule;
    if (pending.rows < rule.minBatch) {
      const message =
        `tensor ${pyRepr(key)} (${pyRepr(pending.output)} of plan ${pyRepr(rule.name || rule.fingerprint.slice(0, 12))}) was computed on ` +
        `${pending.rows} rows of private data; the data owner's policy releases it only from ${rule.minBatch}`;
      this.audit("refused", client, rule, rule.name, [pending.output], [entry.tensor], { reason: message });
      throw new ProtocolError("private_data", message);
    }
    let noise = 0;
    let value = entry.tensor;
    let events = null;
    if (pending.how.how === "update") {
      noise = rule.noiseMultiplier;
      if (noise) events = this.charge(client, key, entry, pending, noise); // before any noise is drawn
      value = this.update(key, entry.tensor, pending);
    }
    let epsilon = null;
    if (events !== null) {
      this.journal?.spent(new Map([...this.events, [client, events]])); // durable first: a crash can only overcount
      epsilon = this.account(client, events);
    }
    pending.released = value;
    this.journal?.released(client, key, entry);
    this.audit("released", client, rule, rule.name, [pending.output], [value], { noise, epsilon });
    return value;
  }

  update(key, tensor, pending) {
    const base = pending.base;
    if (!FLOATS.has(tensor.dtype) || base === null || base.shape.join() !== tensor.shape.join()) {
      throw new ProtocolError("private_data", `tensor ${pyRepr(key)}: an update is released only for floating-point parameters`);
    }
    const rule = pending.rule;
    const now = toDoubles(tensor);
    const was = toDoubles(base);
    const delta = now.map((v, i) => v - was[i]);
    if (rule.clipNorm !== null) {
      let sq = 0;
      for (const d of delta) sq += d * d;
      const norm = Math.sqrt(sq);
      if (norm > rule.clipNorm) for (let i = 0; i < delta.length; i++) delta[i] *= rule.clipNorm / norm;
    }
    if (rule.noiseMultiplier) {
      const z = gaussian(delta.length);
      const std = rule.noiseMultiplier * rule.clipNorm;
      for (let i = 0; i < delta.length; i++) delta[i] += std * z[i];
    }
    return fromDoubles(tensor.dtype, tensor.shape, delta);
  }

  /** The client's noised releases with one more at `noise`; refuses (private_data) one past the policy's
   * max_epsilon, or any while the accounting kept in --state-dir could not be restored. */
  charge(client, key, entry, pending, noise) {
    const rule = pending.rule;
    const events = new Map(this.events.get(client) ?? []);
    events.set(noise, (events.get(noise) ?? 0) + 1);
    const delta = this.policy?.delta ?? 1e-5;
    const budget = this.policy?.maxEpsilon ?? null;
    let message = "";
    if (this.blocked) {
      message =
        `tensor ${pyRepr(key)} is a noised update, and ${this.blocked}: no noised release is made until the worker's ` +
        "operator repairs that record (or removes it, which resets every client's spent budget)";
    } else if (budget !== null) {
      // the data's budget: every client's noised releases composed (a reconnecting client gets no fresh one),
      // from the running total: a release costs nothing per client
      const total = epsilonOf(plus(this.total, new Map([[noise, 1]])), delta);
      if (total > budget) {
        const spent = epsilonOf(this.total, delta);
        message =
          `tensor ${pyRepr(key)} (${pyRepr(pending.output)} of plan ${pyRepr(rule.name || rule.fingerprint.slice(0, 12))}) ` +
          `would take the privacy budget of the worker's data (all clients' noised releases) to epsilon ${pyG(total, 4)} ` +
          `(spent so far: ${pyG(spent, 4)}, at delta ${pyG(delta)}), past the data owner's max_epsilon of ${pyG(budget)}: ` +
          "not released";
      }
    }
    if (message) {
      this.audit("refused", client, rule, rule.name, [pending.output], [entry.tensor], { reason: message });
      throw new ProtocolError("private_data", message);
    }
    return events;
  }

  /** The client's epsilon (at the policy's delta) after exactly `events` Gaussian releases (each counted in
   * full: no amplification by sampling is assumed), as dp-accounting's RDP accountant computes it. */
  account(client, events) {
    const acc = new RdpAccountant();
    for (const [noise, count] of [...events].sort((a, b) => a[0] - b[0])) acc.composeGaussian(noise, count);
    this.total = plus(this.total, events, this.events.get(client));
    this.events.set(client, events);
    this.accountants.set(client, acc);
    return acc.epsilon(this.policy?.delta ?? 1e-5);
  }

  /** The accounting a state directory kept (src/durable.js), before anything is served. */
  restore(spent) {
    for (const [client, events] of spent) if (events.size) this.account(client, events);
  }

  /** client -> [releases made to it, its epsilon spent (null: no noised release)], for plan-worker status. */
  spent() {
    const out = new Map();
    for (const [client, n] of this.releases ?? new Map()) out.set(client, [n, null]);
    for (const [client, acc] of this.accountants) {
      out.set(client, [out.get(client)?.[0] ?? 0, acc.epsilon(this.policy?.delta ?? 1e-5)]);
    }
    return out;
  }

  /** One audit record (and a log line for a release), in the fields of the Python worker's. */
  audit(event, client, rule, planName, outputs, tensors, { noise = 0, epsilon = null, reason = "" } = {}) {
    if (event === "released") {
      this.releases ??= new Map();
      this.releases.set(client, (this.releases.get(client) ?? 0) + 1);
    }
    const record = {
      time: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
      event,
      client: label(client),
      plan: rule ? rule.fingerprint : "",
      plan_name: planName,
      outputs: [...outputs],
      shapes: tensors.map((t) => [...t.shape]),
      bytes: tensors.reduce((n, t) => n + t.nbytes, 0),
      rule: rule ? rule.describe() : "none",
    };
    if (noise) {
      record.noise_multiplier = new PyFloat(noise);
      record.clip_norm = rule && rule.clipNorm !== null ? new PyFloat(rule.clipNorm) : null;
    }
    if (epsilon !== null) {
      record.epsilon = new PyFloat(epsilon);
      record.delta = new PyFloat(this.policy?.delta ?? 1e-5);
    }
    if (reason) record.reason = reason;
    if (event === "released") {
      log.info(`released ${pyValue(record.outputs)} of plan ${pyRepr(planName)} to client ${record.client} (${record.rule})`);
    }
    this.log.write(record);
  }
}

const FLOATS = new Set(["float", "double", "float16"]);

/** A tensor's values as JS numbers (bigints for 64-bit integers converted). */
/** Epsilon at `delta` after exactly `events` (noise multiplier -> count) Gaussian releases. */
function numbers(t) {
  const dt = DTYPES[t.dtype];
  const buf = Buffer.from(t.data); // aligned copy
  if (t.dtype === "float16") return Array.from(new Uint16Array(buf.buffer, buf.byteOffset, buf.length / 2), halfToFloat);
  return Array.from(new dt.view(buf.buffer, buf.byteOffset, buf.length / dt.size), Number);
}

/** One value as Python's list repr shows it (floats 2.0, bools True). */
function show(dtype, v) {
  if (FLOATS.has(dtype)) return pyFloat(v);
  if (dtype === "bool") return v ? "True" : "False";
  return String(v);
}

function toDoubles(t) {
  return Float64Array.from(numbers(t));
}

function fromDoubles(dtype, shape, values) {
  let view;
  if (dtype === "double") view = Float64Array.from(values);
  else if (dtype === "float") view = Float32Array.from(values);
  else view = Uint16Array.from(values, floatToHalf);
  return new Tensor(dtype, [...shape], Buffer.from(view.buffer, view.byteOffset, view.byteLength));
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

function floatToHalf(x) {
  // round to nearest even through float32 bits
  const f32 = new Float32Array([x]);
  const u = new Uint32Array(f32.buffer)[0];
  const sign = (u >> 16) & 0x8000;
  const exp = (u >> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}
