// The private pipe between the worker (src/sandbox.js) and its runner (src/runner.js): a Unix socket pair,
// several requests in flight (the worker's window), answered in order. Not the public protocol and no
// JavaScript objects beyond JSON: a message is a 16-byte prefix (body bytes as a double, header bytes,
// number of buffers), the buffers' sizes (doubles), a JSON header, then each buffer at a 16-byte aligned
// offset of the body, so a tensor received here is viewed in place by onnxruntime (no copy to align it).

import { readSync, writevSync } from "node:fs";

const PREFIX = 16;
const ALIGN = 16;
const PAD = Buffer.alloc(ALIGN);

/** The parts of one message: `header` (JSON-able) and `buffers` (Buffers or Uint8Arrays). */
function encode(header, buffers) {
  const text = Buffer.from(JSON.stringify(header));
  const n = buffers.length;
  const head = Buffer.allocUnsafe(PREFIX + 8 * n + text.length);
  let offset = 8 * n + text.length; // body bytes so far
  const parts = [head];
  buffers.forEach((b, i) => {
    head.writeDoubleLE(b.byteLength, PREFIX + 8 * i);
    const pad = -offset & (ALIGN - 1);
    if (pad) parts.push(PAD.subarray(0, pad));
    parts.push(b);
    offset += pad + b.byteLength;
  });
  head.writeDoubleLE(offset, 0);
  head.writeUInt32LE(text.length, 8);
  head.writeUInt32LE(n, 12);
  text.copy(head, PREFIX + 8 * n);
  return [parts, PREFIX + offset];
}

/** Write one message to a stream socket (the worker's side). The messages written in one turn of the
 * event loop (a burst of pipelined runs) leave together, in one system call, at its end (or at `flush`). */
export function send(sock, header, buffers = []) {
  const [parts, total] = encode(header, buffers);
  if (!sock.writableCorked) {
    sock.cork();
    process.nextTick(flush, sock);
  }
  if (parts.length === 1 || total <= 1 << 16) sock.write(parts.length === 1 ? parts[0] : Buffer.concat(parts, total));
  else for (const p of parts) sock.write(p);
}

/** Write now what `send` has held back on `sock`. */
export function flush(sock) {
  while (sock.writableCorked) sock.uncork();
}

/** Write one message to blocking file descriptor `fd` (the runner's side: it has nothing else to do). */
export function sendSync(fd, header, buffers = []) {
  let [parts, total] = encode(header, buffers);
  if (total <= 1 << 16 && parts.length > 1) parts = [Buffer.concat(parts, total)];
  while (parts.length) {
    let done = writevSync(fd, parts);
    while (parts.length && done >= parts[0].length) done -= parts.shift().length;
    if (done) parts[0] = parts[0].subarray(done);
  }
}

/** Read what non-blocking fd `fd` (the worker's end, read by a stream) holds now into `buf`, without
 * waiting: the bytes read (0: none yet, or the pipe's end or an error, which the stream reports). */
export function readNow(fd, buf) {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0; // EAGAIN is the usual outcome here: keep its exception cheap
  try {
    return readSync(fd, buf, 0, buf.length, null);
  } catch {
    return 0;
  } finally {
    Error.stackTraceLimit = limit;
  }
}

const SPIN_MAX_NS = 200_000; // the longest busy-poll (see Spin)
const SPIN_SAMPLE_MAX_NS = 4 * SPIN_MAX_NS; // one long wait weighs no more than this in the average
const SPIN_BACKOFF = 32; // after a poll that caught nothing, the waits that sleep before the next try

/** Bounded, adaptive busy-polling of the pipe instead of sleeping in the event loop, for what comes within
 * microseconds: the worker polls for a tiny run's answer. A sleep and its wake-up cost ~0.1-0.25 ms on a
 * shared VM, several times a tiny run. It polls only while the average of the recent waits (`started()` to `arrived()`) is under its
 * bound, for at most twice that average, and only while polling catches what it waits for: after a miss
 * the next SPIN_BACKOFF waits sleep. A slow plan, a starved process on a loaded host or a client that
 * pauses turn it off by themselves (unlike a load-average gate, closed whenever a benchmark runs), and an
 * idle process never polls. */
export class Spin {
  constructor() {
    this.maxNs = SPIN_MAX_NS;
    this.avg = 0; // ns, exponentially weighted
    this.since = 0n;
    this.skip = 0;
  }

