// ONNX models read straight off the protobuf wire format: a port of transport/onnxproto.py (same field tables,
// same messages). Field tables say, per message type, which field numbers may appear with which wire types,
// which are kept for the caller and which are sub-messages walked generically; the Reader validates as it
// walks (truncated varints, lengths past the enclosing message, wrong wire types, unknown fields in strict
// messages, nesting deeper than MAX_DEPTH, more than MAX_FIELDS fields) and throws PlanRejected naming the fault.

export const MAX_DEPTH = 64;
export const MAX_FIELDS = 5_000_000;
export const PROTOBUF_LIMIT = 2 ** 31 - 1;
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

export { ATTRIBUTE, FUNCTION, GRAPH, GRAPH_PORTS, MODEL, NODE, OPSET, SPARSE, SSE_KEEP, TENSOR, TENSOR_TYPE_KEEP, TRAINING, TYPE_KEEP, VALUE_INFO_KEEP };

export const bitsOf = (t, dflt) => ELEM_BITS.get(t) ?? dflt;
export function itemsize(f) {
  const types = f.get(2);
  return bitsOf(types ? Number(types[types.length - 1]) : 1, 128) / 8;
}
export const last = (a) => a[a.length - 1];

export function signed64(v) {
  if (typeof v === "number") return v;
  v &= 0xffffffffffffffffn;
  return Number(v >= 1n << 63n ? v - (1n << 64n) : v);
}

const utf8Fatal = new TextDecoder("utf-8", { fatal: true });
export const utf8 = new TextDecoder("utf-8");
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

/** The bounded protobuf walk, its errors (naming where in the plan) and its strings. */
export class Reader {
  constructor(buf) {
    this.buf = buf;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.path = [];
    this.fields = 0;
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

  raw(span) {
    return this.buf.toString("latin1", span[0], span[1]);
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
}
