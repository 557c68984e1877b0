// What a worker does with each request (as worker/service.py): frames in, frames out, never throws.

import { randomBytes } from "node:crypto";
import { parseHeader, stringify, pyRepr, JsonError } from "./json.js";
import { ProtocolError, validateRequest, requestId, runFast, PROTOCOL_VERSION } from "./messages.js";
import { Tensor, fromFrame } from "./codec.js";
import { Store } from "./store.js";
import { log, clean, enabled } from "./log.js";
import { Owners, PlanHolders, DAY, label } from "./owners.js";
import { Releaser } from "./release.js";
import { InProcess, PROVIDERS } from "./runtime.js";
import { DirectLane } from "./direct.js";
import { PlanRegistry } from "./registry.js";
import { RunPath } from "./runs.js";

export const SIGNATURE = Buffer.from(`PWIRE/${PROTOCOL_VERSION}`);
const PREFIX = Buffer.from("PWIRE/");
export const MAX_HEADER_BYTES = 1 << 20;
// HEADER_AS_TEXT: a reply's header frame is handed to zeromq.js as a string, not a Buffer. zeromq.js sends
// a Buffer over 128 bytes without copying and frees it through an async handle on the main thread: one more
// event-loop wake-up per reply. A string is converted to UTF-8 once (the bytes Buffer.from would make) and
// freed by libzmq's thread.
const ONNX_OPSET = 23;

// The replies of every run, `ok` and `tensors`, written as text by headerText: JSON.stringify looks up toJSON
// on each object it writes, which cost ~10k instructions per tiny call (callgrind), as much as the rest of
// its reply. Their fields are set in the order JSON.stringify would write them.
class Ok {
  constructor(re, session) {
    this.type = "ok";
    this.re = re;
    this.session = session;
  }
}

class Tensors {
  constructor(re, session, tensors) {
    this.type = "tensors";
    this.re = re;
    this.session = session;
    this.tensors = tensors; // [{key, dtype (a wire dtype), shape (numbers), frame}]
  }
}

/** A reply's header frame as text: stringify's text byte for byte; Ok and Tensors written here (an id of
 * 2^53 or more, a BigInt, goes through stringify). Strings from clients (keys) are quoted by JSON.stringify;
 * the session is hex, a dtype a name of codec.js's DTYPES, shapes and frames integers. */
function headerText(reply) {
  if (typeof reply.re === "number") {
    if (reply instanceof Ok) return `{"type":"ok","re":${reply.re},"session":"${reply.session}"}`;
    if (reply instanceof Tensors) {
      let text = `{"type":"tensors","re":${reply.re},"session":"${reply.session}","tensors":[`;
      const tensors = reply.tensors;
      for (let i = 0; i < tensors.length; i++) {
        const t = tensors[i];
        text += `${i ? "," : ""}{"key":${JSON.stringify(t.key)},"dtype":"${t.dtype}","shape":[${t.shape.join(",")}],"frame":${t.frame}}`;
      }
      return text + "]}";
    }
  }
  return stringify(reply);
}

export class Limits {
  constructor({ maxMessageBytes = 1 << 30, maxPlanBytes = 256 << 20, maxFrames = 4096 } = {}) {
    this.maxMessageBytes = maxMessageBytes;
    this.maxPlanBytes = maxPlanBytes;
    this.maxFrames = maxFrames;
  }
}

/** A worker's requests answered: decoded and checked here, plans by PlanRegistry (src/registry.js), runs by
 * RunPath (src/runs.js). */
