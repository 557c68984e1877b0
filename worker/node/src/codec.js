// Tensors on the wire (PROTOCOL.md §3): {dtype, shape, frame} plus raw little-endian C-order bytes.

import { ProtocolError } from "./messages.js";

/** wire dtype -> item size, onnxruntime-node tensor type, typed array view. */
export const DTYPES = {
  float: { size: 4, ort: "float32", view: Float32Array },
  double: { size: 8, ort: "float64", view: Float64Array },
  float16: { size: 2, ort: "float16", view: Uint16Array },
  int64: { size: 8, ort: "int64", view: BigInt64Array },
  int32: { size: 4, ort: "int32", view: Int32Array },
  int16: { size: 2, ort: "int16", view: Int16Array },
  int8: { size: 1, ort: "int8", view: Int8Array },
  uint8: { size: 1, ort: "uint8", view: Uint8Array },
  uint16: { size: 2, ort: "uint16", view: Uint16Array },
  uint32: { size: 4, ort: "uint32", view: Uint32Array },
  uint64: { size: 8, ort: "uint64", view: BigUint64Array },
  bool: { size: 1, ort: "bool", view: Uint8Array },
};
export const FROM_ORT = Object.fromEntries(Object.entries(DTYPES).map(([w, d]) => [d.ort, w]));
const FRIENDLY = { float: "float32", double: "float64" };

export const human = (wire) => FRIENDLY[wire] ?? wire;
export const humanList = () => Object.keys(DTYPES).map(human).join(", ");

/** A stored tensor: wire dtype, shape (numbers) and its bytes (a Buffer it owns or shares read-only). */
export class Tensor {
  constructor(dtype, shape, data) {
    this.dtype = dtype;
    this.shape = shape;
    this.data = data;
    this.feed = undefined; // what onnxruntime-node's binding reads of it (src/runtime.js), made at its first run
  }
  get nbytes() {
    return this.data.length;
  }
}

const LIMIT = 2n ** 63n;

export function shapeText(shape) {
  const text = "[" + shape.map(String).join(", ") + "]";
  return text.length <= 200 ? text : text.slice(0, 200) + "...]";
}

/** A Tensor from a header's description and a received frame; bad_frames / invalid_message. */
export function fromFrame(dtype, shape, frame, what) {
  const dt = DTYPES[dtype];
  if (!dt) throw new ProtocolError("invalid_message", `${what}: unknown tensor dtype ${dtype}`);
  if (shape.length <= 8 && shape.every((d) => typeof d === "number" && d < 2 ** 20)) {
    // the common case: exact in doubles while the product of the non-zero axes stays below 2^53
    let n = dt.size;
    let nonzero = dt.size;
    for (const d of shape) (n *= d), (nonzero *= d || 1);
    if (nonzero < 2 ** 53) {
      if (frame.length !== n) {
        throw new ProtocolError(
          "bad_frames",
          `${what}: ${human(dtype)}${shapeText(shape)} needs ${n} bytes, its frame has ${frame.length}`,
        );
      }
      return new Tensor(dtype, shape, frame);
    }
  }
  let count = 1n;
  let nonzero = 1n;
  for (const d of shape) {
    const b = BigInt(d);
    count *= b;
    if (b !== 0n) nonzero *= b;
  }
  const expected = count * BigInt(dt.size);
  if (BigInt(frame.length) !== expected) {
    throw new ProtocolError(
      "bad_frames",
      `${what}: ${human(dtype)}${shapeText(shape)} needs ${expected} bytes, its frame has ${frame.length}`,
    );
  }
  if (nonzero * BigInt(dt.size) >= LIMIT) {
    throw new ProtocolError(
      "invalid_message",
      `${what}: shape ${shapeText(shape)} cannot be represented: the product of its non-zero axes times ` +
        `${dt.size} bytes must stay below 2^63 even for an empty tensor`,
    );
  }
  return new Tensor(dtype, shape.map(Number), frame);
}

/** An onnxruntime tensor over a stored tensor's bytes (copied only when misaligned). */
export function toOrt(ort, t) {
  const dt = DTYPES[t.dtype];
  let buf = t.data;
  if (buf.byteOffset % dt.size !== 0) buf = Buffer.from(buf);
  const view = new dt.view(buf.buffer, buf.byteOffset, buf.length / dt.size);
  return new ort.Tensor(dt.ort, view, t.shape);
}

/** A stored tensor from an onnxruntime output; null when its type is not a wire dtype. */
export function fromOrt(value) {
  const wire = FROM_ORT[value.type];
  if (wire === undefined) return null;
  const d = value.data;
  const dims = value.dims;
  const shape = new Array(dims.length);
  for (let i = 0; i < dims.length; i++) shape[i] = Number(dims[i]);
  return new Tensor(wire, shape, Buffer.from(d.buffer, d.byteOffset, d.byteLength));
}
