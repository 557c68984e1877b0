// One file of a state directory (PROTOCOL.md §11.1, as worker/statefiles.py describes it): framing, atomic
// writes, and reading a header back as hostile input, checked as the Python worker's typed structs are.

import * as fs from "node:fs";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { join, resolve, basename, dirname } from "node:path";
import { DTYPES, Tensor } from "./codec.js";
import { pyRepr } from "./json.js";
import { log } from "./log.js";

export const MAGIC = Buffer.from("PWSTATE\x01", "latin1"); // magic, u32 header length, JSON header, padding, payload
export const ALIGN = 64;
const MAX_HEADER = 1 << 20;
export const FORMAT = 1;
export const EXIT_NOT_DURABLE = 75; // the worker's exit status when an fsync fails (EX_TEMPFAIL)
export const SESSION_RE = /^[0-9a-f]{32}$/;
export const OWNER_RE = /^[0-9a-z]{1,1024}$/;
const C = fs.constants;
export const STRERROR = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EPERM: "Operation not permitted",
  ELOOP: "Too many levels of symbolic links",
  ENOTDIR: "Not a directory",
  EISDIR: "Is a directory",
  ENOSPC: "No space left on device",
  EDQUOT: "Disk quota exceeded",
  EROFS: "Read-only file system",
  EIO: "Input/output error",
};

