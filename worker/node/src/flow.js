// Data flow of a plan: which outputs depend on which inputs, computed once when the plan is registered
// (as worker/flow.py).
//
// An output computed from a private input is private itself (store.js). The analysis is conservative:
// every node's outputs depend on all of its inputs, and a node with subgraphs (If, Loop, Scan) also on
// every outer value its subgraphs read; a call of a local function on all of its inputs. Constants and
// initializers depend on nothing. The plan has passed modelcheck.js (size, nesting, field counts) before
// this reads it, so a plain protobuf walk over its bytes is bounded.

const MODEL_GRAPH = 7;
const [GRAPH_NODE, GRAPH_OUTPUT] = [1, 12];
const [NODE_INPUT, NODE_OUTPUT, NODE_OP, NODE_ATTR, NODE_DOMAIN] = [1, 2, 4, 5, 7];
const [ATTR_G, ATTR_GRAPHS] = [6, 11];
const VALUE_NAME = 1;
const utf8 = new TextDecoder("utf-8");

/** `deps[i]`: the Set of plan input indices output `i` depends on. */
export class Flow {
  constructor(deps) {
    this.deps = deps;
  }

  /** Indices of the outputs that depend on any of the given (private) argument indices. */
  privateOutputs(privateArgs) {
    const out = new Set();
    if (!privateArgs.length) return out;
    this.deps.forEach((d, i) => privateArgs.some((a) => d.has(a)) && out.add(i));
    return out;
  }
}

/** The Flow of serialized ONNX `data` whose runtime inputs and outputs are named `inputs` and `outputs`. */
export function analyze(data, inputs, outputs) {
  let graph = null;
  for (const [n, v] of fields(data)) if (n === MODEL_GRAPH) graph = v;
  const env = new Map(inputs.map((name, i) => [name, new Set([i])]));
  if (graph !== null) walk(graph, env);
  const everything = new Set(inputs.map((_, i) => i));
  // An output name the walk did not see (not for a model onnxruntime loaded): assume the worst.
  return new Flow(outputs.map((name) => env.get(name) ?? everything));
}

function walk(g, env) {
  for (const [num, node] of fields(g)) {
    if (num !== GRAPH_NODE) continue;
    const ins = [];
    const outs = [];
    const subgraphs = [];
    for (const [n, v] of fields(node)) {
      if (n === NODE_INPUT) ins.push(text(v));
      else if (n === NODE_OUTPUT) outs.push(text(v));
      else if (n === NODE_ATTR) for (const [an, a] of fields(v)) if (an === ATTR_G || an === ATTR_GRAPHS) subgraphs.push(a);
    }
    const dep = new Set();
    const add = (name) => {
      const d = name ? env.get(name) : undefined;
      if (d !== undefined) for (const i of d) dep.add(i);
    };
    ins.forEach(add);
    for (const sub of subgraphs) for (const name of namesRead(sub)) add(name); // everything it reads from outside
    for (const o of outs) if (o) env.set(o, dep);
  }
}

/** Every value name a (sub)graph's nodes read or its outputs name, nested subgraphs included. */
function* namesRead(g) {
  for (const [num, item] of fields(g)) {
    if (num === GRAPH_OUTPUT) {
      for (const [n, v] of fields(item)) if (n === VALUE_NAME) yield text(v);
    } else if (num === GRAPH_NODE) {
      for (const [n, v] of fields(item)) {
        if (n === NODE_INPUT) yield text(v);
        else if (n === NODE_ATTR) {
          for (const [an, a] of fields(v)) if (an === ATTR_G || an === ATTR_GRAPHS) yield* namesRead(a);
        }
      }
    }
  }
}

const text = (b) => utf8.decode(b);

/** [field number, bytes] of every length-delimited field of one protobuf message; others are skipped. */
function* fields(buf) {
  let pos = 0;
  const end = buf.length;
  while (pos < end) {
    let key;
    [key, pos] = varint(buf, pos);
    const num = Math.floor(key / 8);
    const wt = key % 8;
    if (wt === 0) [, pos] = varint(buf, pos);
    else if (wt === 1) pos += 8;
    else if (wt === 5) pos += 4;
    else if (wt === 2) {
      let n;
      [n, pos] = varint(buf, pos);
      yield [num, buf.subarray(pos, pos + n)];
      pos += n;
    } else throw new Error(`protobuf wire type ${wt} at byte ${pos}`);
  }
}

function varint(buf, pos) {
  let value = 0;
  let mul = 1;
  for (;;) {
    const b = buf[pos++];
    if (b === undefined) throw new Error("truncated protobuf varint");
    value += (b & 0x7f) * mul;
    if (!(b & 0x80)) return [value, pos];
    mul *= 128;
  }
}

const ORT_NODE = /running (\w[\w.:]*) node\. Name:'([^']{0,200})'/;
const NUMPY = { float: "float32", double: "float64" };

/** A failed run's message without onnxruntime's text, which may quote tensor values (a bad Reshape
 * prints its shape input): the op and node it names, and the shapes and dtypes of the arguments. */
export function redacted(plan, worker, error, args, repr) {
  const found = ORT_NODE.exec(String(error?.message ?? error));
  const where = found ? ` in node ${repr(found[2])} (op ${found[1]})` : "";
  const shapes = args.map((a) => `${NUMPY[a.dtype] ?? a.dtype}[${a.shape.join(", ")}]`).join(", ");
  return (
    `plan ${repr(plan)} failed on worker ${repr(worker)}${where} on arguments ${shapes}; onnxruntime's message is ` +
    "withheld because the run read private data (it may quote tensor values): the worker's log has it"
  );
}
