// CURVE keys in zmq.auth's certificate format, and a ZAP handler (ZMQ RFC 27) that admits only the
// client public keys found in a directory: a Reply socket on inproc://zeromq.zap.01 in the worker's
// ZeroMQ context, as pyzmq's zmq.auth does.

import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import * as zmq from "zeromq";
import { pyRepr } from "./json.js";
import { log } from "./log.js";

const Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

export function z85encode(buf) {
  let out = "";
  for (let i = 0; i < buf.length; i += 4) {
    let v = buf.readUInt32BE(i);
    const chunk = [];
    for (let j = 0; j < 5; j++) chunk.unshift(Z85[v % 85]), (v = Math.floor(v / 85));
    out += chunk.join("");
  }
  return out;
}

/** [public, secret or null] (Z85 strings) of a zmq.auth certificate file. */
function load(path, what) {
  let st;
  try {
    st = statSync(path);
  } catch {
    throw new Error(`${what} ${pyRepr(path)}: no such file (make keys with: plan-worker keys DIR)`);
  }
  if (st.isDirectory()) throw new Error(`${what} ${pyRepr(path)}: is a directory, not a key file (NAME.key_secret from plan-worker keys)`);
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    const why = { EACCES: "Permission denied", EISDIR: "Is a directory" }[e.code] ?? e.message;
    throw new Error(`${what} ${pyRepr(path)}: cannot read it (${why})`);
  }
  const pub = /^\s*public-key\s*=\s*"([^"]{40})"/m.exec(text);
  const sec = /^\s*secret-key\s*=\s*"([^"]{40})"/m.exec(text);
  if (!pub) {
    throw new Error(`${what} ${pyRepr(path)}: not a zmq.auth certificate (No public key found in ${path}); make keys with: plan-worker keys DIR`);
  }
  return [pub[1], sec ? sec[1] : null];
}

export function loadSecret(path) {
  const [, secret] = load(path, "secret key file");
  if (secret === null) throw new Error(`secret key file ${pyRepr(path)}: holds no secret key (a .key file is public: use the .key_secret)`);
  return secret;
}

/** Z85 public keys of the *.key files in `dir`. */
export function clientKeys(dir) {
  let names;
  try {
    if (!statSync(dir).isDirectory()) throw new Error();
    names = readdirSync(dir);
  } catch {
    throw new Error(`--curve-clients ${pyRepr(dir)}: not a directory of client public keys (*.key)`);
  }
  const keys = new Set();
  for (const n of names.filter((n) => n.endsWith(".key")).sort()) {
    try {
      keys.add(load(join(dir, n), "key file")[0]);
    } catch (e) {
      throw new Error(`--curve-clients ${pyRepr(dir)}: a file in it is not a zmq.auth certificate (${e.message})`);
    }
  }
  if (!keys.size) {
    throw new Error(`--curve-clients ${pyRepr(dir)}: holds no public keys (*.key): no client could connect; copy each client's .key file there`);
  }
  return keys;
}

/** Serve ZAP requests: CURVE clients whose key is in `allowed` (null: any) are admitted. */
export async function startAuthenticator(allowed) {
  const sock = new zmq.Reply({ linger: 0 });
  await sock.bind("inproc://zeromq.zap.01");
  (async () => {
    for await (const frames of sock) {
      const [version, requestId, , address, , mechanism, key] = frames;
      let status = "200";
      let text = "OK";
      let user = "";
      if (String(version) !== "1.0") (status = "400"), (text = "Invalid version");
      else if (String(mechanism) !== "CURVE" || !key || key.length !== 32) (status = "400"), (text = "Only CURVE is allowed");
      else {
        user = z85encode(key);
        if (allowed !== null && !allowed.has(user)) {
          status = "400";
          text = "Unknown key";
          log.auth(`refused CURVE client ${user} from ${pyRepr(String(address ?? "?"))}: Unknown key (not in --curve-clients)`);
        }
      }
      await sock.send(["1.0", requestId ?? "", status, text, user, ""]);
    }
  })().catch(() => {});
  return sock;
}
