// Resources a plan fixes up front, bounded before onnxruntime allocates them: a port of transport/plansize.py
// (same rules, same messages). Tensor sizes the plan declares or computes from constants (ConstantOfShape,
// Expand, Tile, Range, Resize), Loop trip counts, and the node count once local functions are inlined.

import { bitsOf, itemsize, last, Reader, TENSOR } from "./onnxproto.js";

export const SIZED_OPS = new Set(["Constant", "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Loop"]);
export const SMALL = 64;
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

/** Python's f"{n:.0f}" / f"{n:.1f}" human sizes. */
export function human(n) {
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

function pyList(values) {
  return "[" + values.map((d) => (Number.isFinite(d) ? String(Math.trunc(d)) : Number.isNaN(d) ? "nan" : d > 0 ? "inf" : "-inf")).join(", ") + "]";
}

/** The size rules, on top of the wire-format Reader. */
export class SizeRules extends Reader {
  constructor(buf, maxTensorBytes, maxFunctionDepth, maxLoopTrips) {
    super(buf);
    this.maxTensorBytes = maxTensorBytes;
    this.maxFunctionDepth = maxFunctionDepth;
    this.maxLoopTrips = maxLoopTrips;
    this.maxNodes = 0;
    this.consts = new Map(); // small constants of the scope being walked, by value name
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
}
