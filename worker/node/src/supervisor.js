// The worker's main loop (as worker/supervisor.py): it keeps reading its socket while plans run in the
// sandboxed runner (src/sandbox.js). `ping` and `hello` are answered at once, `describe` too unless it
// names an output of a queued or running run, and `cancel` at once; every other request waits in one FIFO,
// and replies leave in the order of the requests, so each connection's requests execute in the order they
// came (PROTOCOL.md §4.2). Runs go to the runner in a window: up to WINDOW of them in flight, the runner
// answering each in turn without waiting for the worker, except a run that reads an output of a run still
// in flight (a pipelined p(p(x))), which waits for it; any other request, and a run on private data, waits
// until the window is empty, and the window for it. A cancelled queued run is answered `cancelled` without running; a cancelled run in
// the window is answered at once too (src/sandbox.js stops or skips it), and the cancel's own ok follows.
// A bug that throws while a request is handled costs that request only (failed): it is answered `internal`
// naming the failure, in its turn, and the loop goes on. PLANWIRE_FAULT=TYPE (tests only) makes starting
// requests of that type throw.

import { ProtocolError } from "./messages.js";
import { pyRepr, stringify } from "./json.js";
import { SIGNATURE } from "./service.js";
import { clean, log } from "./log.js";

const MAX_QUEUED = 10_000; // requests waiting behind a run; past it the socket is not read (ZeroMQ's HWM pushes back)
const WINDOW = 32; // runs in flight to the runner at once

export class Supervisor {
  constructor(service, server, sandbox = null, metrics = null) {
    this.service = service;
    this.metrics = metrics; // src/metrics.js: what the worker holds and did (--metrics, plan-worker status)
    this.server = server;
    this.sandbox = sandbox;
    this.queue = []; // requests not started: {peer, client, frames, d} (d null: refused as read, with `refused`)
    this.running = []; // started, not replied to, in order; each gets `reply` when done
    this.resume = null; // resolves when the queue has room again
    this.pumping = false; // pump() is starting requests
    this.peer = Buffer.alloc(0); // the routing id of the last request read, and its client id (hex)
    this.client = "";
    this.fault = process.env.PLANWIRE_FAULT || null; // tests only: a request type whose start throws (a bug's stand-in)
  }

  async serveForever() {
    const sock = this.server.sock;
    for (;;) {
      if (this.queue.length >= MAX_QUEUED) await new Promise((resolve) => (this.resume = resolve));
      let msg;
      try {
        msg = await sock.receive();
      } catch (e) {
        if (sock.closed || e.code === "EAGAIN" || e.code === "ETERM") return;
        throw e;
      }
      const peer = msg[0];
      if (!peer.equals(this.peer)) (this.peer = peer), (this.client = peer.toString("hex")); // the usual case: the same connection again
      this.server.holding = true; // its replies leave when it is handled (src/server.js)
      const frames = msg.slice(1);
      try {
        this.request(peer, this.client, frames);
      } catch (e) {
        this.failed(e, { peer, client: this.client, frames, d: undefined });
      } finally {
        this.server.endRequest();
      }
    }
  }

  request(peer, client, frames) {
    const service = this.service;
    const d = service.decode(frames, client);
    if (d.reply !== undefined) {
      // refused as read: answered in its turn, so a connection's replies keep its requests' order (§4.2)
      this.queue.push({ peer, client, frames, d: null, refused: d.reply });
    } else {
      const type = d.msg.type;
      if (type === "ping" || type === "hello") return this.now(peer, client, frames, d);
      if (type === "cancel") return this.cancel(peer, client, frames, d);
      const busy = this.running.length || this.queue.length;
      if (busy && type === "describe" && !d.msg.keys.some((k) => this.pendingOutputs().has(k))) return this.now(peer, client, frames, d);
      this.queue.push({ peer, client, frames, d });
    }
    this.pump();
    // one run in flight and nothing else to do: its answer is polled for a moment (src/pipe.js's Spin)
    if (this.sandbox !== null && this.running.length === 1 && !this.queue.length) this.sandbox.poll();
  }

