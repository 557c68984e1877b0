// The run half of a Service (as worker/runs.py): a run checked (its arguments against the plan's ports, the
// private data it reads and what the owner's policy releases of its outputs), executed by the direct lane
// (src/direct.js) or the runtime (the sandboxed runner, or this process), and its results stored, fetched or
// inlined. A run refused or failed records why on its outputs, so later uses of them say so. A mixin of
// src/service.js's Service.

import { pyRepr } from "./json.js";
import { ProtocolError } from "./messages.js";
import { log, clean } from "./log.js";
import { redacted } from "./flow.js";

// a run on no private data: no private outputs, no releases (read only, shared by such runs)
const NO_OUTPUTS = new Set();
const NO_RELEASES = new Map();

/** The run request of a Service. */
export const RunPath = (Base) =>
  class extends Base {
    /** A run: its reply, or a Promise of it while the plan runs in the runner. Every refusal or failure
     * marks its outputs failed, whichever lane ran it (the direct lane and the runner share this code). */
    run(m, buffers) {
      const client = this.client; // the requester, whatever is handled while this awaits onnxruntime
      m.args.forEach((a, i) => {
        if (("ref" in a) === ("tensor" in a)) throw new ProtocolError("invalid_message", `run.args[${i}] needs exactly one of 'ref', 'tensor'`);
      });
      this.store.checkWritable(m.outputs);
      const failed = (e) => {
        if (e instanceof ProtocolError) {
          const why = e.code === "run_failed" ? e.message : `run #${m.id} refused: ${e.message} [${e.code}]`;
          for (const key of m.outputs) this.store.fail(client, key, why);
        }
        throw e;
      };
      try {
        const done = this.execute(m, buffers, client);
        return typeof done.then === "function" ? done.catch(failed) : done;
      } catch (e) {
        return failed(e);
      }
    }

    execute(m, buffers, client) {
      const job = this.prepare(m, buffers, client);
      let results = this.mayDirect && this.lane !== null ? this.lane.run(job.plan, job.args, m.id) : null;
      if (results === null) {
        try {
          results = job.plan.session.run(job.args, { stored: m.args.map((a) => "ref" in a), rid: m.id });
        } catch (e) {
          throw this.runError(job, e);
        }
      }
      if (typeof results.then !== "function") return this.complete(job, results);
      return results.then(
        (r) => this.complete(job, r),
        (e) => {
          throw this.runError(job, e);
        },
      );
    }

    /** What a run needs before it runs: its plan, arguments and the release rules of private data; the checks
     * that refuse it before anything runs. */
    prepare(m, buffers, client) {
      const plan = this.plans.get(m.plan);
      if (plan === undefined || !this.holders.holds(m.plan, client)) {
        throw new ProtocolError("unknown_plan", `no plan ${pyRepr(m.plan.slice(0, 12))} on worker ${pyRepr(this.id)}: register it first`);
      }
      const nOut = plan.outputs.length;
      if (m.outputs.length !== nOut) {
        throw new ProtocolError(
          "bad_argument",
          `plan ${pyRepr(plan.name)} has ${nOut} outputs: run.outputs needs ${nOut} keys, got [${m.outputs.map(pyRepr).join(", ")}]`,
        );
      }
      const fetch = m.fetch.map(Number);
      if (m.fetch.some((i) => (typeof i === "bigint" ? i >= BigInt(nOut) : i >= nOut))) {
        throw new ProtocolError("bad_argument", `run.fetch [${m.fetch.join(", ")}] out of range for ${nOut} outputs`);
      }
      const privateArgs = new Map(); // argument index -> its private store entry
      const args = m.args.map((a, i) => {
        if (!("ref" in a)) return this.tensor(a.tensor, buffers, `run argument ${i}`);
        const e = this.store.entry(client, a.ref);
        if (e.private) privateArgs.set(i, e);
        return e.tensor;
      });
      const priv = privateArgs.size ? this.flows.get(m.plan).privateOutputs([...privateArgs.keys()]) : NO_OUTPUTS;
      let pending = NO_RELEASES;
      let rows = 0;
      if (priv.size) {
        pending = this.pending(m, plan, args, privateArgs, priv, client);
        rows = Math.min(...[...privateArgs.values()].map((e) => e.rows));
      }
      plan.check(args);
      return { m, client, plan, args, fetch, privateArgs, priv, pending, rows };
    }

    /** A failed run's error as the client sees it (onnxruntime's own words, redacted on private data). */
    runError({ plan, args, privateArgs }, e) {
      if (e instanceof ProtocolError) return e; // contained: plan_crashed, out_of_memory, plan_timeout, cancelled
      if (privateArgs.size) {
        // onnxruntime's text may quote tensor values: the client gets the op, the node and the shapes
        log.info(`plan ${pyRepr(plan.name)} failed on private data: ${clean(e?.message ?? e)}`);
        return new ProtocolError("run_failed", redacted(plan.name, this.id, e, args, pyRepr));
      }
      return new ProtocolError("run_failed", `plan ${pyRepr(plan.name)} failed on worker ${pyRepr(this.id)}: ${e?.message ?? e}`);
    }

    /** A run's results stored (quotas, private marks, pending releases) and its reply. */
    complete({ m, client, fetch, priv, pending, rows }, results) {
      this.store.checkQuota(client, m.outputs.map((k, i) => [k, results[i].nbytes]), `outputs of run #${m.id}`);
      m.outputs.forEach((key, i) =>
        this.store.put(client, key, results[i], [], { isPrivate: priv.has(i), pending: pending.get(i) ?? null, rows }),
      );
      const inlineMax = Number(m.inline_max);
      if (inlineMax) {
        results.forEach((r, i) => {
          const leaves = !priv.has(i) || (pending.has(i) && pending.get(i).ready);
          if (r.nbytes <= inlineMax && !fetch.includes(i) && leaves) fetch.push(i);
        });
      }
      if (!fetch.length) return this.ok(m);
      const keys = fetch.map((i) => m.outputs[i]);
      // a private output leaves only as its release (the owner's policy): read through it
      const release = (key, e) => this.releaser.release(client, key, e);
      const values = priv.size ? this.store.readable(client, keys, release)[1] : fetch.map((i) => results[i]);
      return this.tensorsReply(m.id, keys, values);
    }

    /** The releases the owner's policy allows for a run on private data; refuses a fetch of any other
     * private output before anything runs. */
    pending(m, plan, args, privateArgs, priv, client) {
      const namesIn = plan.inputs.map((p) => p.name);
      const namesOut = plan.outputs.map((p) => p.name);
      const pending = this.releaser.prepare(m.plan, plan.name, namesIn, namesOut, args, privateArgs, priv, client);
      const held = m.fetch.map(Number).filter((i) => priv.has(i) && !(pending.has(i) && pending.get(i).ready));
      if (held.length) {
        const keys = held.map((i) => m.outputs[i]);
        const message =
          `run.fetch asks for [${keys.map(pyRepr).join(", ")}], computed by plan ${pyRepr(plan.name)} from this worker's private data: such ` +
          "results are stored and may be used by later runs, but never leave the worker unless the data " +
          "owner approves the plan (plan-worker --policy)";
        const rule = this.releaser.policy?.rules.get(m.plan) ?? null;
        this.releaser.audit("refused", client, rule, plan.name, held.map((i) => namesOut[i]), [], { reason: message });
        throw new ProtocolError("private_data", message);
      }
      return pending;
    }
  };
