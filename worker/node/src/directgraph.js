// The direct lane's first step (src/direct.js): a plan's graph read off its ONNX protobuf, once per plan,
// with the checks that need only the plan (ops in the default domain and in ALLOWED, float types only, no
// local functions, subgraphs, tensor attributes, sparse initializers or training info, at most MAX_NODES
// nodes and the byte bound of initializers). The plan's bytes were checked by src/modelcheck.js first
// (sizes and nesting bounded); what this reader finds outside the rule is a NotDirect, never a refusal of
// the plan: the runner runs such plans. The same rule as worker/direct.py's read of the graph.

export const ALLOWED = new Set([
  ...["Add", "Sub", "Mul", "Div", "Max", "Min"], // broadcasting elementwise (Max/Min: any number of inputs)
  ...["Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Identity"], // same shape
  ...["Softmax", "LogSoftmax", "MatMul", "Gemm", "Transpose", "Constant"],
]);
export const MAX_NODES = 64;
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

/** Why a plan is not direct-safe (only for the log; the lane then leaves the plan to the runner). */
export class NotDirect extends Error {}

/** The number of elements of a tensor of `shape`. */
export const count = (shape) => shape.reduce((a, b) => a * b, 1);

const MODEL = { graph: 7, trainingInfo: 20, functions: 25 };
const GRAPH = { node: 1, initializer: 5, sparseInitializer: 15, input: 11, output: 12, valueInfo: 13 };
const NODE = { input: 1, output: 2, op: 4, attribute: 5, domain: 7 };
const ATTR = { name: 1, i: 3, t: 5, ints: 8, tensorsAndGraphs: new Set([5, 6, 10, 11, 14, 15, 21, 22, 23]) };
const TENSOR = { dims: 1, dataType: 2, segment: 3, name: 8, dataLocation: 14 };
const utf8 = new TextDecoder("utf-8");

/** The graph of plan `data`: {nodes, initializers, inputs, outputs, initBytes}; NotDirect when the plan is
 * outside the rule (a RangeError or TypeError on bytes malformed past what src/modelcheck.js reads). */
export function readGraph(data, maxBytes) {
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
