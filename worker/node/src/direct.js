// The direct lane's rule (the same rule as the Python worker's): which runs the worker executes itself, in its
// own onnxruntime session, instead of sending them to the sandboxed runner (src/sandbox.js). The runner
// exists to contain what a hostile plan can do: crash the process (an integer Div of INT64_MIN by -1 traps
// with SIGFPE inside onnxruntime), allocate without bound, or never end. A run skips it only when its plan
// provably can do none of these, decided in two steps:
//
// 1. Once per plan, from its bytes (`directPlan`; src/directgraph.js reads the graph): every node is in the
//    default ONNX domain and its op is in ALLOWED, float ops with no way to trap and no data-dependent
//    allocation (output shapes follow from the input shapes alone; Constant only with a float `value`
//    tensor); every input, output, declared value and initializer is float32 or float64 (integer Div is the
//    SIGFPE case; float arithmetic yields inf or NaN, never a trap); no local functions, no subgraph or other
//    tensor attributes, no sparse initializers, no training info; at most MAX_NODES nodes and at most the
//    byte bound of initializers. Not allowed, on purpose: Reshape, Expand, Tile, ConstantOfShape, Range,
//    Resize, Pad, Slice, Gather (output sizes or reads set by tensor values: a few bytes of input can ask for
//    gigabytes), Loop, If, Scan (unbounded work, subgraphs), Cast and every integer op (traps), other
//    domains (kernels this rule knows nothing of), Conv and the rest (more code reached for little gain).
// 2. Per call, from the concrete input shapes (`fits`, cached per plan and shapes): the shape of every value
//    follows by the rules below (no value of unknown size), all values together (initializers, inputs,
//    constants, every node's output) take at most the byte bound, and the FLOPs (MatMul/Gemm 2 per
//    multiply-accumulate plus 1 per element of Gemm's C, elementwise 1 per output element, (Log)Softmax 3,
//    Transpose/Identity/Constant 0: transport/estimate.py's convention) are at most MAX_FLOPS: well under
//    a millisecond of one core, so no run timeout is needed either.
// The supervisor adds the third condition, per call: nothing in flight that the run would overtake.
// The Python worker's lane (worker/direct.py) has the same rule, constants and flag (--direct-max-mb): both
// reach the same decision on every case of tests/direct_cases.json (tests/test_direct.py, test_node_direct.py).

import { loadSessionNow } from "./runtime.js";
import { NotDirect, readGraph, count } from "./directgraph.js";
import { log, clean, enabled } from "./log.js";
import { pyRepr } from "./json.js";

export { ALLOWED, MAX_NODES } from "./directgraph.js";
export const MAX_FLOPS = 2e6;
export const DEFAULT_MAX_MB = 8; // --direct-max-mb: the byte bound (peak memory of a run, initializers); 0: no direct lane
const UNARY = new Set(["Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Identity", "Softmax", "LogSoftmax"]);
const FLOPS_PER_ELEMENT = { Softmax: 3, LogSoftmax: 3, Identity: 0, Transpose: 0, Constant: 0 };
const CACHED_SHAPES = 4096; // per plan: the calls' shapes whose verdict is kept

/** The lane: runs of direct-safe plans on small arguments, in the worker's own onnxruntime sessions. */
export class DirectLane {
  constructor(maxBytes) {
    this.maxBytes = maxBytes;
    this.counts = { direct_runs: 0, direct_fallbacks: 0 }; // runs it ran, and runs it gave back to the runner
  }

