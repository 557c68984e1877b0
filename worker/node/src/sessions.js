// The sandbox's plans and tensors as they cross to its runner (as worker/handles.py keeps track of the
// Python runner's): a plan's session in the runner (src/runtime.js's session shape; a fresh runner loads the
// plan again from the checked bytes kept here), a run's arguments sent by value or, for a stored tensor over
// INLINE_MAX, once and then by the id the runner keeps it under (a bounded cache, least recently used first
// out, freed once the store drops the tensor), and the runner's answer checked as hostile. A mixin of
// src/sandbox.js's Sandbox: it sends through the sandbox's request queue.

import { ProtocolError } from "./messages.js";
import { fromFrame } from "./codec.js";
import { pyRepr } from "./json.js";
import { clean } from "./log.js";

const INLINE_MAX = 64 << 10; // stored tensors above this stay in the runner once sent


function checkedShape(shape) {
  if (!Array.isArray(shape) || shape.length > 64 || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new Error(`shape ${clean(JSON.stringify(shape) ?? "?")}`);
  }
  return shape;
}

/** A plan's session in the runner: the same shape as src/runtime.js's sessions. */
class SandboxedSession {
  constructor(sandbox, pid, data, name, inputs, outputs) {
    this.sandbox = sandbox;
    this.pid = pid;
    this.data = data; // the checked bytes: a fresh runner loads the plan again from these
    this.name = name;
    this.inputMetadata = inputs;
    this.outputMetadata = outputs;
  }

  /** Outputs (codec Tensors) of a run on `args`; `stored[i]`: whether args[i] is a stored tensor. */
  run(args, { stored = [], rid = "?" } = {}) {
    return this.sandbox.run(this, args, stored, rid);
  }

  release() {
    this.sandbox.forget(this.pid);
  }
}

/** The runtime side of a Sandbox: load(data) -> a session whose runs go to the runner. */
export const RunnerSessions = (Base) =>
  class extends Base {
    /** A session of the plan `data` (checked bytes) in the runner. */
    async load(data, { name, pid }) {
      const what = `plan ${pyRepr(name)} (registering)`;
      let target = null;
      const { header } = await this.request(
        (proc) => {
          target = proc;
          proc.loaded.add(pid); // the runs sent behind it need not load it again
          return [{ t: "load", plan: pid }, [data]];
        },
        { what, after: "it was not registered; the worker kept every stored tensor and plan", name, doing: "loading" },
      ).catch((e) => {
        target?.loaded.delete(pid);
        throw e;
      });
      return new SandboxedSession(this, pid, data, name, header.inputs, header.outputs);
    }

    forget(pid) {
      const proc = this.proc;
      if (proc !== null && proc.loaded.delete(pid)) proc.drop.add(pid);
    }

    async run(session, args, stored, rid) {
      const what = `plan ${pyRepr(session.name)} (run #${rid})`;
      let target = null;
      let load = false;
      const { header, buffers } = await this.request(
        (proc) => {
          target = proc;
          load = !proc.loaded.has(session.pid);
          const out = load ? [session.data] : [];
          const refs = args.map((t, i) => this.ref(proc, t, stored[i], out));
          this.evict(proc, refs);
          if (load) proc.loaded.add(session.pid);
          return [{ t: "run", plan: session.pid, name: session.name, load, args: refs }, out];
        },
        { what, after: "the worker kept every stored tensor and plan", name: session.name, doing: "running" },
      ).catch((e) => {
        if (target !== null) target.loaded.delete(session.pid); // the runner may not hold it
        throw e;
      });
      if (header.t !== "ran" || !Array.isArray(header.outputs) || header.outputs.length !== buffers.length) {
        throw new ProtocolError("internal", `the runner answered ${clean(String(header.t))} to a run`);
      }
      try {
        // the runner ran a hostile plan: its answer is checked like a client's (dtype × shape against the bytes)
        return header.outputs.map((o, i) => fromFrame(o?.dtype, checkedShape(o?.shape), buffers[i], `runner output ${i}`));
      } catch (e) {
        throw new ProtocolError("internal", `${what}: the runner's answer is malformed (${e.message})`);
      }
    }

    /** How argument `t` goes to runner `proc`: by its id when the runner keeps it, else in `out`. */
    ref(proc, t, isStored, out) {
      if (!isStored || t.nbytes <= INLINE_MAX || t.nbytes > this.cacheBudget) {
        out.push(t.data);
        return { dtype: t.dtype, shape: t.shape, index: out.length - 1 };
      }
      let id = this.ids.get(t);
      if (id !== undefined && proc.cached.has(id)) {
        const e = proc.cached.get(id);
        proc.cached.delete(id); // most recently used: last
        proc.cached.set(id, e);
        return { cached: id };
      }
      if (id === undefined) this.ids.set(t, (id = ++this.nextId));
      proc.cached.set(id, { bytes: t.nbytes, ref: new WeakRef(t) });
      proc.cachedBytes = (proc.cachedBytes ?? 0) + t.nbytes;
      out.push(t.data);
      return { dtype: t.dtype, shape: t.shape, index: out.length - 1, keep: id };
    }

    /** Tensors the runner may drop: gone from the store, or least recently used past the budget. */
    evict(proc, refs) {
      const used = new Set(refs.map((r) => r.cached ?? r.keep).filter((id) => id !== undefined));
      for (const [id, e] of proc.cached) {
        const over = proc.cachedBytes > this.cacheBudget;
        if (used.has(id) || (!over && e.ref.deref() !== undefined)) continue;
        proc.cached.delete(id);
        proc.cachedBytes -= e.bytes;
        proc.uncache.push(id);
      }
    }
  };
