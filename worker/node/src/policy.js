// The data owner's release rules (`plan-worker --policy policy.toml`): what private-derived results may
// leave (as worker/policy.py, whose docstring shows the file). Without a policy nothing computed from
// private data ever leaves the worker. Messages match the reference worker's.

import { readFileSync } from "node:fs";
import { parse as parseToml } from "smol-toml";
import { pyRepr } from "./json.js";

export class PolicyError extends Error {}

/** A JS number as Python's repr() of a float shows it (1.0, 1e-05, 0.1). */
export function pyFloat(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const [mant, exp] = x.toExponential().split("e");
  const e = Number(exp);
  if (e < -4 || e >= 16) return `${mant}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  const s = String(x);
  return s.includes(".") ? s : s + ".0";
}

/** A JS number as Python's format(x, ".{digits}g") shows it (the default "g" is 6 digits). */
export function pyG(x, digits = 6) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  const [mant, exp] = x.toExponential(digits - 1).split("e");
  const e = Number(exp);
  const strip = (s) => (s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s);
  if (e < -4 || e >= digits) return `${strip(mant)}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  return strip(x.toFixed(Math.max(0, digits - 1 - e)));
}

/** Any parsed TOML value as Python's repr() shows it (for messages naming what was found). */
export function pyValue(v) {
  if (typeof v === "string") return pyRepr(v);
  if (typeof v === "bigint") return String(v);
  if (typeof v === "number") return pyFloat(v);
  if (typeof v === "boolean") return v ? "True" : "False";
  if (v === null || v === undefined) return "None";
  if (Array.isArray(v)) return "[" + v.map(pyValue).join(", ") + "]";
  if (v instanceof Date) return pyRepr(String(v));
  return "{" + Object.entries(v).map(([k, x]) => `${pyRepr(k)}: ${pyValue(x)}`).join(", ") + "}";
}

export class Bound {
  constructor({ equal = null, min = null, max = null }) {
    this.equal = equal;
    this.min = min;
    this.max = max;
  }

  /** Why `value` breaks the bound, or null. */
  check(value) {
    if (this.equal !== null && value !== this.equal) return `must be ${pyFloat(this.equal)}`;
    if (this.min !== null && !(value >= this.min)) return `must be at least ${pyFloat(this.min)}`;
    if (this.max !== null && !(value <= this.max)) return `must be at most ${pyFloat(this.max)}`;
    return null;
  }

  toString() {
    if (this.equal !== null) return `= ${pyFloat(this.equal)}`;
    return `in [${this.min === null ? "-inf" : pyFloat(this.min)}, ${this.max === null ? "inf" : pyFloat(this.max)}]`;
  }
}

export class Rule {
  constructor({ fingerprint, name, outputs, inputs, minBatch, clipNorm, noiseMultiplier }) {
    Object.assign(this, { fingerprint, name, outputs, inputs, minBatch, clipNorm, noiseMultiplier });
  }

  describe() {
    const parts = [...this.outputs].map(([o, r]) => `${o}: ${r.how}`);
    if (this.clipNorm !== null) parts.push(`clip_norm ${pyFloat(this.clipNorm)}`);
    if (this.noiseMultiplier) parts.push(`noise_multiplier ${pyFloat(this.noiseMultiplier)}`);
    return parts.join(", ");
  }
}

export class Policy {
  constructor(rules, delta = 1e-5, path = "", maxEpsilon = null) {
    this.rules = rules; // Map fingerprint -> Rule
    this.delta = delta;
    this.path = path;
    this.maxEpsilon = maxEpsilon; // each client's privacy budget over all noised releases (null: unbounded)
  }
}

/** The policy in a TOML file; PolicyError says what is wrong and where. */
export function load(path) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    const why = { ENOENT: "No such file or directory", EACCES: "Permission denied", EISDIR: "Is a directory" }[e.code];
    throw new PolicyError(`--policy ${pyRepr(path)}: cannot read it (${why ?? e.message})`);
  }
  let doc;
  try {
    doc = parseToml(text, { integersAsBigInt: true });
  } catch (e) {
    throw new PolicyError(`--policy ${pyRepr(path)}: not valid TOML (${String(e.message).split("\n")[0]})`);
  }
  return parse(doc, path);
}

const isTable = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Date);

