// Reject hostile ONNX plans before onnxruntime sees them: a port of transport/plancheck.py (same policy, same
// codes, same messages; see that module's docstring for the policy). The wire format is read by
// onnxproto.js, the resources a plan fixes are bounded by plansize.js, and this module holds the policy and
// the walk over a model's graphs, nodes, functions and tensors.

import { ATTRIBUTE, bitsOf, FUNCTION, GRAPH, GRAPH_PORTS, MODEL, NODE, OPSET, PlanRejected, PlanTooLarge, PROTOBUF_LIMIT, SPARSE, SSE_KEEP, TENSOR, TENSOR_TYPE_KEEP, TRAINING, TYPE_KEEP, VALUE_INFO_KEEP, itemsize, last, signed64, utf8 } from "./onnxproto.js";
import { human, SIZED_OPS, SizeRules } from "./plansize.js";

export { MAX_DEPTH, MAX_FIELDS, PROTOBUF_LIMIT, PlanRejected, PlanTooLarge } from "./onnxproto.js";

export const DEFAULT_DOMAINS = new Set(["", "ai.onnx"]);
const ONNX_ALIASES = new Set(["", "ai.onnx"]);
const RESERVED_PREFIXES = ["ai.onnx", "onnx", "com.microsoft", "com.ms", "org.pytorch", "pkg.onnxruntime", "trt"];

const domainList = (domains) => [...domains].sort().map((d) => `'${d}'`).join(", ") || "(none)";
const reserved = (domain) => domain === "" || RESERVED_PREFIXES.some((p) => domain.startsWith(p));

class Checker extends SizeRules {
  constructor(buf, allowed, maxBytes, maxNodes, maxTensorBytes, maxFunctionDepth, maxLoopTrips) {
    super(buf, maxTensorBytes ?? maxBytes, maxFunctionDepth, maxLoopTrips);
    this.maxBytes = maxBytes;
    this.allNodes = 0; // every node walked: main graph, subgraphs, functions, training graphs
    this.shown = allowed;
    this.allowed = [...allowed].some((d) => ONNX_ALIASES.has(d)) ? new Set([...allowed, ...ONNX_ALIASES]) : allowed;
    this.maxNodes = maxNodes;
    this.functions = new Map();
    this.functionDomains = new Set();
    this.calls = []; // local-function calls made from the scope being walked
    this.nodes = 0; // nodes in the scope being walked
  }

  // -- structural walk --

  tensor(span, depth, role) {
    const f = this.scan(span, depth, TENSOR);
    const entries = f.get(13);
    const external = (f.get(14) ?? []).some((v) => v !== 0 && v !== 0n);
    if (!entries && !external) {
      const dims = f.get(1);
      if (dims) {
        const what = `${role} '${this.label(f.get(8))}'`;
        this.bound(this.ints(dims, `${what} dims`), itemsize(f), what);
      }
      return f;
    }
    let location = null;
    for (const entry of entries ?? []) {
      const kv = this.scan(entry, depth + 1, SSE_KEEP);
      if (this.label(kv.get(1)) === "location") location = this.label(kv.get(2));
    }
    const detail = location !== null ? `location '${location}'` : "data_location EXTERNAL";
    throw this.reject(`${role} '${this.label(f.get(8))}' uses external data (${detail})`);
  }

  sparse(spans, depth, role) {
    const dims = [];
    const values = new Map();
    for (const span of spans) {
      const f = this.scan(span, depth, SPARSE);
      dims.push(...(f.get(3) ?? []));
      for (const s of f.get(1) ?? []) {
        for (const [k, v] of this.tensor(s, depth + 1, `${role} values`)) {
          if (!values.has(k)) values.set(k, []);
          values.get(k).push(...v);
        }
      }
      for (const s of f.get(2) ?? []) this.tensor(s, depth + 1, `${role} indices`);
    }
    const dtypes = values.get(2);
    const bits = bitsOf(dtypes ? Number(last(dtypes)) : 0, 128);
    const limit = Math.floor((this.maxTensorBytes * 8) / bits);
    let count = 1;
    for (const dim of this.ints(dims, `${role} '${this.label(values.get(8))}' dims`)) {
      count *= dim;
      if (dim < 0 || count > limit) {
        if (dim < 0) throw this.reject(`${role} '${this.label(values.get(8))}' densifies to a negative size`);
        throw this.tooLarge(
          `${role} '${this.label(values.get(8))}' densifies to more than ${human(this.maxTensorBytes)}, over the worker limit`,
        );
      }
    }
  }

