// The worker's handle on its sandboxed runner (src/runner.js), as worker/sandbox.py is the Python worker's:
// one runner process at a time, several requests in flight to it (the supervisor's window), answered in
// order; the one it executes has its bounds: --run-timeout (its clock starts when the request before it
// is answered; the runner is killed past it) and --max-run-memory-mb (RLIMIT_DATA over its start-up use, set through util-linux's
// prlimit; where there is no prlimit, the worker polls the runner's resident memory during each request
// and kills it past the bound). A runner that crashes, runs out of memory, runs too long or is cancelled
// costs that request only: it is answered with plan_crashed, out_of_memory, plan_timeout or cancelled
// naming the plan, and a fresh runner, which re-creates sessions from the plan bytes kept here, takes the
// requests that were behind it. What crosses to the runner (plans' sessions, stored tensors it keeps, its
// answers checked): src/sessions.js.

import { spawn, execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { send, flush, readNow, Reader, own, Spin } from "./pipe.js";
import { ProtocolError } from "./messages.js";
import { RunnerSessions } from "./sessions.js";
import { pyRepr } from "./json.js";
import { log, clean } from "./log.js";
import { V8_FLAGS } from "./v8flags.js";

const RUNNER = join(dirname(fileURLToPath(import.meta.url)), "runner.js");
const READY_TIMEOUT_S = 120; // a runner's start (onnxruntime's load on a busy host)
const MiB = 2 ** 20;
const CRASH_SIGNALS = new Set(["SIGFPE", "SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT", "SIGTRAP"]);
const WATCH_MS = 50; // without prlimit: how often a busy runner's memory is read
const CANCEL_GRACE_MS = 200; // a cancelled request sent behind others: how long the runner has to skip it
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

export class Sandbox extends RunnerSessions(Object) {
  constructor({ workerId, threads = 1, memoryMb = 2048, timeout = 60 }) {
    super();
    this.workerId = workerId;
    this.threads = threads;
    this.memoryMb = memoryMb;
    this.timeout = timeout;
    this.proc = null; // the current runner: {child, sock, isReady, loaded, drop, cached, uncache, seq, ...}
    this.jobs = []; // requests not answered by a runner yet, in order: {build, proc (sent to; null: not yet), seq, done, ...}
    this.lastJob = null;
    this.ids = new WeakMap(); // stored Tensor -> its id in runners' caches (src/sessions.js)
    this.nextId = 0;
    this.cacheBudget = Math.min(512 * MiB, memoryMb > 0 ? (memoryMb * MiB) / 4 : 512 * MiB);
    this.closed = false;
    this.spin = new Spin(); // waiting for a tiny run's answer (poll)
    this.wrap = [
      ...(have("setpriv") ? ["setpriv", "--pdeathsig", "KILL", "--"] : []), // the runner dies with the worker
    ];
  }

  // -- life ---------------------------------------------------------------------------------------

  /** The current runner, started if none runs; requests are sent to it once it is ready. */
  start() {
    if (this.proc !== null) return this.proc;
    const cmd = [...this.wrap, process.execPath, ...V8_FLAGS, RUNNER, "--threads", String(this.threads), "--memory-mb", String(this.memoryMb)];
    const child = spawn(cmd[0], cmd.slice(1), { stdio: ["ignore", "inherit", "inherit", "pipe"] });
    const proc = { child, sock: child.stdio[3], loaded: new Set(), drop: new Set(), cached: new Map(), uncache: [], seq: 0 };
    proc.isReady = false;
    proc.startTimer = setTimeout(() => this.kill(proc, `did not start within ${READY_TIMEOUT_S} s`), READY_TIMEOUT_S * 1000);
    const reader = (proc.reader = new Reader((h, buffers) => this.fromRunner(proc, h, buffers)));
    proc.sock.on("data", (chunk) => {
      try {
        reader.push(chunk);
      } catch (e) {
        this.fault(proc, `the runner sent a malformed message (${e.message})`);
      }
    });
    proc.sock.on("error", () => {}); // its death is read from the exit below
    child.on("error", (e) => this.died(proc, null, null, `cannot start: ${e.message}`));
    child.on("exit", (code, signal) => this.died(proc, code, signal));
    this.proc = proc;
    return proc;
  }

  /** Kill runner `proc` now; `why` is what its death says (a timeout, a cancel, the worker's end). The
   * requests sent to it and not answered go to a fresh runner, in their order. */
  kill(proc, why) {
    proc.killed ??= why;
    if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill("SIGKILL");
    if (proc.isReady) this.retire(proc);
    else if (this.proc === proc) this.proc = null; // its death fails the requests waiting for it
  }

  /** Runner `proc` broke the pipe's rules (`why`), executing a plan: that request is answered plan_crashed
   * and the runner is killed. */
  fault(proc, why) {
    if (proc.retired || proc.dead) return;
    const head = this.jobs[0];
    if (head !== undefined && head.proc === proc) {
      this.jobs.shift();
      this.quiet(head);
      log.warning(`${head.what}: ${why}; runner restarted`);
      this.settle(head, new ProtocolError("plan_crashed", `${head.what}: ${why}; ${head.after}`));
    }
    this.kill(proc, why);
    if (!this.closed && proc.isReady) this.start();
  }

  /** Runner `proc` (it was ready) is gone or going: a fresh one takes the requests sent to it, if any. */
  retire(proc) {
    if (proc.retired) return;
    proc.retired = true;
    if (this.proc === proc) this.proc = null;
    this.jobs = this.jobs.filter((job) => !(job.proc === proc && job.done)); // cancelled: nothing to send again
    for (const job of this.jobs) {
      if (job.proc !== proc) continue;
      job.proc = null; // sent again, in order, once the fresh runner is ready
      this.quiet(job);
    }
    if (this.jobs.length && !this.closed) this.start();
  }

  close() {
    this.closed = true;
    if (this.proc !== null) this.kill(this.proc, "the worker is shutting down");
    for (const job of this.jobs.splice(0)) this.settle(job, new ProtocolError("internal", `${job.what} was stopped: the worker is shutting down`));
  }

  died(proc, code, signal, words = null) {
    if (proc.dead) return;
    proc.dead = true;
    clearTimeout(proc.startTimer);
    if (!words) {
      if (proc.killed) words = proc.killed;
      else if (signal === "SIGKILL") words = "the runner was killed (SIGKILL), most likely by the out-of-memory killer";
      else if (CRASH_SIGNALS.has(signal)) {
        const hint = signal === "SIGABRT" || signal === "SIGTRAP" ? " (an allocation past --max-run-memory-mb can end this way)" : "";
        words = `the runner crashed with ${signal}${hint}`;
      } else if (signal) words = `the runner was ended by ${signal}`;
      else words = `the runner exited with status ${code}`;
    }
    if (!proc.isReady) {
      if (this.proc === proc) this.proc = null;
      if (this.proc !== null) return; // a newer runner is starting: the requests wait for it
      for (const job of this.jobs.splice(0)) {
        this.settle(job, new ProtocolError("internal", `${job.what} not started: the sandboxed runner failed to start (${words}): see the worker's log`));
      }
      return;
    }
    // the runner executes the first request sent to it and not answered: that request alone is blamed
    const head = this.jobs[0];
    if (!proc.killed && head !== undefined && head.proc === proc) {
      this.jobs.shift();
      this.quiet(head);
      if (!head.done) {
        log.warning(`${head.what}: ${words}; runner restarted`);
        const crash = signal === "SIGKILL" ? "out_of_memory" : "plan_crashed";
        this.settle(head, new ProtocolError(crash, `${head.what}: ${words}; ${head.after}`));
      }
    } else if (!proc.killed && !this.closed) {
      log.warning(`the sandboxed runner ended while idle: ${words}`);
    }
    const crashed = !proc.killed && head?.proc === proc;
    this.retire(proc);
    if (crashed && !this.closed) this.start(); // warm for the next request
  }

  // -- requests -----------------------------------------------------------------------------------

  /** Send what `build(proc)` makes ([header, buffers]) to the runner, behind the requests already sent
   * (several may be in flight: the runner answers them in order); resolves with its answer. The job made
   * is `this.lastJob` as this returns (the supervisor's handle for a cancel). */
  request(build, { what, after, name, doing }) {
    if (this.closed) return Promise.reject(new ProtocolError("internal", `${what} not started: the worker is shutting down`));
    let job;
    const promise = new Promise((resolve, reject) => {
      job = { build, resolve, reject, what, after, name, doing, proc: null, seq: 0, done: false, timer: null, watch: null };
    });
    this.jobs.push(job);
    this.lastJob = job;
    const proc = this.start();
    if (proc.isReady) this.dispatch(proc, job);
    return promise;
  }

  /** Send `job` to ready runner `proc`. */
  dispatch(proc, job) {
    job.proc = proc;
    job.seq = ++proc.seq;
    const [header, buffers] = job.build(proc);
    header.seq = job.seq;
    header.drop = [...proc.drop];
    header.uncache = proc.uncache;
    proc.drop = new Set();
    proc.uncache = [];
    send(proc.sock, header, buffers);
    if (this.jobs[0] === job) this.begin(job);
  }

  /** `job` is the one the runner executes now: its clock starts (and, without prlimit, the memory watch). */
  begin(job) {
    this.spin.started();
    const ms = job.done ? CANCEL_GRACE_MS : this.timeout * 1000; // cancelled: it is skipped unless already running
    job.timer = setTimeout(() => this.overdue(job), ms);
    if (job.proc.memoryLimit === 0 && this.memoryMb > 0) job.watch = setInterval(() => this.watch(job), WATCH_MS);
  }

  quiet(job) {
    clearTimeout(job.timer);
    clearInterval(job.watch);
    job.timer = job.watch = null;
  }

  /** Wait for the answer to the one request in flight by polling the pipe for a short while instead of
   * sleeping on it (src/pipe.js's Spin: only while recent answers came that fast); what comes is parsed as
   * the 'data' handler would (one thread: libuv is not reading meanwhile, and finds nothing left). */
  poll() {
    const job = this.jobs[0];
    if (this.jobs.length !== 1 || job.proc === null || job.done) return;
    const proc = job.proc;
    const fd = proc.sock._handle?.fd;
    if (typeof fd !== "number" || fd < 0) return;
    flush(proc.sock);
    this.spin.wait(() => {
      const n = readNow(fd, SCRATCH);
      if (n === 0) return false;
      try {
        proc.reader.push(own(SCRATCH.subarray(0, n)));
      } catch (e) {
        this.fault(proc, `the runner sent a malformed message (${e.message})`);
        return true;
      }
      return this.jobs[0] !== job;
    });
  }

  settle(job, outcome) {
    if (job.done) return;
    job.done = true;
    if (outcome instanceof Error) job.reject(outcome);
    else job.resolve(outcome);
  }

  /** Past --run-timeout (or, for a cancelled job, past its grace): the runner is killed. */
  overdue(job) {
    if (this.jobs[0] !== job || job.proc === null) return;
    this.jobs.shift();
    this.quiet(job);
    if (!job.done) {
      log.warning(`${job.what} ran past --run-timeout ${this.timeout} s: runner stopped`);
      const words = `ran past the worker's --run-timeout of ${this.timeout} s and was stopped`;
      this.settle(job, new ProtocolError("plan_timeout", `${job.what} ${words}; ${job.after}`));
    }
    this.kill(job.proc, "timeout");
    if (!this.closed) this.start();
  }

  /** Without prlimit: the runner's resident memory over its start-up use, read while it works. */
  watch(job) {
    const proc = job.proc;
    if (this.jobs[0] !== job || proc === null) return;
    const now = rss(proc.child.pid);
    if (now === null || now - (proc.baseRss ?? now) <= this.memoryMb * MiB) return;
    this.jobs.shift();
    this.quiet(job);
    this.settle(job, this.outOfMemory(job, `its runner's resident memory reached ${Math.floor(now / MiB)} MiB`));
    this.kill(proc, "out of memory");
    if (!this.closed) this.start();
  }

  /** Cancel request `job` (a cancel request): answered with `error` now; false if it was answered. The
   * runner executing it is stopped (a fresh one takes the requests behind it); one sent behind others is
   * skipped by the runner if it has not started it by then, else stopped after a short grace. */
  abort(job, error) {
    if (job.done) return false;
    this.settle(job, error);
    const i = this.jobs.indexOf(job);
    if (job.proc === null) {
      this.jobs.splice(i, 1); // never sent
    } else if (i === 0) {
      this.jobs.shift();
      this.quiet(job);
      this.kill(job.proc, error.code);
      if (!this.closed) this.start();
    } else {
      send(job.proc.sock, { t: "cancel", seq: job.seq });
    }
    return true;
  }

  outOfMemory(job, text) {
    const bound = this.memoryMb ? `--max-run-memory-mb ${this.memoryMb}` : "memory";
    return new ProtocolError("out_of_memory", `plan ${pyRepr(job.name)} ran out of memory ${job.doing} on worker ${pyRepr(this.workerId)} (${bound}): ${text}`);
  }

  fromRunner(proc, h, buffers) {
    if (h.t === "ready") {
      clearTimeout(proc.startTimer);
      proc.isReady = true;
      proc.memoryLimit = h.memoryLimit;
      if (!h.memoryLimit && this.memoryMb) proc.baseRss = rss(proc.child.pid);
      const limit = h.memoryLimit ? `${Math.floor(h.memoryLimit / MiB)} MiB` : this.memoryMb ? `none (resident memory watched: ${this.memoryMb} MiB)` : "none";
      log.info(`runner ${h.pid} ready (data memory limit ${limit})`);
      if (this.proc !== proc) return;
      for (const job of this.jobs) if (job.proc === null) this.dispatch(proc, job);
      return;
    }
    const job = this.jobs[0];
    if (job === undefined || job.proc !== proc || h.seq !== job.seq) {
      this.fault(proc, `the runner answered request #${clean(String(h.seq))} out of turn (${clean(String(h.t))})`);
      return;
    }
    this.spin.arrived();
    this.jobs.shift();
    this.quiet(job);
    const next = this.jobs[0];
    if (next !== undefined && next.proc === proc) this.begin(next); // the clock of the next one starts now
    if (job.done) return; // cancelled: answered already
    if (h.t === "failed") {
      if (h.code === "out_of_memory") this.settle(job, this.outOfMemory(job, h.message));
      else if (h.code === "run_failed") this.settle(job, new Error(h.message)); // onnxruntime's own words
      else this.settle(job, new ProtocolError(h.code, h.message));
      return;
    }
    if (h.t === "skipped") {
      this.settle(job, new ProtocolError("internal", `${job.what}: the runner skipped it`)); // not cancelled here: never
      return;
    }
    this.settle(job, { header: h, buffers });
  }
}