export class Service extends RunPath(PlanRegistry(Object)) {
  constructor(
    id,
    {
      data = [],
      isPublic = false,
      threads = 1,
      limits = new Limits(),
      maxPlans = null,
      maxStoreBytes = null,
      maxClientStoreBytes = null,
      idleTtl = DAY,
      policy = null,
      audit = null,
      plansDir = null,
      runtime = null,
      directMaxBytes = 0,
    } = {},
  ) {
    super();
    this.id = id;
    this.runtime = runtime ?? new InProcess({ threads }); // where plans load and run: src/sandbox.js or here
    this.session = randomBytes(16).toString("hex");
    this.providers = PROVIDERS;
    this.threads = threads;
    this.limits = limits;
    this.maxPlans = maxPlans;
    this.store = new Store({ isPublic, maxBytes: maxStoreBytes, maxClientBytes: maxClientStoreBytes });
    this.plans = new Map();
    this.client = ""; // the owner the request being handled acts for (owners.js)
    this.conn = ""; // the connection it came on
    this.owners = new Owners({ idleTtl });
    this.holders = new PlanHolders(); // which owners registered each plan
    this.flows = new Map(); // plan id -> which outputs depend on which inputs (flow.js)
    this.releaser = new Releaser(policy, audit); // the data owner's release rules and audit log
    this.plansDir = plansDir; // where a worker with private data keeps the plans it receives, for review
    this.lane = directMaxBytes > 0 ? new DirectLane(directMaxBytes) : null; // src/direct.js; null: every run to the runtime
    this.mayDirect = false; // the request being answered may take the direct lane (the supervisor says so)
    for (const [key, tensor, tags] of data) this.store.putOwn(key, tensor, tags);
    this.handlers = {
      hello: (m) => this.hello(m),
      ping: (m) => this.ok(m),
      put: (m, b) => this.put(m, b),
      get: (m) => this.tensorsReply(m.id, m.keys, this.store.take(this.client, m.keys, m.keep, this.release)),
      delete: (m) => (this.store.delete(this.client, m.keys), this.ok(m)),
      search: (m) => this.found(m, this.store.search(this.client, m.tags)),
      describe: (m) => this.found(m, m.keys.map((k) => [k, this.store.entry(this.client, k)])),
      register_plan: (m, b) => this.register(m, b),
      has_plan: (m) => this.hasPlan(m),
      delete_plan: (m) => this.deletePlan(m),
      run: (m, b) => this.run(m, b),
      // PROTOCOL.md cancel: this worker reads and executes each connection's requests strictly in order,
      // so when a cancel is read every run sent before it has been answered: there is none to cancel.
      cancel: (m) => {
        throw new ProtocolError(
          "bad_argument",
          `cancel: no run #${m.run} of this connection is queued or running (worker ${pyRepr(this.id)} executes ` +
            "requests in order: every run sent before this cancel has been answered)",
        );
      },
    };
  }

  /** Handle what follows for the owner behind connection `conn` (owners.js). */
  actFor(conn) {
    this.conn = conn;
    this.client = this.owners.owner(conn);
    this.owners.seen(this.client, this.free);
  }

  release = (key, entry) => this.releaser.release(this.client, key, entry);

  ok(m) {
    return [new Ok(m.id, this.session), []];
  }

  /** Answer one request (frames after the routing id) from `client`; never throws. */
  async handle(frames, client = "") {
    const d = this.decode(frames, client);
    return d.reply ?? (await this.answer(d, frames, client));
  }

  /** A request's checked message: {msg, rid, t0 (performance.now(), ms)}, or {reply} (an error's frames)
   * when it is refused. */
  decode(frames, client = "") {
    let rid = -1;
    let msg = null;
    const t0 = performance.now();
    this.actFor(client);
    try {
      let total = 0;
      for (const f of frames) total += f.length;
      if (total > this.limits.maxMessageBytes) {
        rid = this.peekId(frames);
        throw new ProtocolError("too_large", `message of ${total} bytes, over the limit of ${this.limits.maxMessageBytes}`);
      }
      [msg, rid] = this.unpack(frames);
      if (this.handlers[msg.type] === undefined) {
        throw new ProtocolError("unknown_type", `request type ${pyRepr(msg.type)} is not handled by this worker (Node.js)`);
      }
      return { msg, rid, t0 };
    } catch (e) {
      return { reply: this.errorReply(rid, msg, e) };
    }
  }