/** The C library's words for an fs error (as Python's e.strerror), else libuv's. */
export function strerror(e) {
  return STRERROR[e?.code] ?? String(e?.message ?? e).replace(/^[A-Z]+: /, "").replace(/, \w+ '.*$/s, "");
}

/** The directory cannot be used (another worker holds it, not a directory, not writable). */
export class StateError extends Error {}

// -- low-level file operations ---------------------------------------------------------------------------

export function fsyncDir(path) {
  const fd = fs.openSync(path, C.O_RDONLY | C.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** `parts` (buffers) written to `path`'s temporary file (never a planted link): {tmp, fd}, its path and its
 * open descriptor. */
export function writeTemp(path, parts) {
  const tmp = join(resolve(path, ".."), `.tmp-${basename(path)}`);
  try {
    fs.unlinkSync(tmp); // left by a crash
  } catch (e) {
    if (e.code !== "ENOENT") throw e;
  }
  const fd = fs.openSync(tmp, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 0o600);
  try {
    for (const part of parts) {
      const view = typeof part === "string" ? Buffer.from(part, "utf8") : Buffer.from(part.buffer, part.byteOffset, part.byteLength);
      for (let at = 0; at < view.length; ) at += fs.writeSync(fd, view, at, view.length - at);
    }
  } catch (e) {
    fs.closeSync(fd);
    try {
      fs.unlinkSync(tmp);
    } catch {}
    throw e;
  }
  return { tmp, fd };
}

/** Write `parts` (buffers) as `path`: a temporary file, fsync, rename, fsync of its directory (without
 * `sync`, no fsyncs: safe against this process's crash, not the machine's). */
export function writeAtomic(path, parts, sync = true) {
  const { tmp, fd } = writeTemp(path, parts);
  try {
    if (sync) durably(() => fs.fsyncSync(fd), path);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, path);
  if (sync) durably(() => fsyncDir(resolve(path, "..")), path);
}

/** Run an fsync; when it fails (EIO: the kernel may have dropped the pages it could not write) the worker
 * exits at once with 75, as the Python worker (and PostgreSQL) does: no reply may acknowledge what is not
 * kept, and a restart reads back what was acknowledged before. */
export function durably(fsync, path) {
  try {
    fsync();
  } catch (e) {
    log.error(`--state-dir ${dirname(path)}: cannot make changes durable (${e.message}): the worker stops now`);
    process.exit(EXIT_NOT_DURABLE);
  }
}

/** MAGIC, the header's length and the header, padded so the payload starts aligned. */
export function framed(header) {
  const text = Buffer.from(JSON.stringify(header), "utf8");
  const head = Buffer.alloc(MAGIC.length + 4);
  MAGIC.copy(head);
  head.writeUInt32LE(text.length, MAGIC.length);
  const used = head.length + text.length;
  return [head, text, Buffer.alloc((ALIGN - (used % ALIGN)) % ALIGN)];
}

/** [header (parsed JSON), payload Buffer] of a framed file; Error for a malformed one. */
export function readFramed(path) {
  const fd = fs.openSync(path, C.O_RDONLY | C.O_NOFOLLOW);
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new Error("not a regular file");
    const size = st.size;
    const start = Buffer.alloc(MAGIC.length + 4);
    const got = fs.readSync(fd, start, 0, start.length, 0);
    if (got < start.length || !start.subarray(0, MAGIC.length).equals(MAGIC)) throw new Error("not a planwire state file (bad magic)");
    const n = start.readUInt32LE(MAGIC.length);
    if (n > MAX_HEADER || start.length + n > size) throw new Error(`header length ${n} past the file's end or over ${MAX_HEADER}`);
    let offset = start.length + n;
    offset += (ALIGN - (offset % ALIGN)) % ALIGN;
    if (offset > size) throw new Error("truncated before its payload");
    const header = Buffer.alloc(n);
    fs.readSync(fd, header, 0, n, start.length);
    const payload = Buffer.alloc(size - offset);
    for (let at = 0; at < payload.length; ) {
      const r = fs.readSync(fd, payload, at, payload.length - at, offset + at);
      if (r === 0) throw new Error("shorter than its size");
      at += r;
    }
    return [JSON.parse(header.toString("utf8")), payload];
  } finally {
    fs.closeSync(fd);
  }
}

export function digest(text) {
  return createHash("sha256").update(text, "utf8").digest("hex").slice(0, 40);
}

// -- file headers, checked as worker/statefiles.py's typed structs are ---------------------------------

const codepoints = (s) => [...s].length;
export const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
export const isString = (v, min, max) => typeof v === "string" && codepoints(v) >= min && codepoints(v) <= max;
const isSize = (v) => Number.isSafeInteger(v) && v >= 0;

function fields(doc, allowed, required) {
  if (!isObject(doc)) throw new Error("Expected `object`");
  for (const k of Object.keys(doc)) if (!allowed.includes(k)) throw new Error(`Object contains unknown field \`${k}\``);
  for (const k of required) if (!(k in doc)) throw new Error(`Object missing required field \`${k}\``);
  return doc;
}

function expect(ok, what) {
  if (!ok) throw new Error(`invalid ${what}`);
}

const TENSOR_FIELDS = ["owner", "key", "dtype", "shape", "tags", "private", "rows", "failed", "release"];
const RELEASE_FIELDS = ["plan", "output", "how", "rows", "param", "base", "released"];
const isShape = (v) => Array.isArray(v) && v.length <= 64 && v.every(isSize);

/** {dtype, shape} of an array after the tensor in a tensor file's payload. */
function part(doc, what) {
  fields(doc, ["dtype", "shape"], ["dtype", "shape"]);
  expect(Object.hasOwn(DTYPES, doc.dtype) && isShape(doc.shape), what);
  return doc;
}

/** A tensor file's header with its defaults filled in (`release`: a private result's pending release). */
export function tensorHeader(doc) {
  fields(doc, TENSOR_FIELDS, ["owner", "key"]);
  const h = { dtype: "float", shape: [], tags: [], private: false, rows: 0, failed: null, release: null, ...doc };
  expect(typeof h.owner === "string" && OWNER_RE.test(h.owner), "`owner`");
  expect(isString(h.key, 1, 256), "`key`");
  expect(Object.hasOwn(DTYPES, h.dtype), "`dtype`");
  expect(isShape(h.shape), "`shape`");
  expect(Array.isArray(h.tags) && h.tags.every((t) => isString(t, 1, 256)), "`tags`");
  expect(typeof h.private === "boolean", "`private`");
  expect(isSize(h.rows), "`rows`");
  expect(h.failed === null || isString(h.failed, 0, 1 << 16), "`failed`");
  if (h.release !== null) {
    const r = (h.release = { param: "", base: null, released: null, ...fields(h.release, RELEASE_FIELDS, RELEASE_FIELDS.slice(0, 4)) });
    expect(typeof r.plan === "string" && /^[0-9a-f]{64}$/.test(r.plan), "`release.plan`");
    expect(isString(r.output, 1, 4096) && isString(r.param, 0, 4096), "`release.output` or `release.param`");
    expect(r.how === "as_is" || r.how === "update", "`release.how`");
    expect(isSize(r.rows), "`release.rows`");
    if (r.base !== null) part(r.base, "`release.base`");
    if (r.released !== null) part(r.released, "`release.released`");
  }
  return h;
}

/** [the tensor, its pending release or null] of a tensor file's payload: the tensor's bytes, then the
 * release's `base` and `released` arrays (those present), each at the next multiple of 64 bytes. */
export function tensorPayload(h, payload) {
  const r = h.release;
  if (r !== null && !h.private) throw new Error("a pending release on a tensor that is not private");
  const parts = [{ dtype: h.dtype, shape: h.shape }, ...(r === null ? [] : [r.base, r.released].filter((p) => p !== null))];
  const sizes = parts.map((p) => p.shape.reduce((n, d) => n * BigInt(d), BigInt(DTYPES[p.dtype].size)));
  let need = 0n;
  sizes.forEach((n, i) => (need += i < sizes.length - 1 ? n + ((64n - (n % 64n)) % 64n) : n));
  if (need !== BigInt(payload.length)) {
    throw new Error(`${h.dtype}[${h.shape.join(", ")}] needs ${need} bytes, the file holds ${payload.length}`);
  }
  let at = 0;
  const arrays = parts.map((p, i) => {
    const n = Number(sizes[i]);
    const t = new Tensor(p.dtype, p.shape, payload.subarray(at, at + n));
    at += n + ((ALIGN - (n % ALIGN)) % ALIGN);
    return t;
  });
  let kept = null;
  if (r !== null) {
    const base = r.base !== null ? arrays[1] : null;
    const released = r.released !== null ? arrays.at(-1) : null;
    kept = { plan: r.plan, output: r.output, how: r.how, param: r.param, rows: r.rows, base, released };
  }
  return [arrays[0], kept];
}

/** The privacy file's `spent`: Map owner name -> Map(noise multiplier -> count). */
export function privacySpent(spent) {
  expect(isObject(spent), "`spent`");
  const out = new Map();
  for (const [name, events] of Object.entries(spent)) {
    expect(OWNER_RE.test(name) && Array.isArray(events), "`spent`");
    const counts = new Map();
    for (const e of events) {
      const ok = Array.isArray(e) && e.length === 2 && typeof e[0] === "number" && e[0] > 0 && e[0] <= 1e6;
      expect(ok && Number.isSafeInteger(e[1]) && e[1] >= 1 && e[1] <= 2 ** 40, "`spent` event");
      counts.set(e[0], (counts.get(e[0]) ?? 0) + e[1]);
    }
    out.set(name, counts);
  }
  return out;
}

/** A plan file's header: {plan, name, inputs, outputs}, ports as [name, dtype, shape]. */
export function planHeader(doc) {
  fields(doc, ["plan", "name", "inputs", "outputs"], ["plan", "name", "inputs", "outputs"]);
  expect(typeof doc.plan === "string" && /^[0-9a-f]{64}$/.test(doc.plan), "`plan`");
  expect(isString(doc.name, 0, 4096), "`name`");
  const dim = (d) => d === null || typeof d === "string" || (isSize(d) && d <= 2 ** 62);
  for (const side of ["inputs", "outputs"]) {
    const ok = (p) => Array.isArray(p) && p.length === 3 && typeof p[0] === "string" && Object.hasOwn(DTYPES, p[1]);
    expect(Array.isArray(doc[side]) && doc[side].every((p) => ok(p) && Array.isArray(p[2]) && p[2].length <= 64 && p[2].every(dim)), `\`${side}\``);
  }
  return doc;
}

/** A JSON document {format: 1, [field]: ...} (session, owners, holders). */
export function formatDoc(path, field) {
  const doc = fields(JSON.parse(fs.readFileSync(path, { encoding: "utf8", flag: C.O_RDONLY | C.O_NOFOLLOW })), ["format", field], ["format", field]);
  if (doc.format !== FORMAT) throw new Error(`format ${doc.format}`);
  return doc[field];
}

// -- owners: their names on disk (as worker/statefiles.py's Names) ---------------------------------------

/** A connection's owner ("c:HEX") is named with this incarnation's nonce, so a new connection that gets an
 * old routing id is never taken for an old client; a restored one ("s:NAME") acts only through the
 * identity it was issued. (The Python worker's CURVE owners, named "k" + key, are restored here as "s:"
 * owners: this worker cannot read a connection's key, PROTOCOL.md §12.) */
export class Names {
  constructor() {
    this.nonce = randomBytes(4).toString("hex");
  }

  name(owner) {
    if (owner.startsWith("s:")) return owner.slice(2);
    if (owner.startsWith("c:")) return "c" + this.nonce + owner.slice(2).toLowerCase();
    throw new Error(`owner ${pyRepr(owner)} has no name on disk`);
  }

  owner(name) {
    return "s:" + name;
  }
}

// -- the directory's lock ------------------------------------------------------------------------------------

/** Take flock(LOCK_EX | LOCK_NB) on `fd` with util-linux's flock(1): true, false when another holds it,
 * null when flock(1) cannot run here. */
export function flock(fd) {
  const r = spawnSync("flock", ["--nonblock", "--exclusive", "3"], { stdio: ["ignore", "ignore", "pipe", fd] });
  if (r.error || r.status === null || r.status > 1) return null;
  return r.status === 0;
}

/** mkdir -p, the last one 0700 (not fs.mkdirSync's recursive mode, which loops forever under /proc). */
export function mkdirs(p, mode = 0o700) {
  try {
    fs.mkdirSync(p, { mode });
  } catch (e) {
    if (e.code === "EEXIST") return;
    if (e.code !== "ENOENT" || dirname(p) === p) throw e;
    mkdirs(dirname(p), 0o777);
    fs.mkdirSync(p, { mode });
  }
}

export function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === "EPERM";
  }
}
