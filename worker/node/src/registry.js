// The plan half of a Service (as worker/registry.py): a plan registered (checked, then its session made in this
// process or by the sandboxed runner), who holds it, forgetting it when nobody does, its plan info, and a copy
// kept where the operator reviews it (plan-worker review) when the worker has private data. A mixin of
// src/service.js's Service: it works on the service's plans, holders, flows, store and runtime, for the
// owner the request acts for (this.client).

import { createHash } from "node:crypto";
import { pyRepr } from "./json.js";
import { ProtocolError } from "./messages.js";
import { DTYPES, human, humanList } from "./codec.js";
import { checkModel, PlanRejected } from "./modelcheck.js";
import { log, clean } from "./log.js";
import { analyze } from "./flow.js";
import { keepPlan } from "./review.js";

/** A port's shape as the wire shows it: ints, symbols, null for unknown axes. */
function portShape(shape) {
  return shape.map((d) => (typeof d === "number" && d >= 0 ? d : typeof d === "string" && d ? d : null));
}

/** A registered plan: its session, ports and bytes (kept: src/durable.js writes them to --state-dir). */
export class Plan {
  constructor(name, session, anyRank) {
    this.name = name;
    this.session = session;
    this.anyRank = anyRank;
    const ports = (meta) =>
      meta.map((m) => ({
        name: m.name,
        dtype: m.isTensor ? (FROM_ORT_TYPE[m.type] ?? String(m.type)) : "(not a tensor)",
        shape: m.isTensor && !anyRank.has(m.name) ? portShape(m.shape) : null,
      }));
    this.inputs = ports(session.inputMetadata);
    this.outputs = ports(session.outputMetadata);
    this.direct = undefined; // the direct lane's {rule, session} for this plan (src/direct.js), made at its first run
  }

  check(args) {
    if (args.length !== this.inputs.length) {
      throw new ProtocolError("bad_argument", `plan ${pyRepr(this.name)} takes ${this.inputs.length} arguments, got ${args.length}`);
    }
    for (let i = 0; i < args.length; i++) {
      const t = args[i];
      const port = this.inputs[i];
      const what = () => `plan ${pyRepr(this.name)} argument ${i} (${pyRepr(port.name)})`; // only for an error
      if (t.dtype !== port.dtype) {
        throw new ProtocolError("bad_argument", `${what()}: expected dtype ${human(port.dtype)}, got ${human(t.dtype)}`);
      }
      const shape = port.shape;
      if (shape === null) continue;
      if (shape.length !== t.shape.length || shape.some((d, a) => typeof d === "number" && d !== t.shape[a])) {
        const want = "[" + shape.map((d) => (typeof d === "number" ? String(d) : "?")).join(", ") + "]";
        throw new ProtocolError("bad_argument", `${what()}: expected shape ${want}, got [${t.shape.join(", ")}]`);
      }
    }
  }
}

const FROM_ORT_TYPE = Object.fromEntries(Object.entries(DTYPES).map(([w, d]) => [d.ort, w]));

/** The plan requests of a Service (register_plan, has_plan, delete_plan) and forgetting a plan. */
export const PlanRegistry = (Base) =>
  class extends Base {
    async register(m, buffers) {
      const client = this.client; // the requester, whatever is handled while this awaits onnxruntime
      const data = this.frameAt(buffers, m.frame, "register_plan.frame");
      const pid = createHash("sha256").update(data).digest("hex");
      let plan = this.plans.get(pid);
      if (plan === undefined) {
        if (this.maxPlans !== null && this.plans.size >= this.maxPlans) {
          throw new ProtocolError(
            "quota_exceeded",
            `plan ${pyRepr(m.name || pid.slice(0, 12))} not registered: the worker already holds ${this.plans.size} plans ` +
              "(its limit): unregister plans with delete_plan, or start plan-worker with a larger --max-plans",
          );
        }
        let summary;
        try {
          summary = checkModel(data, { maxBytes: this.limits.maxPlanBytes });
        } catch (e) {
          if (!(e instanceof PlanRejected)) throw e;
          const code = data.length > this.limits.maxPlanBytes ? "too_large" : e.code;
          throw new ProtocolError(code, `plan ${pyRepr(m.name || pid.slice(0, 12))} rejected: ${e.message}`);
        }
        const name = m.name || summary.metadata.get("planwire.name") || pid.slice(0, 12);
        let session;
        const bytes = Uint8Array.from(data); // a copy: onnxruntime gets exactly the checked bytes, which no later message can change
        try {
          session = await this.runtime.load(bytes, { name, pid });
        } catch (e) {
          if (e instanceof ProtocolError) throw e; // contained: plan_crashed, out_of_memory, plan_timeout, ...
          throw new ProtocolError("bad_plan", `onnxruntime cannot load plan ${name}: ${e?.message ?? e}`);
        }
        if (this.plans.has(pid)) {
          // registered meanwhile (the same bytes, sent again while these loaded): one session is kept
          await session.release();
          return [this.planInfo(m.id, pid, this.plans.get(pid)), []];
        }
        plan = new Plan(name, session, summary.unknownRank);
        plan.data = bytes;
        plan.bytes = data.length;
        for (const [side, ports] of [["input", plan.inputs], ["output", plan.outputs]]) {
          for (const p of ports) {
            if (!(p.dtype in DTYPES)) {
              await session.release();
              throw new ProtocolError("bad_plan", `plan ${pyRepr(name)} ${side} ${pyRepr(p.name)} has type ${pyRepr(p.dtype)}; supported: ${humanList()}`);
            }
          }
        }
        let flow;
        try {
          flow = analyze(data, plan.inputs.map((p) => p.name), plan.outputs.map((p) => p.name));
        } catch (e) {
          await session.release();
          throw new ProtocolError("bad_plan", `plan ${pyRepr(name)}: its graph cannot be read (${e.message})`);
        }
        this.plans.set(pid, plan);
        this.flows.set(pid, flow);
        log.info(`registered plan ${clean(pyRepr(name))} (${pid.slice(0, 12)}, ${data.length} bytes)`);
        if (this.plansDir !== null && [...this.store.own.values()].some((e) => e.private)) {
          keepPlan(this.plansDir, pid, data, name);
        }
      }
      this.holders.add(pid, client);
      return [this.planInfo(m.id, pid, plan), []];
    }

    planInfo(rid, pid, plan) {
      return { type: "plan", re: rid, session: this.session, plan: pid, inputs: plan.inputs, outputs: plan.outputs };
    }

    hasPlan(m) {
      const plan = this.plans.get(m.plan);
      if (plan === undefined || !this.holders.holds(m.plan, this.client)) {
        return [{ type: "missing", re: m.id, session: this.session, plan: m.plan }, []];
      }
      return [this.planInfo(m.id, m.plan, plan), []];
    }

    async deletePlan(m) {
      if (this.holders.remove(m.plan, this.client)) await this.unload(m.plan);
      return this.ok(m);
    }

    /** Forget a plan nobody holds any more. */
    async unload(pid) {
      const plan = this.plans.get(pid);
      this.flows.delete(pid);
      if (plan !== undefined) {
        this.plans.delete(pid);
        this.lane?.forget(plan);
        await plan.session.release();
        log.info(`unregistered plan ${pyRepr(pid.slice(0, 12))}`);
      }
    }
  };
