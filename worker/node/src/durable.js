// Durable state (`--state-dir DIR`, as worker/state.py): the worker's tensors, failed-run records, plans,
// issued identities and session in DIR (src/statedir.js), so that after kill -9 (or a crash, or a reboot)
// and a restart on the same directory every acknowledged request's effect is back, under the same session:
// clients present their identity again and go on without registering their plans again.
//
// Every change is on disk before the request that made it is answered: the Store, Owners and PlanHolders
// given to the Service here write through to the directory (synchronously, before the handler returns
// its reply), then change memory. Under the server (src/server.js) the writes are a group commit: a
// burst's files are written as its requests are handled, then made durable together (one fsync per file,
// one per changed directory) before the burst's replies leave. A run's outputs reach this process whole
// (src/sandbox.js answers with their bytes), so a result is on the host when it is written. Plans come back lazily: a restored plan's
// session is loaded (in the runner, or here under --no-sandbox) by its first run.
// A private result's pending release is kept with its tensor, and the noised releases each client was given
// in the `privacy` file: a release writes the spent budget first, then the value it released, before it
// returns; a restored result is released as the policy in force at the restart says (its rule found again by
// fingerprint), and the same released value is returned again. Not kept: connections.

import { join } from "node:path";
import { Store } from "./store.js";
import { Owners, PlanHolders } from "./owners.js";
import { Plan } from "./registry.js";
import { ProtocolError } from "./messages.js";
import { DTYPES } from "./codec.js";
import { analyze } from "./flow.js";
import { Pending } from "./release.js";
import { StateDir, StateError, strerror } from "./statedir.js";
import { pyRepr } from "./json.js";
import { log } from "./log.js";

/** A Store whose every change is written to the state directory before it is made in memory. */
class DurableStore extends Store {
  constructor(state, options) {
    super(options);
    this.state = state;
    this.restoring = false;
  }

  checkQuota(client, sizes, what) {
    super.checkQuota(client, sizes, what);
    let nbytes = 0;
    for (const n of new Map(sizes).values()) nbytes += n;
    this.state.checkRoom(nbytes, what);
  }

  put(client, key, tensor, tags = [], options = {}) {
    if (!this.restoring) {
      this.state.saveTensor(client, key, tensor, tags, options.isPrivate ?? false, options.rows ?? 0, kept(options.pending));
    }
    super.put(client, key, tensor, tags, options);
  }

  fail(client, key, why) {
    if (!this.restoring) this.state.saveFailure(client, key, why);
    super.fail(client, key, why);
  }

  take(client, keys, keep, release = null) {
    const values = super.take(client, keys, keep, release);
    if (!keep) {
      const space = this.spaces.get(client);
      this.state.removeTensors(client, [...new Set(keys)].filter((k) => !space?.has(k)));
    }
    return values;
  }

  delete(client, keys) {
    super.delete(client, keys);
    this.state.removeTensors(client, new Set(keys));
  }

  dropClient(client) {
    const freed = super.dropClient(client);
    try {
      this.state.removeOwner(client);
    } catch (e) {
      // freed in memory; its files come back at a restart, to be freed again
      log.error(`--state-dir: cannot remove a freed client's tensors: ${strerror(e)}`);
    }
    return freed;
  }
}

/** A pending release as kept on disk (src/statedir.js), or null. */
function kept(pending) {
  if (!(pending instanceof Pending)) return null;
  const { rule, output, how, rows, base, released } = pending;
  return { plan: rule.fingerprint, output, how: how.how, param: how.param ?? "", rows, base, released };
}

/** A kept release under the rule the policy in force has for its plan (null, logged: never releasable). */
function pendingOf(releaser, k, key) {
  if (k === null) return null;
  const rule = releaser.policy?.rules.get(k.plan);
  const how = rule?.outputs.get(k.output);
  if (how === undefined || how.how !== k.how || (how.param ?? "") !== k.param) {
    log.info(`--state-dir: tensor ${pyRepr(key)} stays private: the policy no longer releases output ${pyRepr(k.output)} of plan ${k.plan.slice(0, 12)} as ${k.how}`);
    return null;
  }
  const pending = new Pending(rule, k.output, how, k.base, k.rows);
  pending.released = k.released;
  return pending;
}

