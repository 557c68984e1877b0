#!/usr/bin/env node
// The floor of a zeromq.js worker (bench/node.py): a ROUTER with the Node plan-worker's socket options
// (src/server.js) whose every message is answered at once, with no work: what the Node worker's tiny call
// would cost if the worker did nothing but receive and send through zeromq.js 6. Controls as bench/echo.py:
// `[REPLAY, *frames]` sets the reply to a peer's later plain messages (the reply's second frame sent as a
// string, as the worker sends its headers); anything else is sent back as it came.
// Usage: node tools/echo.js URL  (prints `ready on ENDPOINT`; stops on SIGTERM/SIGINT)

import * as zmq from "zeromq";

const REPLAY = Buffer.from("\x00bench-replay", "latin1");

const sock = new zmq.Router({
  linger: 0,
  sendHighWaterMark: 10000,
  receiveHighWaterMark: 10000,
  mandatory: true,
  maxMessageSize: (1 << 30) + (1 << 20),
  sendTimeout: 0,
});
const url = process.argv[2] ?? "tcp://127.0.0.1:0";
await sock.bind(url.startsWith("tcp://") && url.endsWith(":0") ? url.slice(0, -1) + "*" : url);
process.stdout.write(`ready on ${sock.lastEndpoint}\n`);
const stop = () => sock.close();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

const replies = new Map(); // peer (hex) -> the frames answered to its plain messages
const ignore = () => {};
for (;;) {
  let msg;
  try {
    msg = await sock.receive();
  } catch {
    break; // closed
  }
  const peer = msg[0];
  let out;
  if (msg.length > 1 && msg[1].equals(REPLAY)) {
    const frames = msg.slice(2);
    if (frames.length > 1) frames[1] = frames[1].toString("utf8");
    replies.set(peer.toString("hex"), frames);
    out = [peer, REPLAY];
  } else {
    out = [peer, ...(replies.get(peer.toString("hex")) ?? msg.slice(1))];
  }
  sock.send(out).catch(ignore);
}