  /** The reply frames to a decoded request (see decode), or a Promise of them when its handler waits (a
   * run in the runner, a registration); never throws. `direct`: a run may take the direct lane (nothing
   * in flight would be overtaken: src/supervisor.js decides). */
  answer(d, frames, client = "", direct = false) {
    this.actFor(client); // other requests may have been decoded since this one
    this.mayDirect = direct;
    let got;
    try {
      got = this.handlers[d.msg.type](d.msg, frames.slice(2));
    } catch (e) {
      return this.errorReply(d.rid, d.msg, e);
    } finally {
      this.mayDirect = false;
    }
    if (typeof got.then !== "function") return this.framed(d, got);
    return got.then(
      (done) => this.framed(d, done),
      (e) => this.errorReply(d.rid, d.msg, e),
    );
  }

  framed({ msg, rid, t0 }, [reply, out]) {
    if (enabled("debug")) {
      const ms = performance.now() - t0;
      log.debug(`${msg.type} #${rid} -> ${reply.type} (${ms.toFixed(2)} ms)`);
    }
    return [SIGNATURE, headerText(reply), ...out]; // the header as text: see HEADER_AS_TEXT
  }

  /** The error reply to request #rid (msg: its message, when it was read), logged. */
  errorReply(rid, msg, e) {
    let reply;
    if (e instanceof ProtocolError) {
      if (e.re !== undefined) rid = e.re;
      log.info(`request #${rid}${this.about(msg)} refused: ${clean(e.message)} [${e.code}]`);
      reply = { type: "error", re: rid, session: this.session, code: e.code, message: e.message };
    } else {
      log.error(`request #${rid}${this.about(msg)} failed: ${clean(e && e.stack ? e.stack : String(e))}`);
      reply = { type: "error", re: rid, session: this.session, code: "internal", message: `${e?.name ?? "Error"}: ${e?.message ?? e}` };
    }
    return Object.assign([SIGNATURE, stringify(reply)], { code: reply.code });
  }

  /** Answer a run that will not execute (cancelled while queued) with `error`; its outputs say why. */
  drop({ msg, rid }, error, conn = this.conn) {
    if (msg.type === "run") {
      const why = `run #${msg.id} refused: ${error.message} [${error.code}]`;
      const owner = this.owners.owner(conn);
      for (const key of msg.outputs) this.store.fail(owner, key, why);
    }
    return this.errorReply(rid, msg, error);
  }

  about(msg) {
    if (!msg) return "";
    let text = ` ${msg.type}`;
    if (typeof msg.plan === "string") {
      const plan = this.plans.get(msg.plan);
      text += plan ? ` plan ${pyRepr(plan.name)} (${msg.plan.slice(0, 12)})` : ` plan ${clean(pyRepr(msg.plan.slice(0, 64)))}`;
    } else if (msg.type === "register_plan") {
      text += ` plan ${clean(pyRepr(msg.name))}`;
    }
    return text;
  }

  peekId(frames) {
    if (frames.length < 2 || !frames[0].equals(SIGNATURE) || frames[1].length > MAX_HEADER_BYTES) return -1;
    try {
      return requestId(parseHeader(frames[1]));
    } catch {
      return -1;
    }
  }

  /** Framing, JSON and schema checks in the order of PROTOCOL.md §9; returns [message, id]. */
  unpack(frames) {
    let rid = -1;
    const err = (code, text) => Object.assign(new ProtocolError(code, text), { re: rid });
    if (frames.length < 2) {
      throw err("bad_signature", `a message needs a signature and a header frame, got ${frames.length} frame(s)`);
    }
    const sig = frames[0];
    if (!sig.equals(SIGNATURE)) {
      if (sig.subarray(0, PREFIX.length).equals(PREFIX)) {
        throw err("bad_version", `protocol ${pyRepr(sig.toString("latin1"))} not supported; this worker speaks 'PWIRE/1'`);
      }
      throw err("bad_signature", `first frame must be b'PWIRE/1', got ${pyRepr(sig.subarray(0, 32).toString("latin1"))}`);
    }
    const header = frames[1];
    if (header.length > MAX_HEADER_BYTES) throw err("too_large", `header of ${header.length} bytes, over the limit of ${MAX_HEADER_BYTES}`);
    const run = runFast(header); // a planwire client's run: already checked
    let parsed = run;
    if (run === undefined) {
      try {
        parsed = parseHeader(header);
      } catch (e) {
        if (e instanceof JsonError) {
          if (frames.length - 2 > this.limits.maxFrames) throw err("too_large", `${frames.length - 2} frames, over the limit of ${this.limits.maxFrames}`);
          throw err(e.code, e.message);
        }
        throw e;
      }
    }
    rid = requestId(parsed);
    if (frames.length - 2 > this.limits.maxFrames) {
      throw err("too_large", `${frames.length - 2} frames, over the limit of ${this.limits.maxFrames}`);
    }
    if (run !== undefined) return [run, rid];
    try {
      const msg = validateRequest(parsed);
      return [msg, msg.id];
    } catch (e) {
      if (e instanceof ProtocolError) e.re = rid;
      throw e;
    }
  }

