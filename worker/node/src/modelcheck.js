// Reject hostile ONNX plans before onnxruntime sees them: a port of transport/plancheck.py, onnxproto.py and plansize.py (same policy,
// same codes, same messages). The protobuf wire format is walked directly (no copies of tensor payloads,
// raw_data and other large fields skipped by length); see that module's docstring for the policy.

export const DEFAULT_DOMAINS = new Set(["", "ai.onnx"]);
export const MAX_DEPTH = 64;
export const MAX_FIELDS = 5_000_000;
export const PROTOBUF_LIMIT = 2 ** 31 - 1;
const ONNX_ALIASES = new Set(["", "ai.onnx"]);
const RESERVED_PREFIXES = ["ai.onnx", "onnx", "com.microsoft", "com.ms", "org.pytorch", "pkg.onnxruntime", "trt"];
const NAME_LIMIT = 120;
const TEXT_LIMIT = 4096;

export class PlanRejected extends Error {
  get code() {
    return "bad_plan";
  }
}
export class PlanTooLarge extends PlanRejected {
  get code() {
    return "plan_too_large";
  }
}

// --- wire-format schemas (field number -> [wire-type mask, generic sub-message, keep?]) ---
const V = 1 << 0,
  I64 = 1 << 1,
  L = 1 << 2,
  I32 = 1 << 5;
const WT_NAMES = { 0: "varint", 1: "fixed64", 2: "length-delimited", 5: "fixed32" };

class Msg {
  constructor(name, strict, fields) {
    this.name = name;
    this.strict = strict;
    this.fields = new Map(Object.entries(fields).map(([k, v]) => [Number(k), v]));
  }
}
const plain = (nums, mask = L) => Object.fromEntries(nums.map((n) => [n, [mask, null, false]]));
const keep = (nums, mask = L) => Object.fromEntries(nums.map((n) => [n, [mask, null, true]]));
const sub = (msg, nums) => Object.fromEntries(nums.map((n) => [n, [L, msg, false]]));

const SSE = new Msg("StringStringEntryProto", false, plain([1, 2]));
const SSE_KEEP = new Msg("StringStringEntryProto", false, keep([1, 2]));
const OPSET = new Msg("OperatorSetIdProto", false, { ...keep([1]), ...keep([2], V) });
const DIM = new Msg("TensorShapeProto.Dimension", false, { ...plain([1], V), ...plain([2, 3]) });
const SHAPE = new Msg("TensorShapeProto", false, sub(DIM, [1]));
const TENSOR_TYPE = new Msg("TypeProto.Tensor", false, { ...plain([1], V), ...sub(SHAPE, [2]) });
const TYPE = new Msg("TypeProto", false, {});
const SEQ_TYPE = new Msg("TypeProto.Sequence", false, sub(TYPE, [1]));
const MAP_TYPE = new Msg("TypeProto.Map", false, { ...plain([1], V), ...sub(TYPE, [2]) });
const OPT_TYPE = new Msg("TypeProto.Optional", false, sub(TYPE, [1]));
const OPAQUE_TYPE = new Msg("TypeProto.Opaque", false, plain([1, 2]));
for (const [k, v] of Object.entries({
  ...sub(TENSOR_TYPE, [1, 8]),
  ...sub(SEQ_TYPE, [4]),
  ...sub(MAP_TYPE, [5]),
  ...sub(OPT_TYPE, [9]),
  ...sub(OPAQUE_TYPE, [7]),
  ...plain([6]),
})) {
  TYPE.fields.set(Number(k), v);
}
const VALUE_INFO = new Msg("ValueInfoProto", false, { ...plain([1, 3]), ...sub(TYPE, [2]), ...sub(SSE, [4]) });
const TENSOR_ANN = new Msg("TensorAnnotation", false, { ...plain([1]), ...sub(SSE, [2]) });
const SEGMENT = new Msg("TensorProto.Segment", false, plain([1, 2], V));
const INT_LIST = new Msg("IntIntListEntryProto", false, { ...plain([1], V), ...plain([2], V | L) });
const SIMPLE_DIM = new Msg("SimpleShardedDimProto", false, { ...plain([1, 3], V), ...plain([2]) });
const SHARDED_DIM = new Msg("ShardedDimProto", false, { ...plain([1], V), ...sub(SIMPLE_DIM, [2]) });
const SHARDING = new Msg("ShardingSpecProto", false, {
  ...plain([1]),
  ...plain([2], V | L),
  ...sub(INT_LIST, [3]),
  ...sub(SHARDED_DIM, [4]),
});
const NODE_DEVICE = new Msg("NodeDeviceConfigurationProto", false, { ...plain([1]), ...sub(SHARDING, [2]), ...plain([3], V) });
const DEVICE = new Msg("DeviceConfigurationProto", false, { ...plain([1, 3]), ...plain([2], V) });