  /** Send `reply` to the request `d` (null: one that could not be read), counted in the metrics. */
  reply(peer, client, d, reply) {
    this.server.send(peer, reply);
    if (this.metrics !== null) {
      const seconds = d === null ? 0 : (performance.now() - d.t0) / 1e3;
      try {
        this.metrics.observe(d === null ? null : d.msg, reply.code ?? "", client, seconds, reply);
      } catch (e) {
        log.error(`metrics of request #${d?.rid ?? -1} not recorded: ${clean(e && e.stack ? e.stack : String(e))}`);
      }
    }
  }

  now(peer, client, frames, d) {
    const reply = this.service.answer(d, frames, client);
    if (Array.isArray(reply)) this.reply(peer, client, d, reply);
    else reply.then((r) => this.reply(peer, client, d, r));
  }

  /** Start what may start: runs while the window has room and their arguments are not still being made,
   * anything else once the window is empty; requests answered at once (the direct lane, a put, a get...)
   * are replied to as they are done, so the next one may start on an empty window. */
  pump() {
    if (this.pumping) return; // a reply sent from within start(): the loop below goes on
    this.pumping = true;
    try {
      while (this.queue.length) {
        const q = this.queue[0];
        try {
          if (!this.startable(q)) break;
          this.queue.shift();
          this.start(q);
        } catch (e) {
          this.failed(e, q);
        }
        while (this.running.length && this.running[0].reply !== undefined) this.send(this.running.shift());
      }
    } finally {
      this.pumping = false;
    }
    if (this.resume !== null && this.queue.length < MAX_QUEUED) {
      this.resume();
      this.resume = null;
    }
  }

  startable(q) {
    const running = this.running;
    if (!running.length) return true;
    if (q.d === null) return true; // its reply waits for those before it
    if (q.d.msg.type !== "run" || running.length >= WINDOW) return false;
    const made = new Set();
    for (const r of running) {
      if (r.d === null) continue;
      if (r.alone) return false; // a request that waits for the window waits alone
      for (const k of r.d.msg.outputs) made.add(k);
    }
    return !q.d.msg.args.some((a) => a.ref !== undefined && made.has(a.ref)) && !this.readsPrivate(q);
  }

  /** Whether run `q` reads private data: its release rules are prepared with no run in flight beside it. */
  readsPrivate(q) {
    const store = this.service.store;
    const space = store.spaces.get(this.service.owners.owner(q.client));
    return q.d.msg.args.some((a) => a.ref !== undefined && (space?.get(a.ref) ?? store.own.get(a.ref))?.private === true);
  }

  /** Start request `q` (the head of the queue). A run started on an empty window has nothing in flight
   * to overtake: it may take the direct lane (src/direct.js), answered before this returns. */
  start(q) {
    if (q.d === null) {
      q.reply = q.refused;
      this.running.push(q);
      return;
    }
    const sandbox = this.sandbox;
    q.alone = q.d.msg.type !== "run" || this.readsPrivate(q);
    const direct = sandbox !== null && !this.running.length;
    this.running.push(q);
    // (tests) a bug after the request entered the window, before its answer is promised: failed() answers it
    if (this.fault !== null && q.d.msg.type === this.fault) throw new Error(`fault injected by PLANWIRE_FAULT=${this.fault}`);
    const before = sandbox?.lastJob;
    const reply = this.service.answer(q.d, q.frames, q.client, direct);
    if (Array.isArray(reply)) {
      q.reply = reply;
      return;
    }
    reply.then((r) => {
      q.reply = r;
      if (q.cancelled) {
        // answered ahead of the runs before it, as a queued run that is cancelled
        this.running.splice(this.running.indexOf(q), 1);
        this.send(q);
      }
      this.flush();
    });
    q.owed = true; // its answer comes (failed() leaves it alone)
    if (sandbox !== null && sandbox.lastJob !== before) q.job = sandbox.lastJob; // what a cancel stops
  }

