// Plans in onnxruntime-node, in this process: what the runner (src/runner.js) does with a plan, and what
// the worker itself does under --no-sandbox. A session here is {inputMetadata, outputMetadata,
// run(args) -> outputs, release()}, with codec Tensors in and out, as src/sessions.js's sessions are.

import * as ort from "onnxruntime-node";
import { DTYPES, toOrt, fromOrt } from "./codec.js";
import { pyRepr } from "./json.js";

export const PROVIDERS = ["CPUExecutionProvider"];
export const ORT_VERSION = ort.env.versions.node ?? "?";

export function sessionOptions(threads, { arena = true } = {}) {
  return {
    executionProviders: ["cpu"],
    intraOpNumThreads: Math.max(1, threads),
    interOpNumThreads: 1,
    executionMode: "sequential",
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
    enableProfiling: false,
    // No memory arena in the runner: what a run allocates goes back when it ends.
    enableCpuMemArena: arena,
    extra: {
      session: {
        load_model_format: "ONNX", // never the unchecked ORT format
        intra_op: { allow_spinning: "0" },
        inter_op: { allow_spinning: "0" },
      },
    },
  };
}

// onnxruntime-node's own native session, run synchronously: its public InferenceSession.run defers each
// call to the next event-loop turn (setImmediate), which doubles the cost of a tiny call. The binding is
// internal to onnxruntime-node (pinned in package-lock.json); without it the public API is used.
let native = null;
try {
  const m = await import("onnxruntime-node/dist/binding.js");
  const b = m.binding ?? m.default?.binding;
  const init = m.initOrt ?? m.default?.initOrt;
  if (typeof b?.InferenceSession === "function" && typeof init === "function") {
    init();
    native = b;
  }
} catch {
  native = null;
}
const NATIVE_TYPES = [undefined, "float32", "uint8", "int8", "uint16", "int16", "int32", "int64", "string", "bool", "float16", "float64", "uint32", "uint64"];

function nativeMetadata(raw) {
  return raw.map((m) =>
    m.isTensor
      ? { name: m.name, isTensor: true, type: NATIVE_TYPES[m.type] ?? `type ${m.type}`, shape: m.shape.map((d, i) => (d === -1 ? m.symbolicDimensions[i] : d)) }
      : { name: m.name, isTensor: false },
  );
}

/** Metadata as plain JSON (what the runner sends back): shapes of numbers, symbols and nulls. */
export function plainMetadata(meta) {
  return meta.map((m) => (m.isTensor ? { name: m.name, isTensor: true, type: m.type, shape: [...m.shape] } : { name: m.name, isTensor: false }));
}

function feedsOf(inputMetadata, args) {
  const feeds = {};
  inputMetadata.forEach((p, i) => (feeds[p.name] = toOrt(ort, args[i])));
  return feeds;
}

/** What the native binding reads of an input: a stored tensor's bytes viewed as its typed array. Kept on
 * the tensor (a stored tensor is never changed): a tiny call's argument is the same stored tensor call
 * after call, and a typed array and its object cost more than the binding's own reads of them. Bytes not
 * aligned for their type are copied for each run instead (a kept copy would hold them twice). */
function nativeFeed(t) {
  if (t.feed !== undefined) return t.feed;
  const dt = DTYPES[t.dtype];
  let buf = t.data;
  const aligned = buf.byteOffset % dt.size === 0;
  if (!aligned) buf = Buffer.from(buf);
  const feed = { type: dt.ort, dims: t.shape, data: new dt.view(buf.buffer, buf.byteOffset, buf.length / dt.size), location: "cpu" };
  if (aligned) t.feed = feed;
  return feed;
}

function outputsOf(outputMetadata, got) {
  return outputMetadata.map((p) => {
    const t = fromOrt(got[p.name]);
    if (t === null) throw new Error(`output ${pyRepr(p.name)} is not a tensor of a wire dtype`);
    return t;
  });
}

/** A plan's session in this process; its run(args) takes codec Tensors in input order and returns the
 * outputs as codec Tensors (synchronously with the native binding; a Promise without it). */
export async function loadSession(data, { threads = 1, arena = true } = {}) {
  const options = sessionOptions(threads, { arena });
  if (native !== null) return nativeSession(data, options);
  const s = await ort.InferenceSession.create(data, options);
  const [inputs, outputs] = [s.inputMetadata, s.outputMetadata];
  const run = async (args) => outputsOf(outputs, await s.run(feedsOf(inputs, args)));
  return { inputMetadata: inputs, outputMetadata: outputs, run, release: () => s.release() };
}

/** loadSession done now, its runs synchronous (the worker's direct lane, src/direct.js); null where
 * onnxruntime-node's native binding is not reachable (only the deferred public API). */
export function loadSessionNow(data, { threads = 1, arena = true } = {}) {
  return native === null ? null : nativeSession(data, sessionOptions(threads, { arena }));
}

function nativeSession(data, options) {
  const s = new native.InferenceSession();
  s.loadModel(data.buffer, data.byteOffset, data.byteLength, options);
  const inputMetadata = nativeMetadata(s.inputMetadata);
  const outputMetadata = nativeMetadata(s.outputMetadata);
  const names = inputMetadata.map((m) => m.name);
  const fetches = Object.fromEntries(outputMetadata.map((m) => [m.name, null]));
  // the binding reads {type, dims, data, location} off each feed: plain objects (no ort.Tensor and its
  // checks), and no run options (the session's defaults, not a fresh RunOptions parsed per call); one
  // feeds object per session (a run is synchronous), emptied after each run so it holds no argument
  const feeds = Object.fromEntries(names.map((name) => [name, null]));
  const run = (args) => {
    try {
      for (let i = 0; i < names.length; i++) feeds[names[i]] = nativeFeed(args[i]);
      return outputsOf(outputMetadata, s.run(feeds, fetches));
    } finally {
      for (let i = 0; i < names.length; i++) feeds[names[i]] = null;
    }
  };
  return { inputMetadata, outputMetadata, run, release: () => s.dispose() };
}

/** Where plans run when there is no sandbox (--no-sandbox): here. */
export class InProcess {
  constructor({ threads = 1 } = {}) {
    this.threads = threads;
  }

  load(data) {
    return loadSession(data, { threads: this.threads });
  }

  close() {}
}
