// Requests checked against schemas/*.json itself (PROTOCOL.md §9: a header is refused with
// unknown_type or invalid_message exactly when it does not validate against the schema of its type).
// A small interpreter of the JSON Schema keywords those schemas use; integers must be JSON integers.

import { createHash } from "node:crypto";
import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { JFloat, pyRepr } from "./json.js";

export const PROTOCOL_VERSION = 1;


const here = dirname(fileURLToPath(import.meta.url));
/** The repository's schemas/ (the contract), or PLANWIRE_SCHEMAS. */
export const SCHEMA_DIR = process.env.PLANWIRE_SCHEMAS || join(here, "..", "..", "..", "schemas");

/** One schema (a node of a schema file) with every keyword check() reads, absent ones null, and its $ref
 * resolved: every Rule has the same shape, so that check() reads each keyword with one monomorphic load
 * instead of looking it up in schema objects of many shapes. */
class Rule {
  constructor(root, schema, seen) {
    seen.set(schema, this);
    const s = schema !== null && typeof schema === "object" ? schema : {};
    const rule = (x) => ruleOf(root, x, seen);
    this.anyOf = s.anyOf?.map(rule) ?? null;
    this.enum = s.enum ?? null;
    this.type = s.type ?? null;
    this.minimum = s.minimum ?? null;
    this.maximum = s.maximum ?? null;
    this.minLength = s.minLength ?? null;
    this.maxLength = s.maxLength ?? null;
    this.maxItems = s.maxItems ?? null;
    this.uniqueItems = s.uniqueItems === true;
    this.items = rule(s.items);
    this.minProperties = s.minProperties ?? null;
    this.maxProperties = s.maxProperties ?? null;
    this.properties = new Map(Object.entries(s.properties ?? {}).map(([k, p]) => [k, rule(p)]));
    this.closed = s.additionalProperties === false; // no other keys
    this.additional = s.additionalProperties === false ? null : rule(s.additionalProperties); // their schema
    this.required = s.required ?? null;
    this.defaults = Object.entries(s.properties ?? {}).filter(([, p]) => p.default !== undefined).map(([k, p]) => [k, p.default]);
  }
}

/** The Rule of `schema` (null for none or `true`: anything), its $ref resolved in `root`; `seen` maps the
 * schemas already made to their Rule (each made once, cycles included). */
function ruleOf(root, schema, seen) {
  if (schema === undefined || schema === true) return null;
  if (schema?.$ref) schema = root.$defs[schema.$ref.split("/").pop()];
  return seen.get(schema) ?? new Rule(root, schema, seen);
}

// Every request type the schemas define (a request carries `id`, a reply `re`): a message type added to
// the contract is validated here as soon as its schema is; the service says whether it handles it.
const schemas = new Map(); // type -> its schema as a Rule
let runSchema = ""; // the sha256 of run.json's schema as read (runFast below is written for one)
for (const file of readdirSync(SCHEMA_DIR).filter((f) => f.endsWith(".json")).sort()) {
  const schema = JSON.parse(readFileSync(join(SCHEMA_DIR, file), "utf8"));
  if (schema.properties?.id && schema.properties?.type?.enum?.length === 1) {
    const type = schema.properties.type.enum[0];
    schemas.set(type, ruleOf(schema, schema, new Map()));
    if (type === "run") runSchema = createHash("sha256").update(JSON.stringify(schema)).digest("hex");
  }
}
export const REQUESTS = [...schemas.keys()];

