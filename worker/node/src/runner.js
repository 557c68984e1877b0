// The sandboxed runner: the only process of a Node plan-worker that creates onnxruntime sessions and runs
// plans (as worker/runner.py is for the Python worker). Started by src/sandbox.js with the pipe on fd 3
// (src/pipe.js); it bounds itself (data memory through prlimit, no core files, first in line for the OOM
// killer; it dies with the worker through setpriv --pdeathsig) and then answers load and run requests in
// the order they come, one answer each. The worker keeps several requests in flight (a window): each
// read of the (blocking) pipe takes in everything that has come, so a cancel read before the run it
// names starts skips that run (one already running is stopped by the worker). A plan that crashes,
// exhausts memory or never ends costs this process only. Blocking reads, not the event loop: the
// cheapest wake-up, and no busy-polling here (src/pipe.js's Spin is the worker's).
//
//   node runner.js --threads N --memory-mb MB
//
// Requests: {t: "load", seq, plan, drop, uncache} + [plan bytes];
//           {t: "run", seq, plan, name, load, args: [{dtype, shape, index, keep?} | {cached}], drop, uncache}
//             + [plan bytes if load] + argument buffers;
//           {t: "cancel", seq}: skip run #seq if it has not started (no answer of its own).
// Answers:  {t: "ready", pid, memoryLimit}; to request #seq, in order: {t: "loaded", seq, inputs, outputs},
//           {t: "ran", seq, outputs: [{dtype, shape}]} + output buffers, {t: "skipped", seq} (cancelled: its
//           loads and kept tensors are still taken in), {t: "failed", seq, code, message}.

import { readFileSync, readSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { sendSync, Reader, own } from "./pipe.js";
import { Tensor } from "./codec.js";
import { loadSession, plainMetadata } from "./runtime.js";
import { ProtocolError } from "./messages.js";

/** This process's data segment now (VmData: private writable memory, what RLIMIT_DATA counts). */
function dataBytes() {
  const m = /^VmData:\s+(\d+) kB/m.exec(readFileSync("/proc/self/status", "utf8"));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Bound this process; returns the RLIMIT_DATA set (0: none). Best effort where not permitted. */
function bound(memoryMb) {
  process.on("SIGINT", () => {}); // ^C reaches the whole group: the worker decides
  try {
    writeFileSync("/proc/self/oom_score_adj", "1000"); // past RAM, the kernel kills this process first
  } catch {
    // not Linux, or not allowed
  }
  const limits = ["--core=0:0"]; // a SIGFPE must not write a core file
  const limit = memoryMb > 0 ? dataBytes() + memoryMb * 2 ** 20 : 0; // what a load or run may add
  if (limit) limits.push(`--data=${limit}:`);
  try {
    execFileSync("prlimit", ["--pid", String(process.pid), ...limits], { stdio: "ignore" });
  } catch {
    return 0; // no prlimit here: the worker watches this process's memory instead (src/sandbox.js)
  }
  return limit;
}

export function isOutOfMemory(e) {
  const text = String(e?.message ?? e);
  return e instanceof RangeError || /bad_alloc|Failed to allocate|Cannot allocate memory|Array buffer allocation failed/.test(text);
}

async function main(argv) {
  const opt = (name, dflt) => {
    const i = argv.indexOf(name);
    return i < 0 ? dflt : Number(argv[i + 1]);
  };
  const threads = opt("--threads", 1);
  const fd = 3; // the pipe, blocking: this process waits on it and on nothing else
  const sessions = new Map(); // plan id -> session
  const cache = new Map(); // id -> Tensor: stored tensors the worker sent once and refers to since
  const queue = []; // requests read, not yet answered
  const cancelled = new Set(); // seqs of runs to skip
  const reader = new Reader((h, buffers) => (h.t === "cancel" ? cancelled.add(h.seq) : queue.push([h, buffers])));

  async function load(pid, data) {
    const s = await loadSession(data, { threads, arena: false });
    sessions.set(pid, s);
    return s;
  }

  /** The arguments of run request `h`, taking in the tensors it asks this process to keep. */
  function argsOf(h, buffers) {
    return h.args.map((a) => {
      if (a.cached !== undefined) {
        const t = cache.get(a.cached);
        if (t === undefined) throw new ProtocolError("internal", `the runner has no tensor #${a.cached}`);
        return t;
      }
      let data = buffers[a.index];
      if (a.keep !== undefined) {
        if (data.buffer.byteLength > data.length) data = own(data); // not the whole message
        cache.set(a.keep, new Tensor(a.dtype, a.shape, data));
      }
      return new Tensor(a.dtype, a.shape, data);
    });
  }

  async function answer(h, buffers) {
    const seq = h.seq;
    for (const pid of h.drop ?? []) {
      sessions.get(pid)?.release();
      sessions.delete(pid);
    }
    for (const id of h.uncache ?? []) cache.delete(id);
    try {
      if (h.t === "load") {
        const s = await load(h.plan, buffers[0]);
        sendSync(fd, { t: "loaded", seq, inputs: plainMetadata(s.inputMetadata), outputs: plainMetadata(s.outputMetadata) });
        return;
      }
      const s = h.load ? await load(h.plan, buffers[0]) : sessions.get(h.plan);
      if (s === undefined) throw new ProtocolError("internal", `the runner has no session for plan ${JSON.stringify(h.name)}`);
      const args = argsOf(h, buffers);
      if (cancelled.delete(seq)) {
        sendSync(fd, { t: "skipped", seq });
        return;
      }
      const results = await s.run(args);
      sendSync(fd, { t: "ran", seq, outputs: results.map((r) => ({ dtype: r.dtype, shape: r.shape })) }, results.map((r) => r.data));
    } catch (e) {
      const code = e instanceof ProtocolError ? e.code : isOutOfMemory(e) ? "out_of_memory" : "run_failed";
      sendSync(fd, { t: "failed", seq, code, message: String(e?.message ?? e) });
    } finally {
      for (const c of cancelled) if (c <= seq) cancelled.delete(c); // came too late: the worker discards the answer
    }
  }

  const memoryLimit = bound(opt("--memory-mb", 0));
  sendSync(fd, { t: "ready", pid: process.pid, memoryLimit });
  for (;;) {
    while (!queue.length) {
      // everything that has come, at least one byte: several pipelined requests in one read
      let n;
      try {
        n = readSync(fd, SCRATCH, 0, SCRATCH.length, null);
      } catch (e) {
        if (e.code === "EAGAIN" || e.code === "EINTR") continue;
        if (e.code === "ECONNRESET" || e.code === "EPIPE") process.exit(0); // the worker is gone
        throw e;
      }
      if (n === 0) process.exit(0); // the worker is gone
      reader.push(own(SCRATCH.subarray(0, n)));
    }
    const [h, buffers] = queue.shift();
    await answer(h, buffers);
  }
}

const SCRATCH = Buffer.allocUnsafeSlow(1 << 16);

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`planwire runner: ${e?.stack ?? e}\n`);
  process.exit(3);
});
