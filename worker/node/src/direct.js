// The direct lane's rule (the same rule as the Python worker's): which runs the worker executes itself, in its
// own onnxruntime session, instead of sending them to the sandboxed runner (src/sandbox.js). The runner
// exists to contain what a hostile plan can do: crash the process (an integer Div of INT64_MIN by -1 traps
// with SIGFPE inside onnxruntime), allocate without bound, or never end. A run skips it only when its plan
// provably can do none of these, decided in two steps:
//
// 1. Once per plan, from its bytes (`directPlan`): every node is in the default ONNX domain and its op is in
//    ALLOWED, float ops with no way to trap and no data-dependent allocation (output shapes follow from the
//    input shapes alone; Constant only with a float `value` tensor); every input, output, declared value
//    and initializer is float32 or float64 (integer Div is the SIGFPE case; float arithmetic
//    yields inf or NaN, never a trap); no local functions, no subgraph or other tensor attributes, no
//    sparse initializers, no training info; at most MAX_NODES nodes and at most the byte bound of
//    initializers. Not allowed, on purpose: Reshape, Expand, Tile, ConstantOfShape, Range, Resize, Pad,
//    Slice, Gather (output sizes or reads set by tensor values: a few bytes of input can ask for
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
import { log, clean, enabled } from "./log.js";
import { pyRepr } from "./json.js";

export const ALLOWED = new Set([
  ...["Add", "Sub", "Mul", "Div", "Max", "Min"], // broadcasting elementwise (Max/Min: any number of inputs)
  ...["Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Identity"], // same shape
  ...["Softmax", "LogSoftmax", "MatMul", "Gemm", "Transpose", "Constant"],
]);
export const MAX_NODES = 64;
export const MAX_FLOPS = 2e6;
export const DEFAULT_MAX_MB = 8; // --direct-max-mb: the byte bound (peak memory of a run, initializers); 0: no direct lane
const FLOAT_BYTES = new Map([
  [1, 4], // FLOAT
  [11, 8], // DOUBLE (not FLOAT16: onnxruntime's CPU kernels compute most of it through float32 copies it inserts,
  // memory the bytes rule would not count; as worker/direct.py)
]);
const ATTRIBUTES = {
  Gemm: new Set(["alpha", "beta", "transA", "transB"]),
  Transpose: new Set(["perm"]),
  Softmax: new Set(["axis"]),
  LogSoftmax: new Set(["axis"]),
  Constant: new Set(["value"]),
};
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

/** Why a plan is not direct-safe (only for the log; the lane then leaves the plan to the runner). */
class NotDirect extends Error {}

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

const count = (shape) => shape.reduce((a, b) => a * b, 1);

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

// --- the plan's graph, read off the protobuf (after src/modelcheck.js: sizes and nesting are bounded) ---

const MODEL = { graph: 7, trainingInfo: 20, functions: 25 };
const GRAPH = { node: 1, initializer: 5, sparseInitializer: 15, input: 11, output: 12, valueInfo: 13 };
const NODE = { input: 1, output: 2, op: 4, attribute: 5, domain: 7 };
const ATTR = { name: 1, i: 3, t: 5, ints: 8, tensorsAndGraphs: new Set([5, 6, 10, 11, 14, 15, 21, 22, 23]) };
const TENSOR = { dims: 1, dataType: 2, segment: 3, name: 8, dataLocation: 14 };
const utf8 = new TextDecoder("utf-8");

function readGraph(data, maxBytes) {
  let graph = null;
  for (const [num, , v] of fields(data)) {
    if (num === MODEL.functions) throw new NotDirect("the plan has local functions");
    if (num === MODEL.trainingInfo) throw new NotDirect("the plan has training info");
    if (num === MODEL.graph) graph = v;
  }
  if (graph === null) throw new NotDirect("the plan has no graph");
  const nodes = [];
  const initializers = new Map();
  const inputs = new Map(); // name -> bytes per element
  const outputs = [];
  let initBytes = 0;
  for (const [num, , v] of fields(graph)) {
    if (num === GRAPH.node) {
      if (nodes.length >= MAX_NODES) throw new NotDirect(`the plan has more than ${MAX_NODES} nodes`);
      nodes.push(readNode(v));
    } else if (num === GRAPH.initializer) {
      const t = readTensor(v);
      initBytes += count(t.shape) * t.size;
      if (initBytes > maxBytes) throw new NotDirect(`the plan's initializers exceed ${maxBytes} bytes`);
      initializers.set(t.name, t);
    } else if (num === GRAPH.sparseInitializer) {
      throw new NotDirect("the plan has sparse initializers");
    } else if (num === GRAPH.input || num === GRAPH.output || num === GRAPH.valueInfo) {
      const [name, size] = readValueInfo(v);
      if (num === GRAPH.input) inputs.set(name, size);
      if (num === GRAPH.output) outputs.push(name);
    }
  }
  if ([...initializers.keys()].some((name) => inputs.has(name))) throw new NotDirect("an initializer is also a plan input");
  return { nodes, initializers, inputs, outputs, initBytes };
}