/** Owners whose issued identities are written to the state directory (before welcome is sent). */
class DurableOwners extends Owners {
  constructor(state, options) {
    super(options);
    this.state = state;
  }

  hello(conn, presented) {
    const issued = this.byToken.size;
    const answer = super.hello(conn, presented);
    if (this.byToken.size !== issued) this.state.saveTokens(this.byToken);
    return answer;
  }

  sweep(t, free) {
    const gone = super.sweep(t, free);
    if (gone.length) {
      try {
        this.state.saveTokens(this.byToken);
      } catch (e) {
        // on the way to serving some request: logged, never raised
        log.error(`--state-dir: the freed clients' identities are still on disk: ${e.message}`);
      }
    }
    return gone;
  }

  restore(tokens, owners) {
    const t = performance.now() / 1000; // --idle-ttl counts again from the restart
    for (const [token, owner] of tokens) {
      this.byToken.set(token, owner);
      this.tokenOf.set(owner, token);
    }
    for (const owner of [...tokens.values(), ...owners]) this.lastSeen.set(owner, t);
  }
}

/** PlanHolders whose plans (bytes, ports) and holders are written to the state directory. */
class DurableHolders extends PlanHolders {
  constructor(state, planOf) {
    super();
    this.state = state;
    this.planOf = planOf; // pid -> the service's Plan (name, data, inputs, outputs)
    this.kept = new Set();
  }

  add(pid, owner) {
    if (this.holds(pid, owner)) return;
    if (!this.kept.has(pid)) {
      const plan = this.planOf(pid);
      this.state.savePlan(pid, plan.name, plan.data, plan.inputs, plan.outputs);
      this.kept.add(pid);
    }
    this.state.saveHolders(pid, [...(this.holders.get(pid) ?? []), owner]);
    super.add(pid, owner);
  }

  remove(pid, owner) {
    if (!this.holds(pid, owner)) return false;
    const left = [...this.holders.get(pid)].filter((o) => o !== owner);
    if (left.length) this.state.saveHolders(pid, left);
    else {
      this.state.removePlan(pid);
      this.kept.delete(pid);
    }
    return super.remove(pid, owner);
  }

  /** Drop a freed client's holds (--idle-ttl, on the way to serving a request): a write that fails is
   * logged, and the hold dropped in memory all the same. */
  dropOwner(owner) {
    const gone = [];
    for (const [pid, held] of [...this.holders]) {
      if (!held.has(owner)) continue;
      let last;
      try {
        last = this.remove(pid, owner);
      } catch (e) {
        log.error(`--state-dir: plan ${pid.slice(0, 12)} is still held on disk by a freed client: ${e.message}`);
        last = super.remove(pid, owner);
      }
      if (last) gone.push(pid);
    }
    return gone;
  }

  restore(pid, owners) {
    this.kept.add(pid);
    for (const owner of owners) super.add(pid, owner);
  }
}

/** A restored plan's session: loaded by the worker's runtime (the sandbox, or this process) at first use. */
class RestoredSession {
  constructor(runtime, { pid, name, data, inputs, outputs }) {
    const meta = (ports) => ports.map((p) => ({ name: p.name, isTensor: true, type: DTYPES[p.dtype].ort, shape: p.shape }));
    Object.assign(this, { runtime, pid, name, data, inputMetadata: meta(inputs), outputMetadata: meta(outputs) });
    this.loading = null;
  }

  async session() {
    this.loading ??= this.runtime.load(this.data, { name: this.name, pid: this.pid });
    try {
      return await this.loading;
    } catch (e) {
      this.loading = null;
      if (e instanceof ProtocolError) throw e; // contained: plan_crashed, out_of_memory, plan_timeout, ...
      throw new ProtocolError("bad_plan", `onnxruntime cannot load plan ${this.name} (restored from --state-dir): ${e?.message ?? e}`);
    }
  }

  async run(args, options) {
    return (await this.session()).run(args, options);
  }

  async release() {
    const loading = this.loading;
    this.loading = null;
    if (loading !== null) await (await loading.catch(() => null))?.release();
  }
}

