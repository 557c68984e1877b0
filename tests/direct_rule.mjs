// The Node worker's direct-lane rule (worker/node/src/direct.js) on calls read from stdin, for
// tests/test_node_direct.py: a JSON list of {data (the plan's bytes, base64), shapes, max_bytes}; prints the
// list of decisions: "direct", "plan" (the plan is never direct) or "call" (this call is not).
import { directPlan } from "../worker/node/src/direct.js";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const decisions = JSON.parse(Buffer.concat(chunks).toString("utf8")).map(({ data, shapes, max_bytes }) => {
  const rule = directPlan(new Uint8Array(Buffer.from(data, "base64")), max_bytes);
  if (rule.reason !== undefined) return "plan";
  return rule.fits([...rule.inputs.keys()], shapes) ? "direct" : "call";
});
process.stdout.write(JSON.stringify(decisions));