  /** The wait begins (a request sent). */
  started() {
    this.since = process.hrtime.bigint();
  }

  /** What was waited for came (polled for or not). */
  arrived() {
    if (this.since === 0n) return;
    const waited = Math.min(Number(process.hrtime.bigint() - this.since), SPIN_SAMPLE_MAX_NS);
    this.avg += (waited - this.avg) / 8;
    this.since = 0n;
  }

  /** Call `poll()` until it returns true or the budget is spent; whether it did. */
  wait(poll) {
    if (this.since === 0n || this.avg >= this.maxNs) return false;
    if (this.skip > 0) {
      this.skip--;
      return false;
    }
    const end = this.since + BigInt(Math.ceil(Math.min(this.maxNs, 2 * this.avg + 20_000)));
    while (process.hrtime.bigint() < end) if (poll()) return true;
    this.skip = SPIN_BACKOFF;
    return false;
  }
}

/** Reads messages from a stream's 'data' chunks; calls `onMessage(header, buffers)` for each whole one.
 * Throws (from `push`) on a message that does not follow the format. */
export class Reader {
  constructor(onMessage, { maxBytes = Infinity } = {}) {
    this.onMessage = onMessage;
    this.maxBytes = maxBytes;
    this.chunks = []; // before the prefix is complete
    this.have = 0;
    this.body = null; // the body being filled
    this.filled = 0;
    this.prefix = null;
  }

  push(chunk) {
    while (chunk.length) {
      if (this.body === null) {
        if (this.have === 0 && chunk.length >= PREFIX) {
          const size = this.size(chunk);
          if (chunk.length >= PREFIX + size) {
            // the whole message in this chunk (a small one, usually): parsed where it lies
            const whole = chunk;
            chunk = chunk.subarray(PREFIX + size);
            this.parseWith(whole.subarray(0, PREFIX), whole.subarray(PREFIX, PREFIX + size));
            continue;
          }
        }
        this.chunks.push(chunk);
        this.have += chunk.length;
        if (this.have < PREFIX) return;
        const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
        this.chunks = [];
        this.have = 0;
        const size = this.size(all);
        this.prefix = Buffer.from(all.subarray(0, PREFIX));
        this.body = Buffer.from(new ArrayBuffer(size)); // its own allocation: offset 0, aligned
        this.filled = 0;
        chunk = all.subarray(PREFIX);
      }
      const take = Math.min(chunk.length, this.body.length - this.filled);
      chunk.copy(this.body, this.filled, 0, take);
      this.filled += take;
      chunk = chunk.subarray(take);
      if (this.filled === this.body.length) {
        const [prefix, body] = [this.prefix, this.body];
        this.body = this.prefix = null;
        this.parseWith(prefix, body);
      }
    }
  }

  size(chunk) {
    const size = chunk.readDoubleLE(0);
    if (!(Number.isInteger(size) && size >= 0 && size <= this.maxBytes)) throw new Error(`pipe: bad message size ${size}`);
    return size;
  }

  parseWith(prefix, body) {
    const [header, buffers] = parse(prefix, body);
    this.onMessage(header, buffers);
  }
}

/** A copy of `b` in an ArrayBuffer of its own (offset 0: aligned; never a slice of Node's shared pool,
 * which a stored tensor would keep alive). */
export function own(b) {
  return Buffer.from(new Uint8Array(b).buffer);
}

/** [header, buffers] of a message's prefix and body; buffers are views of the body when aligned. */
function parse(prefix, body) {
  const hlen = prefix.readUInt32LE(8);
  const n = prefix.readUInt32LE(12);
  const sizes = [];
  for (let i = 0; i < n; i++) sizes.push(body.readDoubleLE(8 * i));
  let offset = 8 * n;
  const header = JSON.parse(body.toString("utf8", offset, offset + hlen));
  offset += hlen;
  const aligned = body.byteOffset % ALIGN === 0;
  const buffers = sizes.map((size) => {
    offset += -offset & (ALIGN - 1);
    let b = body.subarray(offset, offset + size);
    if (b.length !== size) throw new Error("pipe: a buffer runs past its message");
    if (!aligned) b = own(b); // a message cut from a received chunk: its own aligned copy
    offset += size;
    return b;
  });
  return [header, buffers];
}