  frameAt(buffers, index, what) {
    if (typeof index === "bigint" ? index >= BigInt(buffers.length) : index >= buffers.length) {
      throw new ProtocolError("bad_frames", `${what} points to frame ${index}, but the message has ${buffers.length} raw frame(s)`);
    }
    return buffers[Number(index)];
  }

  tensor(desc, buffers, what) {
    return fromFrame(desc.dtype, desc.shape, this.frameAt(buffers, desc.frame, what), what);
  }

  // -- handlers --

  hello(m) {
    if (m.version !== PROTOCOL_VERSION) {
      throw new ProtocolError("bad_version", `client speaks protocol ${m.version}, this worker ${PROTOCOL_VERSION}`);
    }
    let identity;
    [this.client, identity] = this.owners.hello(this.conn, m.identity ?? "");
    return [
      {
        type: "welcome",
        re: m.id,
        session: this.session,
        worker: this.id,
        version: PROTOCOL_VERSION,
        providers: this.providers,
        opsets: { "ai.onnx": ONNX_OPSET },
        limits: {
          max_message_bytes: this.limits.maxMessageBytes,
          max_plan_bytes: this.limits.maxPlanBytes,
          max_frames: this.limits.maxFrames,
        },
        identity,
      },
      [],
    ];
  }

  put(m, buffers) {
    const tensors = m.tensors.map((t) => this.tensor(t, buffers, `put tensor ${pyRepr(t.key)}`));
    this.store.checkWritable(m.tensors.map((t) => t.key));
    this.store.checkQuota(this.client, m.tensors.map((t, i) => [t.key, tensors[i].nbytes]), `put #${m.id}`);
    m.tensors.forEach((t, i) => this.store.put(this.client, t.key, tensors[i], t.tags ?? []));
    return this.ok(m);
  }

  found(m, entries) {
    const tensors = entries.map(([key, e]) => {
      const info = { key, dtype: e.tensor.dtype, shape: e.tensor.shape };
      if (e.tags.length) info.tags = e.tags;
      if (e.private) info.private = true;
      if (e.worker) info.owner = "worker";
      return info;
    });
    return [{ type: "found", re: m.id, session: this.session, tensors }, []];
  }

  tensorsReply(rid, keys, tensors) {
    const out = keys.map((key, i) => {
      return { key, dtype: tensors[i].dtype, shape: tensors[i].shape, frame: i };
    });
    return [new Tensors(rid, this.session, out), tensors.map((t) => t.data)];
  }

  /** Free everything of an owner not seen for --idle-ttl. */
  free = (owner) => {
    const [n, nbytes] = this.store.dropClient(owner);
    const pids = this.holders.dropOwner(owner);
    for (const pid of pids) this.unload(pid).catch((e) => log.error(`plan ${pid.slice(0, 12)} not released: ${e}`));
    log.info(
      `client ${label(owner)} not seen for ${Math.round(this.owners.idleTtl)} s (--idle-ttl): freed its ${n} tensors (${nbytes} bytes) and ${pids.length} plans`,
    );
  };
}

export { Tensor, PROVIDERS };