  /** A bug threw while request `q` was handled (q.d undefined: not decoded here): it is answered `internal`
   * naming the failure (a run's outputs failed, as for a refused run), in its turn, unless it is still
   * queued or its answer is owed already (started, its reply set or promised). A request the bug struck after
   * it entered the window, before its answer was promised, is answered there. Nothing stored is touched. */
  failed(e, q) {
    log.error(`supervisor step failed: ${clean(e && e.stack ? e.stack : String(e))}`);
    const held = (r) => r.frames === q.frames;
    const i = this.queue.findIndex(held);
    if (i >= 0 && this.queue[i] !== q) return;
    if (i >= 0) this.queue.splice(i, 1);
    const started = this.running.find(held);
    if (started !== undefined && (started.reply !== undefined || started.owed)) return;
    const service = this.service;
    const d = q.d === undefined ? service.decode(q.frames, q.client) : q.d;
    if (d === null || d.reply !== undefined) {
      const reply = d === null ? q.refused : d.reply;
      if (started !== undefined) return this.answered(started, reply);
      return this.reply(q.peer, q.client, null, reply);
    }
    const what = `${d.msg.type} #${d.rid}`;
    const words = `the worker failed handling ${what} (${e?.name ?? "Error"}: ${e?.message ?? e}): a bug, see its log; retry`;
    const reply = service.drop(d, new ProtocolError("internal", words), q.client);
    if (started !== undefined) this.answered(started, reply);
    else if (this.running.length) this.running.push({ peer: q.peer, client: q.client, frames: q.frames, d, reply });
    else this.reply(q.peer, q.client, d, reply);
  }

  /** Request `q` of the window answered `reply` by failed(): sent in its turn. */
  answered(q, reply) {
    q.reply = reply;
    q.alone = false;
    this.flush();
  }

  /** Reply to the requests done at the head of the window, in order; then start what may start. */
  flush() {
    while (this.running.length && this.running[0].reply !== undefined) this.send(this.running.shift());
    this.pump();
  }

  send(q) {
    this.reply(q.peer, q.client, q.d, q.reply);
    if (q.then) this.reply(q.peer, q.then.client, q.then.d, q.then.reply);
  }

  pendingOutputs() {
    const keys = new Set();
    for (const q of [...this.running, ...this.queue]) {
      if (q.d !== null && q.d.msg.type === "run") for (const k of q.d.msg.outputs) keys.add(k);
    }
    return keys;
  }

  cancel(peer, client, frames, d) {
    const service = this.service;
    const m = d.msg;
    const target = String(m.run);
    const ok = () => [SIGNATURE, stringify({ type: "ok", re: m.id, session: service.session })];
    const mine = (q) => q.d !== null && q.peer.equals(peer) && q.d.msg.type === "run" && String(q.d.msg.id) === target;
    const i = this.queue.findIndex(mine);
    if (i >= 0) {
      const [q] = this.queue.splice(i, 1);
      const why = new ProtocolError("cancelled", `run #${target} was cancelled (request #${m.id}) before it started`);
      this.reply(peer, q.client, q.d, service.drop(q.d, why, q.client));
      this.reply(peer, client, d, ok());
      return;
    }
    const cur = this.running.find(mine);
    if (cur !== undefined && cur.reply === undefined && !cur.cancelled && cur.job !== undefined) {
      const plan = service.plans.get(cur.d.msg.plan);
      const name = plan ? pyRepr(plan.name) : pyRepr(String(cur.d.msg.plan).slice(0, 12));
      const why = new ProtocolError("cancelled", `run #${target} of plan ${name} was cancelled (request #${m.id})`);
      cur.cancelled = true;
      cur.then = { client, d, reply: ok() }; // after the run's own answer
      if (this.sandbox.abort(cur.job, why)) return;
      cur.cancelled = false;
      cur.then = undefined;
    }
    const error = new ProtocolError("bad_argument", `cancel: no run #${target} of this connection is queued or running (finished?)`);
    this.reply(peer, client, d, service.errorReply(d.rid, m, error));
  }
}