  graph(span, depth, label) {
    const f = this.scan(span, depth, GRAPH);
    if (label) this.path.push(`graph '${this.label(f.get(2))}'`);
    let nInit = 0;
    let nBytes = 0;
    for (const s of f.get(5) ?? []) {
      this.constant(this.tensor(s, depth + 1, "initializer"));
      nInit += 1;
      nBytes += s[1] - s[0];
    }
    for (const s of f.get(15) ?? []) {
      this.sparse([s], depth + 1, "sparse initializer");
      nInit += 1;
      nBytes += s[1] - s[0];
    }
    (f.get(1) ?? []).forEach((s, i) => this.node(s, depth + 1, i));
    if (label) this.path.pop();
    return [nInit, nBytes];
  }

  node(span, depth, index) {
    const f = this.scan(span, depth, NODE);
    const name = this.label(f.get(3));
    const op = this.text(f.get(4), `op_type of node #${index}`);
    const desc = name ? `node '${name}' (op ${op})` : `node #${index} (op ${op})`;
    const domain = this.text(f.get(7), `domain of ${desc}`);
    const overload = this.text(f.get(8), `overload of ${desc}`);
    this.nodes += 1;
    this.allNodes += 1;
    if (this.allNodes > this.maxNodes) throw this.tooLarge(`plan has more than ${this.maxNodes} nodes (subgraphs and functions included)`);
    if (!this.allowed.has(domain)) {
      const called = this.functions.get(JSON.stringify([domain, op, overload]));
      if (called === undefined) {
        if (this.functionDomains.has(domain)) {
          throw this.reject(`${desc} calls '${domain}::${op}', which is not a function defined in the plan`);
        }
        throw this.reject(`${desc} uses domain '${domain}' which is not allowed; allowed: ${domainList(this.shown)}`);
      }
      this.calls.push(called);
    }
    const attrs = new Map();
    if (f.get(5)) {
      this.path.push(desc);
      for (const s of f.get(5)) {
        const af = this.attribute(s, depth + 1);
        attrs.set(this.label(af.get(1)), af);
      }
      this.path.pop();
    }
    if (ONNX_ALIASES.has(domain) && SIZED_OPS.has(op)) {
      const ins = (f.get(1) ?? []).map((s) => this.raw(s));
      const outs = (f.get(2) ?? []).map((s) => this.raw(s));
      this.sized(op, desc, ins, outs, attrs);
    }
  }

  attribute(span, depth) {
    const f = this.scan(span, depth, ATTRIBUTE);
    this.path.push(`attribute '${this.label(f.get(1))}'`);
    for (const s of [...(f.get(5) ?? []), ...(f.get(10) ?? [])]) this.tensor(s, depth + 1, "tensor");
    if (f.has(22)) this.sparse(f.get(22), depth + 1, "sparse tensor");
    for (const s of f.get(23) ?? []) this.sparse([s], depth + 1, "sparse tensor");
    for (const s of [...(f.get(6) ?? []), ...(f.get(11) ?? [])]) this.graph(s, depth + 1, true);
    this.path.pop();
    return f;
  }

  opsets(spans, depth, allowed, where) {
    const out = new Map();
    for (const s of spans) {
      const f = this.scan(s, depth, OPSET);
      const domain = this.text(f.get(1), `${where} domain`);
      if (!allowed.has(domain)) throw this.reject(`${where} domain '${domain}' is not allowed; allowed: ${domainList(this.shown)}`);
      const versions = f.get(2);
      out.set(domain, versions ? signed64(last(versions)) : 0);
    }
    return out;
  }