const MODEL = new Msg("ModelProto", true, {
  ...keep([1, 5], V),
  ...keep([2, 3, 7, 8, 14, 20, 25]),
  ...plain([4, 6]),
  ...sub(DEVICE, [26]),
});
const GRAPH = new Msg("GraphProto", true, {
  ...keep([1, 2, 5, 15]),
  ...plain([10]),
  11: [L, VALUE_INFO, true],
  12: [L, VALUE_INFO, true],
  ...sub(VALUE_INFO, [13]),
  ...sub(TENSOR_ANN, [14]),
  ...sub(SSE, [16]),
});
const NODE = new Msg("NodeProto", true, { ...plain([6]), ...keep([1, 2, 3, 4, 5, 7, 8]), ...sub(SSE, [9]), ...sub(NODE_DEVICE, [10]) });
const ATTRIBUTE = new Msg("AttributeProto", true, {
  ...keep([1, 5, 6, 10, 11, 22, 23]),
  ...plain([4, 9, 13, 21]),
  ...keep([3], V),
  ...plain([20], V),
  ...plain([2], I32),
  ...plain([7], I32 | L),
  ...keep([8], V | L),
  ...sub(TYPE, [14, 15]),
});
const TENSOR = new Msg("TensorProto", true, {
  ...keep([1, 5, 7], V | L),
  ...plain([11], V | L),
  ...keep([2], V),
  ...sub(SEGMENT, [3]),
  ...keep([4], I32 | L),
  ...plain([6, 12]),
  ...keep([8, 9, 13]),
  ...keep([10], I64 | L),
  ...keep([14], V),
  ...sub(SSE, [16]),
});
const GRAPH_PORTS = new Msg("GraphProto", false, keep([11, 12]));
const VALUE_INFO_KEEP = new Msg("ValueInfoProto", false, keep([1, 2]));
const TYPE_KEEP = new Msg("TypeProto", false, keep([1]));
const TENSOR_TYPE_KEEP = new Msg("TypeProto.Tensor", false, keep([2]));
const SPARSE = new Msg("SparseTensorProto", true, { ...keep([1, 2]), ...keep([3], V | L) });
const ELEM_BITS = new Map(
  Object.entries({
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64,
    15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2, 27: 6, 28: 6,
  }).map(([k, v]) => [Number(k), v]),
);
const FUNCTION = new Msg("FunctionProto", true, {
  ...keep([1, 7, 9, 10, 11, 13]),
  ...plain([4, 5, 6, 8]),
  ...sub(VALUE_INFO, [12]),
  ...sub(SSE, [14]),
});
const TRAINING = new Msg("TrainingInfoProto", true, { ...keep([1, 2]), ...sub(SSE, [3, 4]) });

const SIZED_OPS = new Set(["Constant", "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Loop"]);
const SMALL = 64;
// dtype -> [bytes, reader(DataView, offset)]
const PACKED = new Map([
  [1, [4, (d, o) => d.getFloat32(o, true)]],
  [6, [4, (d, o) => d.getInt32(o, true)]],
  [7, [8, (d, o) => Number(d.getBigInt64(o, true))]],
  [11, [8, (d, o) => d.getFloat64(o, true)]],
  [10, [2, (d, o) => half(d.getUint16(o, true))]],
  [12, [4, (d, o) => d.getUint32(o, true)]],
  [13, [8, (d, o) => Number(d.getBigUint64(o, true))]],
  [2, [1, (d, o) => d.getUint8(o)]],
  [3, [1, (d, o) => d.getInt8(o)]],
  [4, [2, (d, o) => d.getUint16(o, true)]],
  [5, [2, (d, o) => d.getInt16(o, true)]],
]);

