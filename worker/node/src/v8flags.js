// V8 flags of the worker (bin/plan-worker.js sets them before it loads anything else) and of its runner
// (src/sandbox.js starts it with them).
//
// --interrupt-budget: how much bytecode a function runs between V8's checks for tiering it up to optimized
// code. At V8's default (66 KiB in Node 20) a request's path reaches optimized code only after a few
// thousand requests: a fresh worker's first ~4000 tiny calls cost ~40% more of its main thread (callgrind:
// 178k instructions per call over calls 6-4006 against 128k once warm) and the V8 compiler threads
// compete with it on small hosts. At 8000 the same path is optimized within the first few hundred calls
// (145k per call over the same first 4000 calls; 128k once warm, as before; about the same work for the
// compiler threads, done sooner).
export const V8_FLAGS = ["--interrupt-budget=8000"];