/** Make `service` keep its state in `state` and restore what is there (before it serves anything). */
export function attach(service, state) {
  const old = service.store;
  const store = new DurableStore(state, { isPublic: old.public, maxBytes: old.maxBytes, maxClientBytes: old.maxClientBytes });
  for (const [key, e] of old.own) store.own.set(key, e);
  const owners = new DurableOwners(state, { idleTtl: service.owners.idleTtl });
  const holders = new DurableHolders(state, (pid) => service.plans.get(pid));
  Object.assign(service, { store, owners, holders, durable: state }); // durable: src/server.js's group commit

  const [session, isNew] = state.loadSession(service.session);
  service.session = session;
  const done = { session, isNew, tensors: 0, tensorBytes: 0, failed: 0, plans: 0, owners: 0, identities: 0, skipped: 0 };
  const seen = new Set();
  for (const p of state.loadPlans(service.limits.maxPlanBytes)) {
    let flow;
    try {
      flow = analyze(p.data, p.inputs.map((x) => x.name), p.outputs.map((x) => x.name));
    } catch (e) {
      // a plan that passed the checks but not the flow analysis: not restored
      state.skip(join(state.plans, `${p.pid}.plan`), `data flow: ${e?.name ?? "Error"}: ${e?.message ?? e}`);
      continue;
    }
    const plan = new Plan(p.name, new RestoredSession(service.runtime, p), p.unknownRank);
    Object.assign(plan, { data: p.data, bytes: p.data.length });
    service.plans.set(p.pid, plan);
    service.flows.set(p.pid, flow);
    holders.restore(p.pid, p.holders);
    for (const o of p.holders) seen.add(o);
    done.plans++;
  }
  store.restoring = true;
  try {
    for (const item of state.loadTensors()) {
      const { owner, key, header, tensor } = item;
      if (store.own.has(key)) {
        state.skip(state.tensorPath(owner, key), `key ${pyRepr(key)} is now the worker's own data`);
        continue;
      }
      if (tensor === null) {
        store.fail(owner, key, header.failed);
        done.failed++;
      } else {
        const pending = pendingOf(service.releaser, item.kept, key);
        store.put(owner, key, tensor, header.tags, { isPrivate: header.private, pending, rows: header.rows });
        done.tensors++;
        done.tensorBytes += tensor.nbytes;
      }
      seen.add(owner);
    }
  } finally {
    store.restoring = false;
  }
  const releaser = service.releaser;
  try {
    releaser.restore(state.loadSpent());
  } catch (e) {
    releaser.blocked = e.message; // logged; never served as a clean slate
  }
  releaser.journal = {
    spent: (events) => state.saveSpent(events),
    released: (client, key, e) => state.saveTensor(client, key, e.tensor, e.tags, e.private, e.rows, kept(e.pending)),
  };
  const tokens = state.loadTokens();
  owners.restore(tokens, seen);
  done.identities = tokens.size;
  done.owners = new Set([...seen, ...tokens.values()]).size;
  done.skipped = state.skipped.length;
  if (store.maxBytes !== null && store.bytes > store.maxBytes) {
    log.warning(`--state-dir: restored ${store.bytes} bytes of tensors, over --max-store-mb: new puts are refused`);
  }
  if (service.maxPlans !== null && service.plans.size > service.maxPlans) {
    log.warning(`--state-dir: restored ${service.plans.size} plans, over --max-plans: new plans are refused`);
  }
  return done;
}

/** --state-dir: hold the directory, keep the service's state there and restore what it holds, with the
 * Python worker's log line; StateError (exit status 2) when it cannot be used. Returns the StateDir. */
export function restoreState(service, path, sync) {
  const state = StateDir.open(path, { sync });
  const t0 = performance.now();
  let got;
  try {
    got = attach(service, state);
  } catch (e) {
    state.close();
    // the directory itself unreadable (a damaged file is skipped, not fatal)
    if (typeof e?.syscall === "string") throw new StateError(`--state-dir ${pyRepr(path)}: cannot read it (${strerror(e)})`);
    throw e;
  }
  const skipped = got.skipped ? `; ${got.skipped} damaged entries skipped (see above)` : "";
  log.info(
    `state dir ${state.path} (${sync ? "fsync each change" : "no fsync"}): ${got.isNew ? "new" : "kept"} session ${got.session}; ` +
      `restored ${got.tensors} tensors (${got.tensorBytes} bytes), ${got.failed} failed-run records, ${got.plans} plans, ` +
      `${got.owners} clients (${got.identities} identities)${skipped} in ${((performance.now() - t0) / 1000).toFixed(2)} s`,
  );
  return state;
}

export { StateDir, StateError };