export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export function isInt(v) {
  return (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
}

function kindOf(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (v instanceof JFloat) return "number";
  if (isInt(v)) return "integer";
  return typeof v; // string, boolean, object
}

function show(v) {
  if (typeof v === "string") return pyRepr(v.length > 64 ? v.slice(0, 64) + "..." : v);
  if (v instanceof JFloat) return String(v.value);
  if (v === null) return "null";
  if (typeof v === "object") return Array.isArray(v) ? "an array" : "an object";
  return String(v);
}

function codepoints(s) {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/** Whether an array's items are distinct (as a Set counts them); a Set only for longer arrays. */
function distinct(v) {
  if (v.length > 8) return new Set(v).size === v.length;
  for (let i = 1; i < v.length; i++) for (let j = 0; j < i; j++) if (v[i] === v[j] || (v[i] !== v[i] && v[j] !== v[j])) return false;
  return true;
}

/** A value that does not match its schema (thrown within check, never out of this module): `path` collects
 * the keys and indexes leading to it as it travels up (innermost first), so that a request that matches
 * builds no path at all; not an Error, so that a failed anyOf branch captures no stack. */
class Mismatch {
  constructor(message) {
    this.message = message;
    this.path = [];
  }
}

function fail(msg) {
  throw new Mismatch(msg);
}

/** check() of `v`, the item or field `at` (an index or a key) of the value being checked. */
function checkAt(rule, v, at) {
  try {
    check(rule, v);
  } catch (e) {
    if (e instanceof Mismatch) e.path.push(at);
    throw e;
  }
}

/** Whether `v` matches `rule` (null: anything); a Mismatch says where it does not. */
function check(rule, v) {
  if (rule === null) return;
  if (rule.anyOf !== null) {
    for (const r of rule.anyOf) {
      try {
        check(r, v);
        return;
      } catch {}
    }
    fail(`${show(v)} matches none of the allowed forms`);
  }
  if (rule.enum !== null && !rule.enum.includes(v)) {
    fail(`Invalid enum value ${show(v)}`);
  }
  const kind = kindOf(v);
  if (rule.type !== null && rule.type !== kind) {
    fail(`Expected \`${rule.type}\`, got \`${kind === "integer" ? "int" : kind}\``);
  }
  if (kind === "integer") {
    // a JS number is exact here (under 2^53), and so compares exactly with a bound rounded to a double
    if (rule.minimum !== null && (typeof v === "number" ? v < rule.minimum : BigInt(v) < BigInt(rule.minimum))) {
      fail(`Expected \`int\` >= ${rule.minimum}`);
    }
    if (rule.maximum !== null && (typeof v === "number" ? v > rule.maximum : BigInt(v) > BigInt(rule.maximum))) {
      fail(`Expected \`int\` <= ${BigInt(rule.maximum)}`);
    }
  } else if (kind === "string") {
    if (rule.minLength !== null && v.length < 2 * rule.minLength && codepoints(v) < rule.minLength) {
      fail(`Expected \`str\` of length >= ${rule.minLength}`);
    }
    if (rule.maxLength !== null && v.length > rule.maxLength && codepoints(v) > rule.maxLength) {
      fail(`Expected \`str\` of length <= ${rule.maxLength}`);
    }
  } else if (kind === "array") {
    if (rule.maxItems !== null && v.length > rule.maxItems) {
      fail(`Expected \`array\` of length <= ${rule.maxItems}, got ${v.length} items`);
    }
    if (rule.uniqueItems && v.length > 1 && !distinct(v)) {
      const twice = v.find((item, i) => v.indexOf(item) !== i);
      fail(`Expected \`array\` of distinct items, got ${show(twice)} more than once`);
    }
    if (rule.items !== null) for (let i = 0; i < v.length; i++) checkAt(rule.items, v[i], i);
  } else if (kind === "object") {
    const keys = Object.keys(v);
    if (rule.minProperties !== null && keys.length < rule.minProperties) {
      fail(`Expected an object with at least ${rule.minProperties} field(s)`);
    }
    if (rule.maxProperties !== null && keys.length > rule.maxProperties) {
      fail(`Expected an object with at most ${rule.maxProperties} field(s), got ${keys.join(", ")}`);
    }
    const props = rule.properties;
    for (const k of keys) {
      if (!props.has(k)) {
        if (rule.closed) fail(`Object contains unknown field \`${k}\``);
        if (rule.additional !== null) checkAt(rule.additional, v[k], k);
      }
    }
    if (rule.required !== null) for (const r of rule.required) if (!(r in v)) fail(`Object missing required field \`${r}\``);
    for (const k of keys) {
      const p = props.get(k);
      if (p !== undefined) checkAt(p, v[k], k);
    }
  }
}

const MAX_ID = 2n ** 63n;

/** The id of a refused header, or -1 when it cannot be read. */
export function requestId(header) {
  if (header === null || typeof header !== "object" || Array.isArray(header)) return -1;
  const id = header.id;
  if (typeof id === "number") return Number.isInteger(id) && id >= 0 ? id : -1; // a Number is under 2^53 here (json.js)
  return typeof id === "bigint" && id >= 0n && id < MAX_ID ? id : -1;
}

/** Validate a parsed header as a request; returns it with defaults filled in. */
export function validateRequest(header) {
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new ProtocolError("invalid_message", `invalid request: Expected \`object\`, got \`${kindOf(header)}\``);
  }
  if (!("type" in header)) throw new ProtocolError("unknown_type", "invalid request: Object missing required field `type`");
  const type = header.type;
  if (typeof type !== "string" || !schemas.has(type)) {
    throw new ProtocolError(
      "unknown_type",
      `invalid request: Invalid value ${show(type)} - at \`$.type\` (known: ${REQUESTS.join(", ")})`,
    );
  }
  const rule = schemas.get(type);
  try {
    check(rule, header);
  } catch (e) {
    if (!(e instanceof Mismatch)) throw e;
    const path = e.path.reverse().map((at) => (typeof at === "number" ? `[${at}]` : `.${at}`)).join("");
    throw new ProtocolError("invalid_message", `invalid request: ${e.message} - at \`$${path}\``);
  }
  // Defaults (schemas' "default")
  for (const [k, dflt] of rule.defaults) {
    if (!(k in header)) header[k] = Array.isArray(dflt) ? [] : dflt;
  }
  return header;
}

// -- The run header a planwire client writes, read without the general parse --------------------------

let at = 0; // runFast's cursor into its header's text
// runFast applies run.json's rules itself (key lengths, distinct outputs, minimums; no maxItems or maximum):
// the run.json it was written for. Any other (the contract changed, or PLANWIRE_SCHEMAS names a stricter one)
// turns it off, and every run takes the general parse (tests/test_node_worker.py fails until it is checked
// against the new rules and this is updated).
const FAST_RUN_SCHEMA = "52984eb5b97e63b9326ac471dcd5d6154c2960d96d07354e7102276c85070932";
const fastRuns = runSchema === FAST_RUN_SCHEMA;
const PREFIX = Buffer.from('{"type":"run","id":');

/** A string of printable ASCII but quote and backslash (so its bytes are its text, without escapes),
 * starting at the quote at `at`, or undefined. */
function asciiString(b) {
  if (b.charCodeAt(at) !== 34) return undefined;
  const start = ++at;
  for (let c; at < b.length; at++) {
    c = b.charCodeAt(at);
    if (c === 34) return b.slice(start, at++);
    if (c < 0x20 || c > 0x7e || c === 92) return undefined;
  }
  return undefined;
}

/** A non-negative integer of 1 to 15 digits without a leading zero (exact in a double) at `at`, or -1. */
function smallInt(b) {
  const start = at;
  let n = 0;
  for (let c; at < b.length && (c = b.charCodeAt(at)) >= 48 && c <= 57; at++) n = n * 10 + (c - 48);
  const digits = at - start;
  return digits === 0 || digits > 15 || (digits > 1 && b.charCodeAt(start) === 48) ? -1 : n;
}

/** `lit` (ASCII) at `at`, stepped over. */
function literal(b, lit) {
  for (let k = 0; k < lit.length; k++) if (b.charCodeAt(at + k) !== lit.charCodeAt(k)) return false;
  at += lit.length;
  return true;
}

/** A key's string of 1 to 256 characters at `at`, as run.json's Key, or undefined. */
function key(b) {
  const k = asciiString(b);
  return k !== undefined && k.length >= 1 && k.length <= 256 ? k : undefined;
}

/** The checked message of a run header in exactly the shape a planwire client writes it (compact, keys in
 * the order type, id, plan, args of refs only, outputs, then fetch and inline_max or neither, no escapes,
 * ASCII only), or undefined: then parseHeader and validateRequest decide, as for any header. Anything
 * this reads is a valid run (its checks are those of run.json), and the message is the one those two give:
 * the same keys in the same order, defaults filled in (tests/test_node_worker.py compares them). */
export function runFast(header) {
  if (!fastRuns || header.length <= PREFIX.length || PREFIX.compare(header, 0, PREFIX.length) !== 0) return undefined;
  // each byte as one character: one of a non-ASCII character's bytes is never one this reads
  const b = header.toString("latin1");
  at = PREFIX.length;
  const id = smallInt(b);
  if (id < 0 || !literal(b, ',"plan":')) return undefined;
  const plan = asciiString(b);
  if (plan === undefined || !literal(b, ',"args":[')) return undefined;
  const args = [];
  if (b.charCodeAt(at) === 93) at++;
  else {
    for (;;) {
      if (!literal(b, '{"ref":')) return undefined;
      const ref = key(b);
      if (ref === undefined || b.charCodeAt(at) !== 125) return undefined;
      args.push({ ref });
      const c = b.charCodeAt(++at);
      at++;
      if (c === 93) break;
      if (c !== 44) return undefined;
    }
  }
  if (!literal(b, ',"outputs":[')) return undefined;
  const outputs = [];
  if (b.charCodeAt(at) === 93) at++;
  else {
    for (;;) {
      const k = key(b);
      if (k === undefined) return undefined;
      outputs.push(k);
      const c = b.charCodeAt(at++);
      if (c === 93) break;
      if (c !== 44) return undefined;
    }
  }
  if (outputs.length > 1 && !distinct(outputs)) return undefined;
  const fetch = [];
  const hasFetch = literal(b, ',"fetch":[');
  if (hasFetch) {
    if (b.charCodeAt(at) === 93) at++;
    else {
      for (;;) {
        const i = smallInt(b);
        if (i < 0) return undefined;
        fetch.push(i);
        const c = b.charCodeAt(at++);
        if (c === 93) break;
        if (c !== 44) return undefined;
      }
    }
  }
  let inlineMax = 0;
  if (literal(b, ',"inline_max":')) {
    inlineMax = smallInt(b);
    if (inlineMax < 0) return undefined;
    // keys in the header's order, then the defaults (as validateRequest fills them in)
    if (!hasFetch) return at === b.length - 1 && b.charCodeAt(at) === 125 ? { type: "run", id, plan, args, outputs, inline_max: inlineMax, fetch } : undefined;
  }
  if (at !== b.length - 1 || b.charCodeAt(at) !== 125) return undefined;
  return { type: "run", id, plan, args, outputs, fetch, inline_max: inlineMax };
}

