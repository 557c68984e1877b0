// V8 flags of the worker (bin/plan-worker.js sets them before it loads anything else) and of its runner
// (src/sandbox.js starts it with them).
//
// --interrupt-budget: how much bytecode a function runs between V8's checks for tiering it up to optimized
// code. At V8's default (66 KiB in Node 20) a request's path reaches optimized code only after a few
// thousand requests: a fresh worker's first ~4000 tiny calls cost ~40% more of its main thread (callgrind:
// 178k instructions per call over calls 6-4006 against 128k once warm) and the V8 compiler threads
// compete with it on small hosts. At 8000 the same path is optimized within about its first 1000 calls
// (145k per call over the same first 4000 calls; 128k once warm, as before; about the same work for the
// compiler threads, done sooner). Measured on Node 20 (V8 11.3).
//
// Only V8 before 12 has that flag: V8 12 (Node 22) dropped it, and there an unknown flag makes node refuse
// to start the runner ("bad option", status 9) and setFlagsFromString print two lines on stderr. Newer V8
// gets no flag (its default tier-up applies); tests/test_node_worker.py checks that this node takes them all.
const V8_MAJOR = Number(process.versions.v8.split(".")[0]);
export const V8_FLAGS = V8_MAJOR < 12 ? ["--interrupt-budget=8000"] : [];