  /** The outputs of a run of `plan` (src/registry.js's Plan) on `args` computed here, or null when the runner
   * is to run it: the plan is not direct-safe or the call not small, or onnxruntime refused it here (the
   * runner then runs it and answers as it would anyway). The plan's rule is read at its first run; its
   * session is made at its first small call, with the runner's options but one thread, as the Python
   * worker's lane. */
  run(plan, args, rid) {
    if (plan.direct === undefined) {
      const rule = directPlan(plan.data, this.maxBytes);
      if (rule.reason !== undefined) log.debug(`plan ${clean(pyRepr(plan.name))} runs in the runner: ${clean(rule.reason)}`);
      plan.direct = { rule, session: undefined, names: plan.inputs.map((p) => p.name) };
    }
    const lane = plan.direct;
    if (lane.rule.reason !== undefined || !lane.rule.fits(lane.names, args.map((t) => t.shape))) return null;
    let results;
    try {
      lane.session ??= loadSessionNow(plan.data, { threads: 1, arena: false });
      if (lane.session === null) return null; // no synchronous onnxruntime here
      results = lane.session.run(args);
    } catch (e) {
      log.debug(`plan ${clean(pyRepr(plan.name))} not run direct (${clean(e?.message ?? e)}): the runner runs it`);
      if (lane.session === undefined) lane.rule = { reason: "onnxruntime cannot load it in the worker" };
      else lane.rule.refuse(args.map((t) => t.shape)); // these shapes go to the runner from now on
      this.counts.direct_fallbacks += 1;
      return null;
    }
    this.counts.direct_runs += 1;
    if (enabled("debug")) log.debug(`run #${rid} of plan ${clean(pyRepr(plan.name))}: direct (in the worker)`);
    return results;
  }

  /** `plan` is unregistered: its session goes. */
  forget(plan) {
    plan.direct?.session?.release();
    plan.direct = undefined;
  }
}

/** The direct-safe form of plan `data` (ONNX bytes checked by src/modelcheck.js): {nodes, initializers,
 * inputs, outputs, initBytes} with a `fits(shapes)` verdict per call; or {reason} when it is not. */
export function directPlan(data, maxBytes) {
  try {
    return new DirectPlan(readGraph(data, maxBytes), maxBytes);
  } catch (e) {
    if (e instanceof NotDirect || e instanceof RangeError || e instanceof TypeError) return { reason: e.message };
    throw e;
  }
}

class DirectPlan {
  constructor(graph, maxBytes) {
    Object.assign(this, graph);
    this.maxBytes = maxBytes;
    this.verdicts = new Map(); // "shape|shape|..." -> whether a call on those shapes may run direct
    this.last = null; // {shapes, ok}: the last call's shapes (a copy) and verdict
  }

  /** Whether a run on inputs of these shapes (in the plan's input order, by `names`) is small. */
  fits(names, shapes) {
    if (this.last !== null && sameShapes(this.last.shapes, shapes)) return this.last.ok; // the usual case: a call as the last one
    const key = shapes.join("|");
    let ok = this.verdicts.get(key);
    if (ok === undefined) {
      ok = this.measure(names, shapes);
      if (this.verdicts.size >= CACHED_SHAPES) this.verdicts.clear();
      this.verdicts.set(key, ok);
    }
    this.last = { shapes: shapes.map((s) => [...s]), ok };
    return ok;
  }

  /** Calls on these shapes run in the runner from now on (onnxruntime refused one here). */
  refuse(shapes) {
    this.verdicts.set(shapes.join("|"), false);
    this.last = null;
  }

  measure(names, shapes) {
    const info = new Map(); // value name -> {shape, size (bytes per element)}
    for (const [name, t] of this.initializers) info.set(name, t);
    let bytes = this.initBytes;
    if (names.length !== this.inputs.size) return false;
    for (let i = 0; i < names.length; i++) {
      const size = this.inputs.get(names[i]);
      if (size === undefined) return false;
      info.set(names[i], { shape: shapes[i], size });
      bytes += count(shapes[i]) * size;
    }
    let flops = 0;
    for (const node of this.nodes) {
      const ins = node.inputs.map((v) => (v === "" ? null : info.get(v)));
      if (ins.some((x, k) => x === undefined || (x === null && !(node.op === "Gemm" && k === 2)))) return false;
      const shape = node.op === "Constant" ? node.attrs.value.shape : infer(node, ins.map((x) => x && x.shape));
      if (shape === null) return false;
      const n = count(shape);
      if (node.op === "MatMul") flops += 2 * n * ins[0].shape[ins[0].shape.length - 1];
      else if (node.op === "Gemm") flops += 2 * n * ins[0].shape[node.attrs.transA ? 0 : 1] + (ins[2] ? n : 0);
      else flops += (FLOPS_PER_ELEMENT[node.op] ?? 1) * n;
      const size = node.op === "Constant" ? node.attrs.value.size : ins[0].size;
      info.set(node.output, { shape, size });
      bytes += n * size; // every value counted, as if all were alive at once
      if (flops > MAX_FLOPS || bytes > this.maxBytes) return false;
    }
    return this.outputs.every((v) => info.has(v));
  }
}

