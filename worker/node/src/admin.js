// The operator's view of a live Node worker: `plan-worker status ADDR` (the Python command) over the
// worker's admin socket, as worker/admin.py serves it: a separate ROUTER, by default an ipc socket of mode
// 0600 in a directory only this user can enter; requests [ADMIN_SIGNATURE, {"type": "status"}] are answered
// [ADMIN_SIGNATURE, Status JSON] from src/metrics.js's snapshot, also while a plan runs (in the runner).

import * as zmq from "zeromq";
import { mkdirSync, statSync, chmodSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { log } from "./log.js";
import { pyRepr } from "./json.js";

export const ADMIN_SIGNATURE = Buffer.from("PWIRE-ADMIN/1");
const LOOPBACK = ["127.0.0.1", "localhost", "[::1]"];

/** An ipc path only this user can reach: $XDG_RUNTIME_DIR/planwire or $TMPDIR/planwire-UID. */
export function defaultAdminPath(workerId) {
  const base = process.env.XDG_RUNTIME_DIR;
  const dir = base ? join(base, "planwire") : join(tmpdir(), `planwire-${process.getuid()}`);
  let st;
  try {
    mkdirSync(dir, { mode: 0o700, recursive: false });
  } catch (e) {
    if (e.code !== "EEXIST") throw new Error(`admin directory ${dir}: ${e.message} (pass --admin ipc://PATH, or --admin none)`);
  }
  try {
    st = statSync(dir);
  } catch (e) {
    throw new Error(`admin directory ${dir}: ${e.message} (pass --admin ipc://PATH, or --admin none)`);
  }
  if (st.uid !== process.getuid() || st.mode & 0o077) {
    throw new Error(`admin directory ${dir} is not this user's alone (mode 0700): remove it or pass --admin`);
  }
  const safe = [...workerId].map((ch) => (/[A-Za-z0-9\-_.]/.test(ch) ? ch : "_")).join("").slice(0, 40);
  return join(dir, `${safe}-${process.pid}.admin`);
}

/** Admin endpoints are ipc:// or loopback tcp://: the operator's, never the network's. */
export function checkAdminEndpoint(url) {
  if (url.startsWith("ipc://")) return;
  if (url.startsWith("tcp://") && LOOPBACK.includes(url.slice(6, url.lastIndexOf(":")))) return;
  throw new Error(`--admin ${pyRepr(url)}: must be ipc://PATH or tcp://127.0.0.1:PORT (the operator's, not the network's)`);
}

export class AdminServer {
  /** Bind `url` and answer status requests with {...info, ...metrics.snapshot()}. */
  static async start(url, metrics, info) {
    const sock = new zmq.Router({ linger: 0, maxMessageSize: 1 << 16, sendTimeout: 0 });
    const bindUrl = url.startsWith("tcp://") && url.endsWith(":0") ? url.slice(0, -1) + "*" : url;
    const old = process.umask(0o177); // the ipc socket file is created 0600
    try {
      await sock.bind(bindUrl);
    } catch (e) {
      sock.close();
      throw new Error(`cannot listen on ${pyRepr(url)}: ${String(e.message ?? e).replace(/\s*\(addr=.*\)$/, "")}`);
    } finally {
      process.umask(old);
    }
    const bound = url.startsWith("tcp://") ? sock.lastEndpoint : url;
    if (url.startsWith("ipc://")) chmodSync(url.slice(6), 0o600);
    const server = new AdminServer(sock, bound, metrics, info);
    server.serve();
    return server;
  }

  constructor(sock, url, metrics, info) {
    this.sock = sock;
    this.url = url;
    this.metrics = metrics;
    this.info = info;
  }

  answer(frames) {
    if (frames.length !== 2 || !frames[0].equals(ADMIN_SIGNATURE)) {
      return { type: "error", message: `an admin request is [b'${ADMIN_SIGNATURE}', JSON header]` };
    }
    let req;
    try {
      req = JSON.parse(frames[1].toString("utf8"));
    } catch (e) {
      return { type: "error", message: `invalid admin request: ${e.message}` };
    }
    if (req === null || typeof req !== "object" || req.type !== "status" || Object.keys(req).length !== 1) {
      return { type: "error", message: "invalid admin request: expected {\"type\": \"status\"}" };
    }
    return { type: "status", ...this.info, ...this.metrics.snapshot() };
  }

  async serve() {
    for (;;) {
      let peer, frames;
      try {
        [peer, ...frames] = await this.sock.receive();
      } catch {
        return; // closed
      }
      let reply;
      try {
        reply = this.answer(frames);
      } catch (e) {
        reply = { type: "error", message: `${e?.name}: ${e?.message}` };
      }
      try {
        await this.sock.send([peer, ADMIN_SIGNATURE, Buffer.from(JSON.stringify(reply))]);
      } catch (e) {
        log.warning(`admin reply dropped: ${e.message}`);
      }
    }
  }

  close() {
    if (!this.sock.closed) this.sock.close();
    if (this.url.startsWith("ipc://")) {
      try {
        unlinkSync(this.url.slice(6));
      } catch {
        // already gone
      }
    }
  }
}