function half(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

const bitsOf = (t, dflt) => ELEM_BITS.get(t) ?? dflt;
function itemsize(f) {
  const types = f.get(2);
  return bitsOf(types ? Number(types[types.length - 1]) : 1, 128) / 8;
}
const last = (a) => a[a.length - 1];

/** Python's f"{n:.0f}" / f"{n:.1f}" human sizes. */
function human(n) {
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (n < 1024 || unit === "GiB") return n === Math.trunc(n) ? `${n.toFixed(0)} ${unit}` : `${n.toFixed(1)} ${unit}`;
    n /= 1024;
  }
}

/** Python's format(x, ".3g"). */
function g3(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  if (x === 0) return "0";
  const [mant, expText] = x.toExponential(2).split("e");
  const exp = Number(expText);
  const strip = (t) => (t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t);
  if (exp >= -4 && exp < 3) return strip(x.toFixed(2 - exp));
  return `${strip(mant)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
}

function signed64(v) {
  if (typeof v === "number") return v;
  v &= 0xffffffffffffffffn;
  return Number(v >= 1n << 63n ? v - (1n << 64n) : v);
}

const domainList = (domains) => [...domains].sort().map((d) => `'${d}'`).join(", ") || "(none)";
const reserved = (domain) => domain === "" || RESERVED_PREFIXES.some((p) => domain.startsWith(p));
const utf8Fatal = new TextDecoder("utf-8", { fatal: true });
const utf8 = new TextDecoder("utf-8");
const NONPRINT = /[\p{C}\p{Z}]/u;

function escapeChar(c) {
  if (c === " ") return c;
  const n = c.codePointAt(0);
  if (c === "\n") return "\\n";
  if (c === "\r") return "\\r";
  if (c === "\t") return "\\t";
  if (n < 0x100) return "\\x" + n.toString(16).padStart(2, "0");
  if (n < 0x10000) return "\\u" + n.toString(16).padStart(4, "0");
  return "\\U" + n.toString(16).padStart(8, "0");
}

function pyList(values) {
  return "[" + values.map((d) => (Number.isFinite(d) ? String(Math.trunc(d)) : Number.isNaN(d) ? "nan" : d > 0 ? "inf" : "-inf")).join(", ") + "]";
}

class Checker {
  constructor(buf, allowed, maxBytes, maxNodes, maxTensorBytes, maxFunctionDepth, maxLoopTrips) {
    this.buf = buf;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.maxBytes = maxBytes;
    this.maxTensorBytes = maxTensorBytes ?? maxBytes;
    this.maxFunctionDepth = maxFunctionDepth;
    this.maxLoopTrips = maxLoopTrips;
    this.allNodes = 0;
    this.consts = new Map();
    this.shown = allowed;
    this.allowed = [...allowed].some((d) => ONNX_ALIASES.has(d)) ? new Set([...allowed, ...ONNX_ALIASES]) : allowed;
    this.maxNodes = maxNodes;
    this.path = [];
    this.fields = 0;
    this.functions = new Map();
    this.functionDomains = new Set();
    this.calls = [];
    this.nodes = 0;
  }

  reject(msg, Cls = PlanRejected) {
    const where = this.path.length ? ` (in ${this.path.join(" > ")})` : "";
    return new Cls(msg + where);
  }
  tooLarge(msg) {
    return this.reject(msg, PlanTooLarge);
  }
  malformed(msg, pos) {
    return this.reject(`malformed plan: ${msg} at byte ${pos}`);
  }

  label(spans) {
    if (!spans || !spans.length) return "";
    const [s, e] = last(spans);
    let text = utf8.decode(this.buf.subarray(s, Math.min(e, s + 4 * NAME_LIMIT)));
    if (NONPRINT.test(text.replace(/ /g, ""))) {
      text = Array.from(text, (c) => (/^[\p{C}\p{Z}]$/u.test(c) && c !== " " ? escapeChar(c) : c)).join("");
    }
    const chars = Array.from(text);
    return chars.length > NAME_LIMIT || e - s > 4 * NAME_LIMIT ? chars.slice(0, NAME_LIMIT).join("") + "..." : text;
  }

  text(spans, what) {
    if (!spans || !spans.length) return "";
    const [s, e] = last(spans);
    if (e - s > TEXT_LIMIT) throw this.reject(`${what} is ${e - s} bytes long`);
    try {
      return utf8Fatal.decode(this.buf.subarray(s, e));
    } catch {
      throw this.reject(`${what} is not valid UTF-8: '${this.label(spans)}'`);
    }
  }

  varint(pos, end) {
    const buf = this.buf;
    const start = pos;
    let result = 0;
    let shift = 0;
    for (;;) {
      if (pos >= end) throw this.malformed("truncated varint", start);
      const b = buf[pos++];
      if (shift < 49) {
        result += (b & 0x7f) * 2 ** shift;
      } else {
        if (typeof result === "number") result = BigInt(result);
        result |= BigInt(b & 0x7f) << BigInt(shift);
      }
      if (b < 0x80) {
        if (typeof result === "bigint" && result < 1n << 53n) result = Number(result);
        return [result, pos];
      }
      shift += 7;
      if (shift >= 70) throw this.malformed("varint longer than 10 bytes", start);
    }
  }

  scan(span, depth, msg) {
    if (depth > MAX_DEPTH) throw this.reject(`malformed plan: messages nested deeper than ${MAX_DEPTH}`);
    const buf = this.buf;
    let [pos, end] = span;
    const table = msg.fields;
    const out = new Map();
    let count = 0;
    const budget = MAX_FIELDS - this.fields;
    while (pos < end) {
      const at = pos;
      let tag = buf[pos];
      if (tag < 0x80) pos += 1;
      else [tag, pos] = this.varint(pos, end);
      if (typeof tag === "bigint" || tag > 0xffffffff || tag < 8) {
        const fno = typeof tag === "bigint" ? tag >> 3n : Math.floor(tag / 8);
        throw this.malformed(`invalid field number ${fno} in ${msg.name}`, at);
      }
      const fno = tag >>> 3;
      const wt = tag & 7;
      let val;
      if (wt === 0) {
        if (pos < end && buf[pos] < 0x80) val = buf[pos++];
        else [val, pos] = this.varint(pos, end);
      } else if (wt === 2) {
        let n;
        if (pos < end && buf[pos] < 0x80) n = buf[pos++];
        else [n, pos] = this.varint(pos, end);
        if (typeof n === "bigint" || n > end - pos) {
          throw this.malformed(`field ${fno} of ${msg.name} runs past the end of its message`, at);
        }
        val = [pos, pos + n];
        pos += n;
      } else if (wt === 5 || wt === 1) {
        pos += wt === 5 ? 4 : 8;
        if (pos > end) throw this.malformed(`field ${fno} of ${msg.name} runs past the end of its message`, at);
        val = null;
      } else {
        throw this.malformed(`invalid wire type ${wt} (field ${fno} of ${msg.name})`, at);
      }
      count += 1;
      if (count > budget) throw this.reject(`plan has more than ${MAX_FIELDS} protobuf fields`);
      const entry = table.get(fno);
      if (entry === undefined) {
        if (msg.strict) throw this.malformed(`unknown field ${fno} in ${msg.name}`, at);
        continue;
      }
      const [mask, subMsg, store] = entry;
      if (!((mask >> wt) & 1)) throw this.malformed(`field ${fno} of ${msg.name} has wire type ${WT_NAMES[wt]}`, at);
      if (wt === 2 && mask !== L) {
        let partial;
        if (mask & V) partial = pos > val[0] && buf[pos - 1] >= 0x80;
        else partial = (pos - val[0]) % (mask & I32 ? 4 : 8) !== 0;
        if (partial) throw this.malformed(`packed field ${fno} of ${msg.name} ends in a partial element`, at);
      }
      if (subMsg !== null) this.scan(val, depth + 1, subMsg);
      if (store) {
        const kept = out.get(fno);
        if (kept === undefined) out.set(fno, [val]);
        else if (wt === 2 || kept.length < 128) kept.push(val);
        else kept[kept.length - 1] = val;
      }
    }
    this.fields += count;
    return out;
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

  raw(span) {
    return this.buf.toString("latin1", span[0], span[1]);
  }

  bound(dims, size, what) {
    const limit = this.maxTensorBytes;
    let count = 1.0;
    for (const d of dims) count *= Math.max(d, 0);
    if (count * size > limit) {
      throw this.tooLarge(
        `${what} would make a tensor of ${g3(count)} elements (shape ${pyList(dims.slice(0, 8))}` +
          `${dims.length > 8 ? "..." : ""}), more than ${human(limit)}, the worker's limit per tensor`,
      );
    }
  }

  constant(f, name = null) {
    const key = name === null && f.get(8) ? this.raw(last(f.get(8))) : name;
    if (!key) return;
    const dims = this.ints(f.get(1) ?? [], "constant dims");
    const types = f.get(2);
    const dtype = types ? Number(last(types)) : 1;
    let count = 1;
    for (const d of dims) count *= Math.max(d, 0);
    const values = count <= SMALL ? this.values(f, dtype, count) : null;
    this.consts.set(key, { dtype, dims, values });
  }

  values(f, dtype, count) {
    const raw = f.get(9);
    if (raw) {
      const fmt = PACKED.get(dtype);
      const [s, e] = last(raw);
      if (fmt === undefined || e - s !== count * fmt[0]) return null;
      const out = [];
      for (let o = s; o < e; o += fmt[0]) out.push(fmt[1](this.view, o));
      return out;
    }
    const field = dtype !== 7 ? 5 : 7;
    if ([6, 7, 2, 3, 4, 5, 9].includes(dtype) && f.get(field)) {
      const out = this.ints(f.get(field), "constant values", SMALL);
      return out.length === count ? out : null;
    }
    const packed = { 1: [4, 4], 11: [10, 8] }[dtype];
    if (packed && f.get(packed[0])) {
      const spans = f.get(packed[0]).filter(Array.isArray).slice(0, SMALL);
      let total = 0;
      for (const [a, b] of spans) total += b - a;
      if (total !== count * packed[1]) return null;
      const data = Buffer.concat(spans.map(([a, b]) => this.buf.subarray(a, b)));
      const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const out = [];
      for (let o = 0; o < data.length; o += packed[1]) out.push(packed[1] === 4 ? dv.getFloat32(o, true) : dv.getFloat64(o, true));
      return out;
    }
    return count === 0 ? [] : null;
  }

  sized(op, desc, ins, outs, attrs) {
    const consts = this.consts;
    const konst = (i) => (i < ins.length && ins[i] ? (consts.get(ins[i]) ?? null) : null);
    const vals = (i) => {
      const c = konst(i);
      return c !== null ? c.values : null;
    };
    const nonempty = (a) => a !== null && a !== undefined && a.length > 0;
    if (op === "Constant") {
      const a = attrs.get("value");
      if (a && a.get(5) && outs.length) {
        this.constant(this.scan(last(a.get(5)), 0, TENSOR), outs[0]);
      } else if (outs.length && (attrs.get("value_ints") || attrs.get("value_int"))) {
        const a2 = attrs.get("value_ints") || attrs.get("value_int");
        const key = attrs.has("value_ints") ? 8 : 3;
        const v = this.ints(a2.get(key) ?? [], "value_ints", SMALL);
        consts.set(outs[0], { dtype: 7, dims: key === 8 ? [v.length] : [], values: v });
      }
      return;
    }
    if (op === "ConstantOfShape") {
      const shape = vals(0);
      const a = attrs.get("value");
      const size = a && a.get(5) ? itemsize(this.scan(last(a.get(5)), 0, TENSOR)) : 4;
      if (shape !== null) this.bound(shape, size, desc);
    } else if (op === "Expand") {
      const shape = vals(1);
      const x = konst(0);
      if (shape !== null) this.bound(shape, x ? bitsOf(x.dtype, 8) / 8 : 1, desc);
    } else if (op === "Tile") {
      const reps = vals(1);
      const x = konst(0);
      if (reps !== null) {
        const base = x ? x.dims : [];
        this.bound([...base, ...reps], x ? bitsOf(x.dtype, 8) / 8 : 1, desc);
      }
    } else if (op === "Range") {
      const [start, limit, delta] = [vals(0), vals(1), vals(2)];
      if (nonempty(start) && nonempty(limit) && nonempty(delta) && delta[0]) {
        const span = (limit[0] - start[0]) / delta[0];
        const n = Number.isFinite(span) ? Math.ceil(span) : Infinity;
        const c = konst(0);
        this.bound([n], bitsOf(c ? c.dtype : 7, 64) / 8, desc);
      }
    } else if (op === "Resize") {
      const x = konst(0);
      const [sizes, scales] = [vals(3), vals(2)];
      const size = x ? bitsOf(x.dtype, 8) / 8 : 1;
      if (nonempty(sizes)) this.bound(sizes, size, desc);
      else if (nonempty(scales)) {
        const base = x && x.dims.length === scales.length ? x.dims : scales.map(() => 1);
        this.bound(base.map((d, i) => (Number.isFinite(scales[i]) ? Math.floor(d * scales[i]) : Infinity)), size, desc);
      }
    } else if (op === "Loop") {
      const hasTrips = ins.length > 0 && !!ins[0];
      const hasCond = ins.length > 1 && !!ins[1];
      const trips = hasTrips ? vals(0) : null;
      const cond = hasCond ? vals(1) : null;
      if (!hasTrips && !hasCond) throw this.tooLarge(`${desc} has neither a trip count nor a condition: it never ends`);
      const always = !hasCond || (cond !== null && cond.length === 1 && cond[0] !== 0);
      if (nonempty(trips) && always && trips[0] > this.maxLoopTrips) {
        throw this.tooLarge(`${desc} runs ${Math.trunc(trips[0])} times, more than the worker's limit of ${this.maxLoopTrips} loop trips`);
      }
    }
  }

  ints(items, what, most = MAX_DEPTH) {
    const out = [];
    for (const item of items) {
      if (!Array.isArray(item)) out.push(signed64(item));
      else {
        let [pos, end] = item;
        while (pos < end && out.length <= most) {
          let v;
          [v, pos] = this.varint(pos, end);
          out.push(signed64(v));
        }
      }
      if (out.length > most) throw this.reject(`${what} has more than ${most} entries`);
    }
    return out;
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

  expand(nodes, calls, fnNodes, fnCalls, names) {
    const cap = this.maxNodes + 1;
    const pending = fnCalls.map((c) => new Set(c).size);
    const callers = fnCalls.map(() => []);
    fnCalls.forEach((c, i) => {
      for (const j of new Set(c)) callers[j].push(i);
    });
    const cost = fnCalls.map(() => 0);
    const depth = fnCalls.map(() => 0);
    const ready = [];
    pending.forEach((p, i) => p === 0 && ready.push(i));
    let done = 0;
    while (ready.length) {
      const i = ready.pop();
      done += 1;
      cost[i] = Math.min(cap, fnNodes[i] - fnCalls[i].length + fnCalls[i].reduce((a, j) => a + cost[j], 0));
      depth[i] = 1 + fnCalls[i].reduce((a, j) => Math.max(a, depth[j]), 0);
      if (depth[i] > this.maxFunctionDepth) {
        throw this.tooLarge(
          `local function '${names[i]}' nests ${depth[i]} levels of function calls, more than the worker's limit of ${this.maxFunctionDepth}`,
        );
      }
      for (const k of callers[i]) {
        pending[k] -= 1;
        if (pending[k] === 0) ready.push(k);
      }
    }
    if (done < fnCalls.length) {
      const stuck = names.filter((_, i) => pending[i]).map((n) => `'${n}'`).join(", ");
      throw this.reject(`local functions call themselves recursively: ${stuck}`);
    }
    const total = nodes - calls.length + calls.reduce((a, j) => a + cost[j], 0);
    if (total > this.maxNodes) throw this.tooLarge(`plan expands to more than ${this.maxNodes} nodes once local functions are inlined`);
    return total;
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
