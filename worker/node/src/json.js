// Strict JSON for planwire headers (PROTOCOL.md §2): UTF-8, RFC 8259, no duplicate keys, and integers
// kept apart from other numbers (`3.0` is not an integer here). Integers beyond 2^53 become BigInts so
// that ids up to 2^63 - 1 are echoed exactly.

/** A JSON number written with a fraction or an exponent: never an integer on the wire. */
export class JFloat {
  constructor(value) {
    this.value = value;
  }
}

export class JsonError extends Error {
  constructor(message, code = "bad_header") {
    super(message);
    this.code = code;
  }
}

export const MAX_DEPTH = 256;
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Parse one header frame; JsonError(bad_header | invalid_message) says what is wrong. */
export function parseHeader(buf) {
  let text;
  try {
    text = utf8.decode(buf);
  } catch {
    throw new JsonError("header is not valid JSON: it is not valid UTF-8");
  }
  if (text.charCodeAt(0) === 0xfeff) throw new JsonError("header is not valid JSON: byte order mark");
  const p = new Parser(text);
  p.ws();
  const value = p.value(0);
  p.ws();
  if (p.i !== text.length) p.fail("trailing characters");
  return value;
}

const NUM = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
const SAFE = 2 ** 53;

class Parser {
  constructor(text) {
    this.s = text;
    this.i = 0;
  }
  fail(what) {
    throw new JsonError(`header is not valid JSON: ${what} at character ${this.i}`);
  }
  ws() {
    const s = this.s;
    let c;
    while (this.i < s.length && ((c = s.charCodeAt(this.i)) === 32 || c === 9 || c === 10 || c === 13)) this.i++;
  }
  value(depth) {
    if (depth > MAX_DEPTH) throw new JsonError("invalid request: JSON nested too deeply", "invalid_message");
    const c = this.s[this.i];
    if (c === "{") return this.object(depth + 1);
    if (c === "[") return this.array(depth + 1);
    if (c === '"') return this.string();
    if (c === "t" && this.s.startsWith("true", this.i)) return (this.i += 4), true;
    if (c === "f" && this.s.startsWith("false", this.i)) return (this.i += 5), false;
    if (c === "n" && this.s.startsWith("null", this.i)) return (this.i += 4), null;
    const int = this.integer();
    if (int !== undefined) return int;
    NUM.lastIndex = this.i;
    const m = NUM.exec(this.s);
    if (!m || m[0] === "-") this.fail("unexpected character");
    this.i += m[0].length;
    if (m[1] !== undefined || m[2] !== undefined) {
      const v = Number(m[0]);
      if (!Number.isFinite(v)) this.fail("number out of range");
      return new JFloat(v);
    }
    const n = Number(m[0]);
    return Math.abs(n) < SAFE ? (n === 0 ? 0 : n) : BigInt(m[0]);
  }
  /** A plain integer of at most 15 digits (exact in a double) read without the regex, or undefined (the
   * regex reads everything else: fractions, exponents, longer integers, errors). */
  integer() {
    const s = this.s;
    const neg = s.charCodeAt(this.i) === 45;
    const start = neg ? this.i + 1 : this.i;
    const first = s.charCodeAt(start);
    if (!(first >= 48 && first <= 57)) return undefined;
    let end = start + 1;
    let n = first - 48;
    if (first !== 48) {
      for (let c; end < s.length && (c = s.charCodeAt(end)) >= 48 && c <= 57; end++) n = n * 10 + (c - 48);
    }
    const next = s.charCodeAt(end);
    if (next === 46 || next === 101 || next === 69 || end - start > 15) return undefined;
    this.i = end;
    return neg && n !== 0 ? -n : n;
  }
  object(depth) {
    this.i++;
    // a plain object, not Object.create(null) (a dictionary-mode object, slow to read in V8 on every use of a
    // request): "__proto__" is made an own property as JSON.parse does; every request schema refuses keys
    // it does not name, and none names a key of Object.prototype
    const out = {};
    this.ws();
    if (this.s[this.i] === "}") return this.i++, out;
    for (;;) {
      this.ws();
      if (this.s[this.i] !== '"') this.fail("expected a string key");
      const key = this.string();
      this.ws();
      if (this.s[this.i] !== ":") this.fail("expected ':'");
      this.i++;
      this.ws();
      const v = this.value(depth);
      if (Object.prototype.hasOwnProperty.call(out, key)) {
        throw new JsonError(`header has a duplicate key ${pyRepr(key)}: every key may appear once per object`);
      }
      if (key === "__proto__") Object.defineProperty(out, key, { value: v, writable: true, enumerable: true, configurable: true });
      else out[key] = v;
      this.ws();
      const c = this.s[this.i++];
      if (c === "}") return out;
      if (c !== ",") this.i--, this.fail("expected ',' or '}'");
    }
  }
  array(depth) {
    this.i++;
    const out = [];
    this.ws();
    if (this.s[this.i] === "]") return this.i++, out;
    for (;;) {
      this.ws();
      out.push(this.value(depth));
      this.ws();
      const c = this.s[this.i++];
      if (c === "]") return out;
      if (c !== ",") this.i--, this.fail("expected ',' or ']'");
    }
  }
  string() {
    const s = this.s;
    let i = ++this.i;
    let out = "";
    let start = i;
    for (;;) {
      if (i >= s.length) (this.i = i), this.fail("unterminated string");
      const c = s.charCodeAt(i);
      if (c === 34) {
        out += s.slice(start, i);
        this.i = i + 1;
        return out;
      }
      if (c < 0x20) (this.i = i), this.fail("control character in string");
      if (c === 92) {
        out += s.slice(start, i);
        const e = s[i + 1];
        const simple = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" }[e];
        if (simple !== undefined) {
          out += simple;
          i += 2;
        } else if (e === "u" && /^[0-9a-fA-F]{4}$/.test(s.slice(i + 2, i + 6))) {
          out += String.fromCharCode(parseInt(s.slice(i + 2, i + 6), 16));
          i += 6;
        } else {
          (this.i = i), this.fail("invalid escape");
        }
        start = i;
        continue;
      }
      i++;
    }
  }
}

/** A string as Python's repr() shows it (single quotes, escapes): messages match the reference worker. */
export function pyRepr(s) {
  const q = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = q;
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === q || ch === "\\") out += "\\" + ch;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c < 0x20 || c === 0x7f) out += "\\x" + c.toString(16).padStart(2, "0");
    else if (c >= 0xd800 && c <= 0xdfff) out += "\\ud" + c.toString(16).slice(1);
    else out += ch;
  }
  return out + q;
}

/** Serialize a reply header: BigInts (only ever `re`, an id of 2^53 or more) as plain integers. */
export function stringify(value) {
  if (typeof value.re !== "bigint") return JSON.stringify(value);
  return JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `\u0000BIG${v}\u0000` : v)).replace(
    /"\\u0000BIG(-?\d+)\\u0000"/g,
    "$1",
  );
}
