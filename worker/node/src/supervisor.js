// The worker's main loop (as worker/supervisor.py): it keeps reading its socket while a plan runs in the
// sandboxed runner (src/sandbox.js). `ping` and `hello` are answered at once, `describe` too unless it
// names an output of a queued or running run, and `cancel` at once; every other request waits in one FIFO
// behind the running one, so each connection's requests still execute in the order they came (a pipelined
// p(p(x)) sees its first run's output). A cancelled queued run is answered `cancelled` without running; a
// cancelled running one stops its runner (src/sandbox.js answers it), and the cancel's own ok follows.

import { ProtocolError } from "./messages.js";
import { pyRepr, stringify } from "./json.js";
import { SIGNATURE } from "./service.js";

const MAX_QUEUED = 10_000; // requests waiting behind a run; past it the socket is not read (ZeroMQ's HWM pushes back)

export class Supervisor {
  constructor(service, server, sandbox = null, metrics = null) {
    this.service = service;
    this.metrics = metrics; // src/metrics.js: what the worker holds and did (--metrics, plan-worker status)
    this.server = server;
    this.sandbox = sandbox;
    this.queue = [];
    this.current = null; // {peer, client, frames, d, then}
    this.resume = null; // resolves when the queue has room again
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
      const [peer, ...frames] = msg;
      this.request(peer, peer.toString("hex"), frames);
    }
  }

  request(peer, client, frames) {
    const service = this.service;
    const d = service.decode(frames, client);
    if (d.reply !== undefined) {
      // refused as read: answered in its turn, so a connection's replies keep its requests' order (§4.2)
      if (this.current !== null || this.queue.length) this.queue.push({ peer, client, frames, d: null, reply: d.reply });
      else this.reply(peer, client, null, d.reply);
      return;
    }
    const type = d.msg.type;
    if (type === "ping" || type === "hello") {
      this.now(peer, client, frames, d);
    } else if (type === "cancel") {
      this.cancel(peer, client, frames, d);
    } else if (this.current !== null || this.queue.length) {
      if (type === "describe" && !d.msg.keys.some((k) => this.pendingOutputs().has(k))) this.now(peer, client, frames, d);
      else this.queue.push({ peer, client, frames, d });
    } else {
      this.process({ peer, client, frames, d });
    }
  }

  /** Send `reply` to the request `d` (null: one that could not be read), counted in the metrics. */
  reply(peer, client, d, reply) {
    this.server.send(peer, reply);
    if (this.metrics !== null) {
      const seconds = d === null ? 0 : Number(process.hrtime.bigint() - d.t0) / 1e9;
      this.metrics.observe(d === null ? null : d.msg, reply.code ?? "", client, seconds, reply);
    }
  }

  now(peer, client, frames, d) {
    this.service.answer(d, frames, client).then((reply) => this.reply(peer, client, d, reply));
  }

  process(q) {
    if (q.d === null) {
      this.reply(q.peer, q.client, null, q.reply);
      return;
    }
    this.current = q;
    this.service.answer(q.d, q.frames, q.client).then((reply) => this.finish(q, reply));
  }

  finish(q, reply) {
    this.reply(q.peer, q.client, q.d, reply);
    if (q.then) this.reply(q.peer, q.then.client, q.then.d, q.then.reply);
    this.current = null;
    while (this.current === null && this.queue.length) this.process(this.queue.shift());
    if (this.resume !== null && this.queue.length < MAX_QUEUED) {
      this.resume();
      this.resume = null;
    }
  }

  pendingOutputs() {
    const keys = new Set();
    for (const q of this.current ? [this.current, ...this.queue] : this.queue) {
      if (q.d !== null && q.d.msg.type === "run") for (const k of q.d.msg.outputs) keys.add(k);
    }
    return keys;
  }

  cancel(peer, client, frames, d) {
    const service = this.service;
    const m = d.msg;
    const target = String(m.run);
    const ok = () => [SIGNATURE, Buffer.from(stringify({ type: "ok", re: m.id, session: service.session }))];
    const mine = (q) => q.d !== null && q.peer.equals(peer) && q.d.msg.type === "run" && String(q.d.msg.id) === target;
    const i = this.queue.findIndex(mine);
    if (i >= 0) {
      const [q] = this.queue.splice(i, 1);
      const why = new ProtocolError("cancelled", `run #${target} was cancelled (request #${m.id}) before it started`);
      this.reply(peer, q.client, q.d, service.drop(q.d, why, q.client));
      this.reply(peer, client, d, ok());
      return;
    }
    const cur = this.current;
    if (cur !== null && mine(cur) && this.sandbox !== null) {
      const plan = service.plans.get(cur.d.msg.plan);
      const name = plan ? pyRepr(plan.name) : pyRepr(String(cur.d.msg.plan).slice(0, 12));
      const why = new ProtocolError("cancelled", `run #${target} of plan ${name} was cancelled (request #${m.id})`);
      if (this.sandbox.abort(why)) {
        cur.then = { client, d, reply: ok() }; // after the run's own answer
        return;
      }
    }
    const error = new ProtocolError("bad_argument", `cancel: no run #${target} of this connection is queued or running (finished?)`);
    this.reply(peer, client, d, service.errorReply(d.rid, m, error));
  }
}
