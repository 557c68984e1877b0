// Requests checked against schemas/*.json itself (PROTOCOL.md §9: a header is refused with
// unknown_type or invalid_message exactly when it does not validate against the schema of its type).
// A small interpreter of the JSON Schema keywords those schemas use; integers must be JSON integers.

import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { JFloat, pyRepr } from "./json.js";

export const PROTOCOL_VERSION = 1;


const here = dirname(fileURLToPath(import.meta.url));
/** The repository's schemas/ (the contract), or PLANWIRE_SCHEMAS. */
export const SCHEMA_DIR = process.env.PLANWIRE_SCHEMAS || join(here, "..", "..", "..", "schemas");

// Every request type the schemas define (a request carries `id`, a reply `re`): a message type added to
// the contract is validated here as soon as its schema is; the service says whether it handles it.
const schemas = new Map();
for (const file of readdirSync(SCHEMA_DIR).filter((f) => f.endsWith(".json")).sort()) {
  const schema = JSON.parse(readFileSync(join(SCHEMA_DIR, file), "utf8"));
  if (schema.properties?.id && schema.properties?.type?.enum?.length === 1) schemas.set(schema.properties.type.enum[0], schema);
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

function resolve(root, schema) {
  if (!schema.$ref) return schema;
  return (schema.$target ??= root.$defs[schema.$ref.split("/").pop()]); // looked up once per schema
}

const EMPTY = Object.freeze({});
const hasOwn = Object.hasOwn;

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
function checkAt(root, schema, v, at) {
  try {
    check(root, schema, v);
  } catch (e) {
    if (e instanceof Mismatch) e.path.push(at);
    throw e;
  }
}

function check(root, schema, v) {
  schema = resolve(root, schema);
  if (schema.anyOf) {
    for (const s of schema.anyOf) {
      try {
        check(root, s, v);
        return;
      } catch {}
    }
    fail(`${show(v)} matches none of the allowed forms`);
  }
  if (schema.enum && !schema.enum.includes(v)) {
    fail(`Invalid enum value ${show(v)}`);
  }
  const kind = kindOf(v);
  if (schema.type && schema.type !== kind) {
    fail(`Expected \`${schema.type}\`, got \`${kind === "integer" ? "int" : kind}\``);
  }
  if (kind === "integer") {
    // a JS number is exact here (under 2^53), and so compares exactly with a bound rounded to a double
    if (schema.minimum !== undefined && (typeof v === "number" ? v < schema.minimum : BigInt(v) < BigInt(schema.minimum))) {
      fail(`Expected \`int\` >= ${schema.minimum}`);
    }
    if (schema.maximum !== undefined && (typeof v === "number" ? v > schema.maximum : BigInt(v) > BigInt(schema.maximum))) {
      fail(`Expected \`int\` <= ${BigInt(schema.maximum)}`);
    }
  } else if (kind === "string") {
    if (schema.minLength !== undefined && v.length < 2 * schema.minLength && codepoints(v) < schema.minLength) {
      fail(`Expected \`str\` of length >= ${schema.minLength}`);
    }
    if (schema.maxLength !== undefined && v.length > schema.maxLength && codepoints(v) > schema.maxLength) {
      fail(`Expected \`str\` of length <= ${schema.maxLength}`);
    }
  } else if (kind === "array") {
    if (schema.maxItems !== undefined && v.length > schema.maxItems) {
      fail(`Expected \`array\` of length <= ${schema.maxItems}, got ${v.length} items`);
    }
    if (schema.uniqueItems && v.length > 1 && !distinct(v)) {
      const twice = v.find((item, i) => v.indexOf(item) !== i);
      fail(`Expected \`array\` of distinct items, got ${show(twice)} more than once`);
    }
    if (schema.items) for (let i = 0; i < v.length; i++) checkAt(root, schema.items, v[i], i);
  } else if (kind === "object") {
    const keys = Object.keys(v);
    if (schema.minProperties !== undefined && keys.length < schema.minProperties) {
      fail(`Expected an object with at least ${schema.minProperties} field(s)`);
    }
    if (schema.maxProperties !== undefined && keys.length > schema.maxProperties) {
      fail(`Expected an object with at most ${schema.maxProperties} field(s), got ${keys.join(", ")}`);
    }
    const props = schema.properties || EMPTY;
    for (const k of keys) {
      if (!hasOwn(props, k)) {
        if (schema.additionalProperties === false) fail(`Object contains unknown field \`${k}\``);
        if (schema.additionalProperties) checkAt(root, schema.additionalProperties, v[k], k);
      }
    }
    if (schema.required) for (const r of schema.required) if (!(r in v)) fail(`Object missing required field \`${r}\``);
    for (const k of keys) {
      if (hasOwn(props, k)) checkAt(root, props[k], v[k], k);
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
  const schema = schemas.get(type);
  try {
    check(schema, schema, header);
  } catch (e) {
    if (!(e instanceof Mismatch)) throw e;
    const path = e.path.reverse().map((at) => (typeof at === "number" ? `[${at}]` : `.${at}`)).join("");
    throw new ProtocolError("invalid_message", `invalid request: ${e.message} - at \`$${path}\``);
  }
  // Defaults (schemas' "default")
  for (const [k, dflt] of (schema.$defaults ??= Object.entries(schema.properties).filter(([, p]) => p.default !== undefined).map(([k, p]) => [k, p.default]))) {
    if (!(k in header)) header[k] = Array.isArray(dflt) ? [] : dflt;
  }
  return header;
}
