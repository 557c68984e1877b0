// The worker's handle on its sandboxed runner (src/runner.js), as worker/sandbox.py is the Python worker's:
// one runner process at a time, one request at a time, each with its bounds: --run-timeout (the runner is
// killed past it) and --max-run-memory-mb (RLIMIT_DATA over its start-up use, set through util-linux's
// prlimit; where there is no prlimit, the worker polls the runner's resident memory during each request
// and kills it past the bound). A runner that crashes, runs out of memory, runs too long or is cancelled
// costs that request only: it is answered with plan_crashed, out_of_memory, plan_timeout or cancelled
// naming the plan, and the next request starts a fresh runner, which re-creates sessions from the plan
// bytes kept here. Stored tensors over INLINE_MAX cross to a runner once: it keeps them (a bounded cache,
// least recently used first out) and later runs name them, so a call on stored tensors copies nothing.

import { spawn, execFileSync } from "node:child_process";
import { readFileSync, readSync } from "node:fs";
import { loadavg, availableParallelism } from "node:os";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { send, Reader, own } from "./pipe.js";
import { ProtocolError } from "./messages.js";
import { fromFrame } from "./codec.js";
import { pyRepr } from "./json.js";
import { log, clean } from "./log.js";

const RUNNER = join(dirname(fileURLToPath(import.meta.url)), "runner.js");
const READY_TIMEOUT_S = 120; // a runner's start (onnxruntime's load on a busy host)
const INLINE_MAX = 64 << 10; // stored tensors above this stay in the runner once sent
const MiB = 2 ** 20;
const CRASH_SIGNALS = new Set(["SIGFPE", "SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT", "SIGTRAP"]);
const WATCH_MS = 50; // without prlimit: how often a busy runner's memory is read
const SPIN_NS = 30_000n; // how long to read the pipe for an answer before sleeping on it (see spin)
const SCRATCH = Buffer.allocUnsafeSlow(1 << 16);

/** Resident bytes of process `pid`, or null. */
function rss(pid) {
  try {
    return Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) * 1024;
  } catch {
    return null;
  }
}

