// Plans kept for review: a worker with private data stores every plan it receives as
// DIR/FINGERPRINT.onnx, where its operator finds it (`plan-worker review FINGERPRINT`, the Python
// command, reads the same directory; as worker/review.py's keep and default_plans_dir).

import { existsSync, mkdirSync, writeFileSync, renameSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { log } from "./log.js";
import { pyRepr } from "./json.js";

/** $XDG_STATE_HOME/planwire/plans (or ~/.local/state/planwire/plans). */
export function defaultPlansDir() {
  const base = process.env.XDG_STATE_HOME || join(homedir(), ".local", "state");
  return join(base, "planwire", "plans");
}

/** Store a received plan as DIR/FINGERPRINT.onnx (once; never overwritten); a failure is logged only. */
export function keepPlan(dir, pid, data, name) {
  const path = join(dir, `${pid}.onnx`);
  try {
    if (existsSync(path)) return;
    mkdirSync(dir, { recursive: true });
    const tmp = join(dir, `${pid}.tmp`);
    writeFileSync(tmp, data);
    renameSync(tmp, path);
  } catch (e) {
    log.warning(`plan ${pyRepr(name)} (${pid.slice(0, 12)}) not kept in ${dir}: ${e.message}`);
  }
}