/** Whether two lists of shapes are equal, axis by axis. */
function sameShapes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    const y = b[i];
    if (x.length !== y.length) return false;
    for (let k = 0; k < x.length; k++) if (x[k] !== y[k]) return false;
  }
  return true;
}

/** The output shape of allowlisted `node` on inputs of `shapes` (null: an absent optional input), or null
 * when the shapes do not fit the op (onnxruntime would refuse the run: it goes to the runner, which says so). */
export function infer(node, shapes) {
  const op = node.op;
  if (UNARY.has(op)) {
    if (shapes.length !== 1) return null;
    const [x] = shapes;
    if ((op === "Softmax" || op === "LogSoftmax") && node.attrs.axis !== undefined && !(node.attrs.axis >= -x.length && node.attrs.axis < x.length)) return null;
    return x;
  }
  if (op === "Add" || op === "Sub" || op === "Mul" || op === "Div") return shapes.length === 2 ? broadcast(shapes) : null;
  if (op === "Max" || op === "Min") return shapes.length >= 1 ? broadcast(shapes) : null;
  if (op === "Transpose") {
    if (shapes.length !== 1) return null;
    const [x] = shapes;
    const perm = node.attrs.perm ?? x.map((_, i) => x.length - 1 - i);
    if (perm.length !== x.length || new Set(perm).size !== perm.length || !perm.every((p) => p >= 0 && p < x.length)) return null;
    return perm.map((p) => x[p]);
  }
  if (op === "MatMul") return shapes.length === 2 ? matmul(shapes[0], shapes[1]) : null;
  if (op === "Gemm") {
    const [a, b, c] = shapes;
    if (shapes.length < 2 || shapes.length > 3 || a.length !== 2 || b.length !== 2) return null;
    const [m, k] = node.attrs.transA ? [a[1], a[0]] : a;
    const [k2, n] = node.attrs.transB ? [b[1], b[0]] : b;
    if (k !== k2) return null;
    if (c) {
      // C broadcasts to [M, N] one way
      if (c.length > 2 || !c.every((d, i) => d === 1 || d === [m, n][2 - c.length + i])) return null;
    }
    return [m, n];
  }
  return null;
}

/** Multidirectional (numpy) broadcasting of `shapes`, or null. */
function broadcast(shapes) {
  const rank = Math.max(...shapes.map((s) => s.length));
  const out = [];
  for (let i = 0; i < rank; i++) {
    let d = 1;
    for (const s of shapes) {
      const e = s.length - rank + i >= 0 ? s[s.length - rank + i] : 1;
      if (e === 1) continue;
      if (d !== 1 && e !== d) return null;
      d = e;
    }
    out.push(d);
  }
  return out;
}

/** numpy.matmul's shape rules: a 1-D operand gains an axis (before for the first, after for the second),
 * dropped again; the batch axes broadcast. */
function matmul(a, b) {
  if (!a.length || !b.length) return null;
  if (a.length > 2 || b.length > 2) return null; // batched: onnxruntime's per-matrix work and offsets are not counted (as worker/direct.py)
  const a2 = a.length === 1 ? [1, a[0]] : a;
  const b2 = b.length === 1 ? [b[0], 1] : b;
  if (a2[a2.length - 1] !== b2[b2.length - 2]) return null;
  const batch = broadcast([a2.slice(0, -2), b2.slice(0, -2)]);
  if (batch === null) return null;
  const out = [...batch];
  if (a.length > 1) out.push(a2[a2.length - 2]);
  if (b.length > 1) out.push(b2[b2.length - 1]);
  return out;
}

