// The worker's ROUTER socket: requests read as they come (src/supervisor.js orders them), replies never
// waited for (a client that stops reading loses replies once its queue is full, instead of stalling the
// others).

import * as zmq from "zeromq";
import { log } from "./log.js";
import { Supervisor } from "./supervisor.js";

const HINTS = {
  EADDRINUSE: "another process holds this port: stop it or choose another port",
  EADDRNOTAVAIL: "this machine has no such address: use one of its own, or 0.0.0.0 for all",
  ENODEV: "no such host or interface here: use one of this machine's addresses, or 0.0.0.0 for all",
  EACCES: "not allowed: ports below 1024 need privileges, or the path is not writable",
  ENOENT: "the directory of the ipc path does not exist",
};

const BATCH = 64; // replies handed to ZeroMQ together at most (a burst's first replies do not wait for its last)

export class Server {
  static async start(service, urls, { maxMessageBytes, curveSecret = null, maxQueue = 10000 }) {
    const opts = {
      linger: 200,
      sendHighWaterMark: maxQueue,
      receiveHighWaterMark: maxQueue,
      mandatory: true,
      maxMessageSize: maxMessageBytes + (1 << 20),
      sendTimeout: 0,
    };
    if (curveSecret !== null) Object.assign(opts, { curveServer: true, curveSecretKey: curveSecret });
    const sock = new zmq.Router(opts);
    const endpoints = [];
    for (const url of urls) {
      const bindUrl = url.startsWith("tcp://") && url.endsWith(":0") ? url.slice(0, -1) + "*" : url;
      try {
        await sock.bind(bindUrl);
      } catch (e) {
        sock.close();
        const reason = String(e.message ?? e).replace(/\s*\(addr=.*\)$/, "");
        throw new Error(`cannot listen on '${url}': ${reason} (${HINTS[e.code] ?? "check the address"})`);
      }
      endpoints.push(sock.lastEndpoint ?? url);
    }
    return new Server(service, sock, endpoints);
  }

  constructor(service, sock, endpoints) {
    this.service = service;
    this.sock = sock;
    this.endpoints = endpoints;
    this.dropped = 0;
    this.outbox = []; // replies not yet handed to ZeroMQ (see send)
    this.scheduled = false; // endTurn is scheduled
    this.holding = false; // a request just read is being handled: its replies wait for endRequest
    this.closed = false; // set by close(): read per reply, where the socket's own `closed` is a call into zeromq.js
    this.durable = service.durable ?? null; // --state-dir (src/statedir.js): committed before replies leave
    this.durable?.group(this.schedule); // a change staged with no reply to wait for it: committed by endTurn too
  }

  /** Serve until stopped: requests are read while plans run in `sandbox` (src/supervisor.js). */
  async serveForever(sandbox = null, metrics = null) {
    try {
      await new Supervisor(this.service, this, sandbox, metrics).serveForever();
    } finally {
      this.flush();
      this.close();
    }
  }

  /** Send a reply to `peer`, never waiting for it. Replies are handed to ZeroMQ in batches: those made in one
   * turn of the event loop (a burst of pipelined requests read one after another) leave together at the end
   * of the turn (endTurn), or every BATCH replies, so ZeroMQ's I/O thread is woken once per batch, not once
   * per reply; a lone request's replies leave as soon as it is handled (endRequest). They leave in the order
   * of these calls. */
  send(peer, reply) {
    if (this.closed) return;
    this.outbox.push([peer, ...reply]);
    if (this.outbox.length >= BATCH) this.flush();
    else if (!this.holding) this.schedule();
  }

  /** The request just read (src/supervisor.js) is handled. Its replies leave now when no other request waits
   * to be read: a synchronous call's reply is not held to the end of the event loop's turn, and costs no
   * setImmediate. While requests wait (a burst), they leave with the burst's, at the end of the turn. */
  endRequest() {
    this.holding = false;
    if (this.scheduled || !this.outbox.length || this.closed) return;
    if (this.sock.readable) this.schedule();
    else this.endTurn();
  }

  /** endTurn at the end of this turn of the event loop (once, however many replies and changes ask). */
  schedule = () => {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(this.endTurn);
  };

  /** The end of a turn of the event loop, the one step that ends it: the turn's --state-dir changes are made
   * durable, then its replies leave (flush does both, in that order). */
  endTurn = () => {
    this.scheduled = false;
    this.flush();
  };

  /** Hand the waiting replies to ZeroMQ: with sendTimeout 0 zeromq.js queues a message at once or refuses it
   * at once (never "busy"), and a client that does not read loses replies once its queue is full. With
   * --state-dir, the changes made so far (staged as requests were handled) are made durable first, in one
   * commit (or the worker exits): a reply never acknowledges what a kill -9 or a power loss could undo. */
  flush() {
    if (this.durable?.dirty) this.durable.commit();
    const out = this.outbox;
    if (!out.length) return;
    this.outbox = [];
    for (const frames of out) {
      if (this.closed) return;
      let sent;
      try {
        sent = this.sock.send(frames);
      } catch (e) {
        this.failed(e);
        continue;
      }
      sent.then(this.dropped ? this.flowing : undefined, this.failed);
    }
  }

  flowing = () => {
    if (!this.dropped) return;
    log.info(`replies flowing again after ${this.dropped} dropped`);
    this.dropped = 0;
  };

  failed = (e) => {
    if (this.sock.closed) return;
    if (e.code === "EHOSTUNREACH") log.info("reply dropped: its client has gone");
    else if (e.code === "EAGAIN") {
      if (!this.dropped++) log.warning("a client is not reading its replies: dropping its replies until it does");
    } else log.error(`reply not sent: ${e.message}`);
  };

  stop() {
    this.flush(); // the replies already made leave (within the socket's linger)
    this.close();
  }

  close() {
    this.closed = true;
    if (!this.sock.closed) this.sock.close();
  }
}