export function parse(doc, where = "policy") {
  const unknown = Object.keys(doc).filter((k) => !["plan", "delta", "max_epsilon"].includes(k)).sort();
  if (unknown.length) {
    throw new PolicyError(
      `${where}: unknown top-level keys ${pyValue(unknown)} (expected [[plan]] tables, delta and max_epsilon)`,
    );
  }
  const delta = number(doc.delta ?? 1e-5, `${where}: delta`);
  if (!(delta > 0 && delta < 1)) throw new PolicyError(`${where}: delta must be between 0 and 1, got ${pyFloat(delta)}`);
  let maxEpsilon = null;
  if ("max_epsilon" in doc) {
    maxEpsilon = number(doc.max_epsilon, `${where}: max_epsilon`);
    if (!(maxEpsilon > 0)) throw new PolicyError(`${where}: max_epsilon must be positive, got ${pyFloat(maxEpsilon)}`);
  }
  const plans = doc.plan ?? [];
  if (!Array.isArray(plans)) throw new PolicyError(`${where}: 'plan' must be an array of tables ([[plan]])`);
  const rules = new Map();
  plans.forEach((entry, i) => {
    const r = rule(entry, `${where}: plan #${i + 1}`);
    if (rules.has(r.fingerprint)) {
      throw new PolicyError(`${where}: plan #${i + 1}: fingerprint ${r.fingerprint.slice(0, 12)}… is approved twice`);
    }
    rules.set(r.fingerprint, r);
  });
  return new Policy(rules, delta, where, maxEpsilon);
}

const RULE_KEYS = ["fingerprint", "name", "outputs", "inputs", "min_batch", "update"];

function rule(entry, at) {
  if (!isTable(entry)) throw new PolicyError(`${at}: must be a table`);
  const unknown = Object.keys(entry).filter((k) => !RULE_KEYS.includes(k)).sort();
  if (unknown.length) throw new PolicyError(`${at}: unknown keys ${pyValue(unknown)}`);
  const fp = entry.fingerprint;
  if (typeof fp !== "string" || !/^[0-9a-f]{64}$/.test(fp)) {
    throw new PolicyError(`${at}: fingerprint must be the plan's sha256 (64 lowercase hex digits), got ${pyValue(fp)}`);
  }
  at = `${at} (${entry.name || fp.slice(0, 12)})`;
  const outputs = new Map();
  const rawOutputs = entry.outputs ?? {};
  if (!isTable(rawOutputs) || !Object.keys(rawOutputs).length) {
    throw new PolicyError(`${at}: 'outputs' must name at least one output and how it may leave`);
  }
  for (const [name, how] of Object.entries(rawOutputs)) {
    if (how === "as_is") outputs.set(name, { how: "as_is", param: "" });
    else if (isTable(how) && Object.keys(how).join() === "update" && typeof how.update === "string" && how.update) {
      outputs.set(name, { how: "update", param: how.update });
    } else {
      throw new PolicyError(
        `${at}: output ${pyRepr(name)}: expected "as_is" or { update = "INPUT" } (the parameter input it updates), got ${pyValue(how)}`,
      );
    }
  }
  const inputs = new Map();
  const rawInputs = entry.inputs ?? {};
  if (!isTable(rawInputs)) throw new PolicyError(`${at}: inputs must be a table of input bounds`);
  for (const [name, b] of Object.entries(rawInputs)) {
    if (!isTable(b) || !Object.keys(b).length || Object.keys(b).some((k) => !["equal", "min", "max"].includes(k))) {
      throw new PolicyError(`${at}: input ${pyRepr(name)}: expected a table with equal, or min and/or max`);
    }
    const bound = {};
    for (const [k, v] of Object.entries(b)) bound[k] = number(v, `${at}: input ${pyRepr(name)} ${k}`);
    inputs.set(name, new Bound(bound));
  }
  let minBatch = entry.min_batch ?? 0n;
  if (typeof minBatch !== "bigint" || minBatch < 0n) {
    throw new PolicyError(`${at}: min_batch must be a whole number ≥ 0, got ${pyValue(minBatch)}`);
  }
  minBatch = Number(minBatch);
  const update = entry.update ?? {};
  if (!isTable(update) || Object.keys(update).some((k) => k !== "clip_norm" && k !== "noise_multiplier")) {
    throw new PolicyError(`${at}: update must be a table with clip_norm and/or noise_multiplier`);
  }
  const clip = update.clip_norm === undefined ? null : number(update.clip_norm, `${at}: update.clip_norm`);
  const noise = number(update.noise_multiplier ?? 0, `${at}: update.noise_multiplier`);
  if (clip !== null && !(clip > 0)) throw new PolicyError(`${at}: update.clip_norm must be positive, got ${pyFloat(clip)}`);
  if (noise < 0) throw new PolicyError(`${at}: update.noise_multiplier must be ≥ 0, got ${pyFloat(noise)}`);
  if (noise && clip === null) throw new PolicyError(`${at}: update.noise_multiplier needs update.clip_norm (the noise is scaled to it)`);
  if ((clip !== null || noise) && ![...outputs.values()].some((r) => r.how === "update")) {
    throw new PolicyError(`${at}: update.clip_norm/noise_multiplier given but no output is released as an update`);
  }
  return new Rule({
    fingerprint: fp,
    name: String(entry.name ?? ""),
    outputs,
    inputs,
    minBatch,
    clipNorm: clip,
    noiseMultiplier: noise,
  });
}

function number(value, what) {
  const v = typeof value === "bigint" ? Number(value) : value;
  if (typeof v !== "number" || !Number.isFinite(v)) throw new PolicyError(`${what} must be a finite number, got ${pyValue(value)}`);
  return v;
}
