// The sandboxed runner: the only process of a Node plan-worker that creates onnxruntime sessions and runs
// plans (as worker/runner.py is for the Python worker). Started by src/sandbox.js with the pipe on fd 3
// (src/pipe.js); it bounds itself (data memory through prlimit, no core files, first in line for the OOM
// killer; it dies with the worker through setpriv --pdeathsig) and then answers load and run requests one
// at a time. A plan that crashes, exhausts memory or never ends costs this process only.
//
//   node runner.js --threads N --memory-mb MB
//
// Requests: {t: "load", plan, drop, uncache} + [plan bytes];
//           {t: "run", plan, name, load, args: [{dtype, shape, index, keep?} | {cached}], drop, uncache}
//             + [plan bytes if load] + argument buffers.
// Answers:  {t: "ready", pid, memoryLimit}, {t: "loaded", inputs, outputs}, {t: "ran", outputs: [{dtype, shape}]}
//             + output buffers, {t: "failed", code, message}.

import { readFileSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { sendSync, receiveSync, PipeClosed, own } from "./pipe.js";
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

  async function load(pid, data) {
    const s = await loadSession(data, { threads, arena: false });
    sessions.set(pid, s);
    return s;
  }

  async function answer(h, buffers) {
    for (const pid of h.drop ?? []) {
      sessions.get(pid)?.release();
      sessions.delete(pid);
    }
    for (const id of h.uncache ?? []) cache.delete(id);
    try {
      if (h.t === "load") {
        const s = await load(h.plan, buffers[0]);
        sendSync(fd, { t: "loaded", inputs: plainMetadata(s.inputMetadata), outputs: plainMetadata(s.outputMetadata) });
        return;
      }
      const s = h.load ? await load(h.plan, buffers[0]) : sessions.get(h.plan);
      if (s === undefined) throw new ProtocolError("internal", `the runner has no session for plan ${JSON.stringify(h.name)}`);
      const args = h.args.map((a) => {
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
      const results = await s.run(args);
      sendSync(fd, { t: "ran", outputs: results.map((r) => ({ dtype: r.dtype, shape: r.shape })) }, results.map((r) => r.data));
    } catch (e) {
      const code = e instanceof ProtocolError ? e.code : isOutOfMemory(e) ? "out_of_memory" : "run_failed";
      sendSync(fd, { t: "failed", code, message: String(e?.message ?? e) });
    }
  }

  const memoryLimit = bound(opt("--memory-mb", 0));
  sendSync(fd, { t: "ready", pid: process.pid, memoryLimit });
  for (;;) {
    let h, buffers;
    try {
      [h, buffers] = receiveSync(fd);
    } catch (e) {
      if (e instanceof PipeClosed || e.code === "ECONNRESET" || e.code === "EPIPE") process.exit(0); // the worker is gone
      throw e;
    }
    await answer(h, buffers);
  }
}

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`planwire runner: ${e?.stack ?? e}\n`);
  process.exit(3);
});
