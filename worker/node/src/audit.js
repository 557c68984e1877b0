// The audit log (`--audit FILE`): one JSON line per release or refusal of private-derived data, with the
// fields, order and number formatting of the Python worker's (json.dumps of worker/release.py's record).

import { openSync, writeSync, closeSync } from "node:fs";
import { pyFloat } from "./policy.js";

/** A JSON value as Python's json.dumps writes it: ", " and ": " separators, floats as Python's repr. */
export function pyJson(v) {
  if (v instanceof PyFloat) return Number.isFinite(v.value) ? pyFloat(v.value) : v.value > 0 ? "Infinity" : "NaN";
  if (Array.isArray(v)) return "[" + v.map(pyJson).join(", ") + "]";
  if (v !== null && typeof v === "object") {
    return "{" + Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyJson(x)}`).join(", ") + "}";
  }
  if (typeof v === "string") return JSON.stringify(v).replace(/[\u0080-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
  return JSON.stringify(v);
}

/** A number Python holds as a float (written 1.0, not 1). */
export class PyFloat {
  constructor(value) {
    this.value = value;
  }
}

export class AuditLog {
  /** Appends to `path` (null: records are dropped). */
  constructor(path = null) {
    this.fd = path === null ? null : openSync(path, "a");
  }

  write(record) {
    if (this.fd !== null) writeSync(this.fd, pyJson(record) + "\n");
  }

  close() {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}
