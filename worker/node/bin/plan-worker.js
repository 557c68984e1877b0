#!/usr/bin/env node
// plan-worker (Node.js): serve planwire plans over ZeroMQ with onnxruntime-node. Same flags, defaults,
// ready line, exit codes and signal handling as the Python plan-worker where they apply; a configuration
// error is one line on stderr and exit status 2, before anything is bound.

import v8 from "node:v8";
import { V8_FLAGS } from "../src/v8flags.js";

if (V8_FLAGS.length) v8.setFlagsFromString(V8_FLAGS.join(" ")); // before the worker's code is loaded (src/v8flags.js says why)
const { main } = await import("../src/cli.js");

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    process.stderr.write(`plan-worker: internal error: ${e?.stack ?? e}\n`);
    process.exit(1);
  },
);