  model() {
    const size = this.buf.length;
    const f = this.scan([0, size], 0, MODEL);
    if (!f.get(7)) throw this.reject("not an ONNX model: no graph");
    const metadata = new Map();
    for (const s of f.get(14) ?? []) {
      const kv = this.scan(s, 1, SSE_KEEP);
      const key = this.utf8(kv.get(1));
      const value = this.utf8(kv.get(2));
      if (key === "ort_config") throw this.reject("metadata_props key 'ort_config' (onnxruntime session options) is not allowed");
      metadata.set(key, value);
    }
    const functions = [];
    for (const s of f.get(25) ?? []) {
      const ff = this.scan(s, 1, FUNCTION);
      const name = this.text(ff.get(1), "function name");
      const domain = this.text(ff.get(10), `domain of function '${name}'`);
      const overload = this.text(ff.get(13), `overload of function '${name}'`);
      const qual = `${domain}::${name}` + (overload ? ` (overload '${overload}')` : "");
      if (this.allowed.has(domain) || reserved(domain)) {
        throw this.reject(
          `function '${qual}' uses domain '${domain}', which is reserved for built-in operators ` +
            "(onnxruntime would run a built-in op instead); local functions need their own domain",
        );
      }
      const sig = JSON.stringify([domain, name, overload]);
      if (this.functions.has(sig)) throw this.reject(`function '${qual}' is defined twice`);
      this.functions.set(sig, functions.length);
      functions.push([qual, ff]);
    }
    this.functionDomains = new Set([...this.functions.keys()].map((k) => JSON.parse(k)[0]));
    const opsetOk = new Set([...this.allowed, ...this.functionDomains]);
    const fnNodes = [];
    const fnCalls = [];
    for (const [qual, ff] of functions) {
      this.path = [`function '${qual}'`];
      this.calls = [];
      this.nodes = 0;
      this.consts = new Map();
      (ff.get(7) ?? []).forEach((s, i) => this.node(s, 2, i));
      for (const s of ff.get(11) ?? []) this.attribute(s, 2);
      this.opsets(ff.get(9) ?? [], 2, opsetOk, "opset_import");
      fnNodes.push(this.nodes);
      fnCalls.push(this.calls);
    }
    this.path = [];
    this.calls = [];
    this.nodes = 0;
    this.consts = new Map();
    for (const s of f.get(7)) this.graph(s, 1, false);
    const unknownRank = new Set(this.unknownRank(last(f.get(7))));
    const nodeCount = this.nodes;
    const mainCalls = this.calls;
    (f.get(20) ?? []).forEach((s, i) => {
      const tf = this.scan(s, 1, TRAINING);
      for (const [field, part] of [[1, "initialization"], [2, "algorithm"]]) {
        for (const g of tf.get(field) ?? []) {
          this.path = [`training_info[${i}] ${part}`];
          this.calls = [];
          this.consts = new Map();
          this.graph(g, 2, false);
        }
      }
    });
    this.path = [];
    const opsets = this.opsets(f.get(8) ?? [], 1, opsetOk, "opset_import");
    const expanded = this.expand(nodeCount, mainCalls, fnNodes, fnCalls, functions.map(([q]) => q));
    return { sizeBytes: size, opsets, nodeCount, expandedNodeCount: expanded, functionCount: functions.length, metadata, unknownRank };
  }

  unknownRank(graph) {
    const f = this.scan(graph, 1, GRAPH_PORTS);
    const out = [];
    for (const s of [...(f.get(11) ?? []), ...(f.get(12) ?? [])]) {
      const vi = this.scan(s, 2, VALUE_INFO_KEEP);
      for (const t of (vi.get(2) ?? []).slice(-1)) {
        const tensor = this.scan(t, 3, TYPE_KEEP).get(1);
        if (tensor && !this.scan(last(tensor), 4, TENSOR_TYPE_KEEP).get(2)) out.push(this.utf8(vi.get(1)));
      }
    }
    return out;
  }

  utf8(spans) {
    if (!spans || !spans.length) return "";
    const [s, e] = last(spans);
    return utf8.decode(this.buf.subarray(s, e));
  }
}

/** Check serialized ONNX `data` (a Buffer); returns a summary or throws PlanRejected / PlanTooLarge. */
export function checkModel(
  data,
  { maxBytes, allowedDomains = DEFAULT_DOMAINS, maxNodes = 100_000, maxTensorBytes = null, maxFunctionDepth = 8, maxLoopTrips = 1 << 24 },
) {
  const size = data.length;
  if (size > maxBytes) throw new PlanRejected(`plan is ${human(size)}, over the worker limit of ${human(maxBytes)}`);
  if (size > PROTOBUF_LIMIT) throw new PlanRejected(`plan is ${human(size)}, over protobuf's 2 GiB limit`);
  if (data.subarray(4, 8).toString("latin1") === "ORTM") {
    throw new PlanRejected("plan carries the ORT-format identifier 'ORTM'; only ONNX protobuf plans are accepted");
  }
  return new Checker(data, new Set(allowedDomains), maxBytes, maxNodes, maxTensorBytes, maxFunctionDepth, maxLoopTrips).model();
}
