#!/usr/bin/env node
// check-plans: run the Node worker's plan checks (src/modelcheck.js) on ONNX files, one JSON line each:
// {"file", "ok": true, "nodes", "unknown_rank"} or {"file", "ok": false, "code", "message"}.
// `--max-bytes N` and `--max-nodes N` set the limits (defaults: 512 MiB, 100000), as plan-worker's.
// Used by tests/test_node_modelcheck.py to hold it to the Python worker's checks, message for message.

import { readFileSync } from "node:fs";
import { checkModel, PlanRejected } from "../src/modelcheck.js";

const argv = process.argv.slice(2);
let maxBytes = 512 * 2 ** 20;
let maxNodes = 100_000;
const files = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--max-bytes") maxBytes = Number(argv[++i]);
  else if (argv[i] === "--max-nodes") maxNodes = Number(argv[++i]);
  else files.push(argv[i]);
}
const out = [];
for (const file of files) {
  const data = readFileSync(file);
  try {
    const s = checkModel(data, { maxBytes, maxNodes });
    out.push(JSON.stringify({ file, ok: true, nodes: s.expandedNodeCount, unknown_rank: [...s.unknownRank].sort() }));
  } catch (e) {
    if (!(e instanceof PlanRejected)) {
      out.push(JSON.stringify({ file, ok: false, code: "internal", message: `${e?.name}: ${e?.message}` }));
    } else out.push(JSON.stringify({ file, ok: false, code: e.code, message: e.message }));
  }
}
process.stdout.write(out.join("\n") + "\n");