function readNode(buf) {
  const node = { op: "", domain: "", inputs: [], output: null, attrs: {} };
  let outputs = 0;
  for (const [num, wt, v] of fields(buf)) {
    if (num === NODE.input) node.inputs.push(utf8.decode(v));
    else if (num === NODE.output) (node.output = utf8.decode(v)), outputs++;
    else if (num === NODE.op) node.op = utf8.decode(v);
    else if (num === NODE.domain) node.domain = utf8.decode(v);
    else if (num === NODE.attribute && wt === 2) readAttribute(v, node);
  }
  if (node.domain !== "" && node.domain !== "ai.onnx") throw new NotDirect(`op ${node.domain}::${node.op} is not in the default domain`);
  if (!ALLOWED.has(node.op)) throw new NotDirect(`op ${node.op} is not in the direct allowlist`);
  if (outputs !== 1 || !node.output) throw new NotDirect(`a ${node.op} node has ${outputs} outputs`);
  for (const name of Object.keys(node.attrs)) {
    if (!ATTRIBUTES[node.op]?.has(name)) throw new NotDirect(`a ${node.op} node has attribute ${name}`);
  }
  if (node.op === "Constant" && (node.inputs.length || node.attrs.value?.shape === undefined)) {
    throw new NotDirect("a Constant that is not a float tensor");
  }
  return node;
}

function readAttribute(buf, node) {
  let name = "";
  let value = null;
  const ints = [];
  for (const [num, wt, v] of fields(buf)) {
    if (num === ATTR.name) name = utf8.decode(v);
    else if (num === ATTR.t && node.op === "Constant") value = readTensor(v); // float only, as initializers
    else if (ATTR.tensorsAndGraphs.has(num)) throw new NotDirect("a node has a tensor, graph or reference attribute");
    else if (num === ATTR.i && wt === 0) value = v;
    else if (num === ATTR.ints) ints.push(...(wt === 2 ? packed(v) : [v]));
  }
  node.attrs[name] = name === "perm" ? ints : value;
}

function readTensor(buf) {
  let name = "";
  let type = 0;
  const shape = [];
  for (const [num, wt, v] of fields(buf)) {
    if (num === TENSOR.name) name = utf8.decode(v);
    else if (num === TENSOR.dataType) type = v;
    else if (num === TENSOR.dims) shape.push(...(wt === 2 ? packed(v) : [v]));
    else if (num === TENSOR.segment || (num === TENSOR.dataLocation && v !== 0)) throw new NotDirect(`initializer ${name} is segmented or external`);
  }
  const size = FLOAT_BYTES.get(type);
  if (size === undefined) throw new NotDirect(`initializer ${name} is not float32 or float64 (type ${type})`);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new NotDirect(`initializer ${name} has a bad shape`);
  return { name, shape, size };
}

/** [name, bytes per element] of a ValueInfoProto of a float tensor. */
function readValueInfo(buf) {
  let name = "";
  let size;
  for (const [num, , v] of fields(buf)) {
    if (num === 1) name = utf8.decode(v);
    else if (num === 2) {
      for (const [tn, , tv] of fields(v)) {
        if (tn !== 1) throw new NotDirect(`value ${name} is not a tensor`);
        for (const [en, , ev] of fields(tv)) if (en === 1) size = FLOAT_BYTES.get(ev);
      }
    }
  }
  if (size === undefined) throw new NotDirect(`value ${name} is not float32 or float64`);
  return [name, size];
}

/** [field number, wire type, value] of each field of one protobuf message: a varint as a Number (int64
 * read as signed), a length-delimited field as its bytes; fixed-width fields are skipped. */
function* fields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = varint(buf, pos);
    const num = Math.floor(key / 8);
    const wt = key % 8;
    if (wt === 0) {
      let v;
      [v, pos] = varint(buf, pos);
      yield [num, wt, v];
    } else if (wt === 2) {
      let n;
      [n, pos] = varint(buf, pos);
      if (pos + n > buf.length) throw new NotDirect("malformed protobuf");
      yield [num, wt, buf.subarray(pos, pos + n)];
      pos += n;
    } else if (wt === 1 || wt === 5) pos += wt === 1 ? 8 : 4;
    else throw new NotDirect(`protobuf wire type ${wt}`);
  }
}

function packed(buf) {
  const out = [];
  for (let pos = 0, v; pos < buf.length; ) {
    [v, pos] = varint(buf, pos);
    out.push(v);
  }
  return out;
}

/** A varint at `pos`: [value, next position]; past 49 bits read exactly as a signed 64-bit integer. */
function varint(buf, pos) {
  let value = 0;
  let mul = 1;
  let big = null;
  for (let i = 0; ; i++) {
    const b = buf[pos++];
    if (b === undefined || i > 9) throw new NotDirect("malformed protobuf varint");
    if (i < 7) value += (b & 0x7f) * mul;
    else big = (big ?? BigInt(value)) | (BigInt(b & 0x7f) << BigInt(7 * i));
    mul *= 128;
    if (!(b & 0x80)) break;
  }
  return [big === null ? value : Number(BigInt.asIntN(64, big)), pos];
}