function have(tool) {
  try {
    execFileSync(tool, ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

function checkedShape(shape) {
  if (!Array.isArray(shape) || shape.length > 64 || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new Error(`shape ${clean(JSON.stringify(shape) ?? "?")}`);
  }
  return shape;
}

/** A plan's session in the runner: the same shape as src/runtime.js's sessions. */
class SandboxedSession {
  constructor(sandbox, pid, data, name, inputs, outputs) {
    this.sandbox = sandbox;
    this.pid = pid;
    this.data = data; // the checked bytes: a fresh runner loads the plan again from these
    this.name = name;
    this.inputMetadata = inputs;
    this.outputMetadata = outputs;
  }

  /** Outputs (codec Tensors) of a run on `args`; `stored[i]`: whether args[i] is a stored tensor. */
  run(args, { stored = [], rid = "?" } = {}) {
    return this.sandbox.run(this, args, stored, rid);
  }

  release() {
    this.sandbox.forget(this.pid);
  }
}

export class Sandbox {
  constructor({ workerId, threads = 1, memoryMb = 2048, timeout = 60 }) {
    this.workerId = workerId;
    this.threads = threads;
    this.memoryMb = memoryMb;
    this.timeout = timeout;
    this.proc = null; // the current runner: {child, sock, ready, loaded, drop, cached, uncache, ...}
    this.pending = null; // the request in flight: {proc, resolve, reject, what, ...}
    this.ids = new WeakMap(); // stored Tensor -> its id in runners' caches
    this.nextId = 0;
    this.cacheBudget = Math.min(512 * MiB, memoryMb > 0 ? (memoryMb * MiB) / 4 : 512 * MiB);
    this.closed = false;
    this.spinChecked = -Infinity;
    this.spinAllowed = false;
    this.wrap = [
      ...(have("setpriv") ? ["setpriv", "--pdeathsig", "KILL", "--"] : []), // the runner dies with the worker
    ];
  }

  // -- life ---------------------------------------------------------------------------------------

  /** Start a runner unless one runs; resolves with it once it is ready (bounds in place). */
  start() {
    if (this.proc !== null) return this.proc.ready;
    const cmd = [...this.wrap, process.execPath, RUNNER, "--threads", String(this.threads), "--memory-mb", String(this.memoryMb)];
    const child = spawn(cmd[0], cmd.slice(1), { stdio: ["ignore", "inherit", "inherit", "pipe"] });
    const proc = { child, sock: child.stdio[3], loaded: new Set(), drop: new Set(), cached: new Map(), uncache: [], started: Date.now() };
    proc.isReady = false;
    proc.ready = new Promise((resolve, reject) => Object.assign(proc, { onReady: resolve, onFail: reject }));
    proc.ready.catch(() => {}); // a start that fails is answered through the request waiting on it
    proc.startTimer = setTimeout(() => this.kill(proc, `did not start within ${READY_TIMEOUT_S} s`), READY_TIMEOUT_S * 1000);
    const reader = (proc.reader = new Reader((h, buffers) => this.fromRunner(proc, h, buffers)));
    proc.sock.on("data", (chunk) => {
      try {
        reader.push(chunk);
      } catch (e) {
        this.kill(proc, `the runner sent a malformed message (${e.message})`);
      }
    });
    proc.sock.on("error", () => {}); // its death is read from the exit below
    child.on("error", (e) => this.died(proc, null, null, `cannot start: ${e.message}`));
    child.on("exit", (code, signal) => this.died(proc, code, signal));
    this.proc = proc;
    return proc.ready;
  }

  /** Kill runner `proc` now; `why` is what its death says (a timeout, a cancel, the worker's end). */
  kill(proc, why) {
    proc.killed ??= why;
    if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill("SIGKILL");
    if (this.proc === proc) this.proc = null; // the next request starts a fresh one
  }

  close() {
    this.closed = true;
    if (this.proc !== null) this.kill(this.proc, "the worker is shutting down");
    if (this.pending !== null) this.settle(null, new ProtocolError("internal", `${this.pending.what} was stopped: the worker is shutting down`));
  }

  died(proc, code, signal, words = null) {
    if (proc.dead) return;
    proc.dead = true;
    clearTimeout(proc.startTimer);
    if (this.proc === proc) this.proc = null;
    const wasReady = proc.isReady;
    if (!words) {
      if (proc.killed) words = proc.killed;
      else if (signal === "SIGKILL") words = "the runner was killed (SIGKILL), most likely by the out-of-memory killer";
      else if (CRASH_SIGNALS.has(signal)) {
        const hint = signal === "SIGABRT" || signal === "SIGTRAP" ? " (an allocation past --max-run-memory-mb can end this way)" : "";
        words = `the runner crashed with ${signal}${hint}`;
      } else if (signal) words = `the runner was ended by ${signal}`;
      else words = `the runner exited with status ${code}`;
    }
    proc.onFail(new Error(words));
    const p = this.pending;
    if (p === null || p.proc !== proc) {
      if (!proc.killed && !this.closed) log.warning(`the sandboxed runner ended while idle: ${words}`);
      return;
    }
    if (proc.killed) return; // whoever killed it has answered the request
    if (!wasReady) {
      this.settle(p, new ProtocolError("internal", `the sandboxed runner failed to start (${words}): see the worker's log`));
      return;
    }
    log.warning(`${p.what}: ${words}; runner restarted`);
    const crash = signal === "SIGKILL" ? "out_of_memory" : "plan_crashed";
    this.settle(p, new ProtocolError(crash, `${p.what}: ${words}; ${p.after}`));
    if (!this.closed) this.start(); // warm for the next request
  }

  // -- requests -----------------------------------------------------------------------------------

  /** Send what `build(proc)` makes ([header, buffers]) to a ready runner; resolves with its answer. */
  async request(build, { what, after, name, doing }) {
    if (this.closed) throw new ProtocolError("internal", `${what} not started: the worker is shutting down`);
    const proc = await this.ready(what);
    return new Promise((resolve, reject) => {
      const p = { proc, resolve, reject, what, after, name, doing };
      this.pending = p;
      const [header, buffers] = build(proc);
      header.drop = [...proc.drop];
      header.uncache = proc.uncache;
      proc.drop = new Set();
      proc.uncache = [];
      send(proc.sock, header, buffers);
      p.timer = setTimeout(() => this.overdue(p), this.timeout * 1000);
      if (proc.memoryLimit === 0 && this.memoryMb > 0) p.watch = setInterval(() => this.watch(p), WATCH_MS);
      if (this.spinOk()) this.spin(proc, p);
    });
  }

  /** Whether to watch the pipe for an answer before sleeping: not when the host is busy (load average at
   * or over the core count, read at most once a second), where the runner needs the core more. */
  spinOk() {
    const now = Date.now();
    if (now - this.spinChecked > 1000) {
      this.spinChecked = now;
      this.spinAllowed = loadavg()[0] < availableParallelism();
    }
    return this.spinAllowed;
  }

  /** A tiny run answers in tens of microseconds: read the pipe directly for up to SPIN_NS (on a free
   * core this saves the event loop's sleep and wake-up per call); what comes is parsed as the 'data'
   * handler would (one thread: libuv is not reading meanwhile, and finds nothing left to read). */
  spin(proc, p) {
    const fd = proc.sock._handle?.fd;
    if (typeof fd !== "number" || fd < 0) return;
    const end = process.hrtime.bigint() + SPIN_NS;
    while (this.pending === p && process.hrtime.bigint() < end) {
      let n;
      try {
        n = readSync(fd, SCRATCH, 0, SCRATCH.length, null);
      } catch (e) {
        if (e.code === "EAGAIN" || e.code === "EWOULDBLOCK") continue;
        return; // the pipe's 'error'/'close' and the process's exit say the rest
      }
      if (n === 0) return;
      try {
        proc.reader.push(own(SCRATCH.subarray(0, n)));
      } catch (e) {
        this.kill(proc, `the runner sent a malformed message (${e.message})`);
        return;
      }
    }
  }

  /** The current runner once it is ready, started if need be. */
  async ready(what) {
    for (let tries = 0; ; tries++) {
      if (this.proc === null) this.start();
      const proc = this.proc;
      try {
        await proc.ready;
      } catch (e) {
        if (tries < 1 && proc.killed === undefined && proc.isReady) continue; // died just after its start
        throw new ProtocolError("internal", `${what} not started: the sandboxed runner failed to start (${e.message}): see the worker's log`);
      }
      if (this.proc === proc && !proc.dead) return proc;
      if (tries >= 1) throw new ProtocolError("internal", `${what} not started: the sandboxed runner keeps ending`);
    }
  }

  settle(p, outcome) {
    p ??= this.pending;
    if (p === null || this.pending !== p) return;
    this.pending = null;
    clearTimeout(p.timer);
    clearInterval(p.watch);
    if (outcome instanceof Error) p.reject(outcome);
    else p.resolve(outcome);
  }

  overdue(p) {
    if (this.pending !== p) return;
    log.warning(`${p.what} ran past --run-timeout ${this.timeout} s: runner stopped`);
    this.kill(p.proc, "timeout");
    const words = `ran past the worker's --run-timeout of ${this.timeout} s and was stopped`;
    this.settle(p, new ProtocolError("plan_timeout", `${p.what} ${words}; ${p.after}`));
    this.start();
  }

  /** Without prlimit: the runner's resident memory over its start-up use, read while it works. */
  watch(p) {
    if (this.pending !== p) return;
    const now = rss(p.proc.child.pid);
    if (now === null || now - (p.proc.baseRss ?? now) <= this.memoryMb * MiB) return;
    this.kill(p.proc, "out of memory");
    this.settle(p, this.outOfMemory(p, `its runner's resident memory reached ${Math.floor(now / MiB)} MiB`));
    this.start();
  }

  /** Cancel the request in flight (a cancel request, or the worker's end): answered with `error`. */
  abort(error) {
    const p = this.pending;
    if (p === null) return false;
    this.kill(p.proc, error.code);
    this.settle(p, error);
    if (!this.closed) this.start();
    return true;
  }

  outOfMemory(p, text) {
    const bound = this.memoryMb ? `--max-run-memory-mb ${this.memoryMb}` : "memory";
    return new ProtocolError("out_of_memory", `plan ${pyRepr(p.name)} ran out of memory ${p.doing} on worker ${pyRepr(this.workerId)} (${bound}): ${text}`);
  }

  fromRunner(proc, h, buffers) {
    if (h.t === "ready") {
      clearTimeout(proc.startTimer);
      proc.isReady = true;
      proc.memoryLimit = h.memoryLimit;
      if (!h.memoryLimit && this.memoryMb) proc.baseRss = rss(proc.child.pid);
      const limit = h.memoryLimit ? `${Math.floor(h.memoryLimit / MiB)} MiB` : this.memoryMb ? `none (resident memory watched: ${this.memoryMb} MiB)` : "none";
      log.info(`runner ${h.pid} ready (data memory limit ${limit})`);
      proc.onReady(proc);
      return;
    }
    const p = this.pending;
    if (p === null || p.proc !== proc) {
      log.error(`unexpected message from the runner: ${clean(String(h.t))}`);
      return;
    }
    if (h.t === "failed") {
      if (h.code === "out_of_memory") this.settle(p, this.outOfMemory(p, h.message));
      else if (h.code === "run_failed") this.settle(p, new Error(h.message)); // onnxruntime's own words
      else this.settle(p, new ProtocolError(h.code, h.message));
      return;
    }
    this.settle(p, { header: h, buffers });
  }

  // -- plans ----------------------------------------------------------------------------------------

  /** A session of the plan `data` (checked bytes) in the runner. */
  async load(data, { name, pid }) {
    const what = `plan ${pyRepr(name)} (registering)`;
    let target = null;
    const { header } = await this.request(
      (proc) => ((target = proc), [{ t: "load", plan: pid }, [data]]),
      { what, after: "it was not registered; the worker kept every stored tensor and plan", name, doing: "loading" },
    );
    target.loaded.add(pid);
    return new SandboxedSession(this, pid, data, name, header.inputs, header.outputs);
  }

  forget(pid) {
    const proc = this.proc;
    if (proc !== null && proc.loaded.delete(pid)) proc.drop.add(pid);
  }

  async run(session, args, stored, rid) {
    const what = `plan ${pyRepr(session.name)} (run #${rid})`;
    let target = null;
    let load = false;
    const { header, buffers } = await this.request(
      (proc) => {
        target = proc;
        load = !proc.loaded.has(session.pid);
        const out = load ? [session.data] : [];
        const refs = args.map((t, i) => this.ref(proc, t, stored[i], out));
        this.evict(proc, refs);
        if (load) proc.loaded.add(session.pid);
        return [{ t: "run", plan: session.pid, name: session.name, load, args: refs }, out];
      },
      { what, after: "the worker kept every stored tensor and plan", name: session.name, doing: "running" },
    ).catch((e) => {
      if (target !== null) target.loaded.delete(session.pid); // the runner may not hold it
      throw e;
    });
    if (header.t !== "ran" || !Array.isArray(header.outputs) || header.outputs.length !== buffers.length) {
      throw new ProtocolError("internal", `the runner answered ${clean(String(header.t))} to a run`);
    }
    try {
      // the runner ran a hostile plan: its answer is checked like a client's (dtype × shape against the bytes)
      return header.outputs.map((o, i) => fromFrame(o?.dtype, checkedShape(o?.shape), buffers[i], `runner output ${i}`));
    } catch (e) {
      throw new ProtocolError("internal", `${what}: the runner's answer is malformed (${e.message})`);
    }
  }

  /** How argument `t` goes to runner `proc`: by its id when the runner keeps it, else in `out`. */
  ref(proc, t, isStored, out) {
    if (!isStored || t.nbytes <= INLINE_MAX || t.nbytes > this.cacheBudget) {
      out.push(t.data);
      return { dtype: t.dtype, shape: t.shape, index: out.length - 1 };
    }
    let id = this.ids.get(t);
    if (id !== undefined && proc.cached.has(id)) {
      const e = proc.cached.get(id);
      proc.cached.delete(id); // most recently used: last
      proc.cached.set(id, e);
      return { cached: id };
    }
    if (id === undefined) this.ids.set(t, (id = ++this.nextId));
    proc.cached.set(id, { bytes: t.nbytes, ref: new WeakRef(t) });
    proc.cachedBytes = (proc.cachedBytes ?? 0) + t.nbytes;
    out.push(t.data);
    return { dtype: t.dtype, shape: t.shape, index: out.length - 1, keep: id };
  }

  /** Tensors the runner may drop: gone from the store, or least recently used past the budget. */
  evict(proc, refs) {
    const used = new Set(refs.map((r) => r.cached ?? r.keep).filter((id) => id !== undefined));
    for (const [id, e] of proc.cached) {
      const over = proc.cachedBytes > this.cacheBudget;
      if (used.has(id) || (!over && e.ref.deref() !== undefined)) continue;
      proc.cached.delete(id);
      proc.cachedBytes -= e.bytes;
      proc.uncache.push(id);
    }
  }
}
