"""The Node.js worker's group commit for --state-dir (worker/node/src/statecommit.js, as worker/statecommit.py's
Writes) under its server (src/server.js): one end-of-turn step makes the turn's changes durable, then sends
the turn's replies. A reply made before its request's change is committed still leaves only after the
commit; a change no reply waits for is committed by the same step. (tests/test_state.py covers the
directory alone and kill -9 of real workers.)"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conformance.workers import NODE_DIR, node_missing

pytestmark = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "")

_SCRIPT = """
import * as fs from "node:fs";
import { StateDir } from "SRC/statedir.js";
import { Server } from "SRC/server.js";
import { Tensor } from "SRC/codec.js";
const [root] = process.argv.slice(2);
const state = StateDir.open(root);
const owner = "s:k" + "ab".repeat(16);
const f32 = (n) => new Tensor("float", [n], Buffer.from(new Float32Array(n).fill(1).buffer));
const path = (key) => state.tensorPath(owner, key);
const sent = []; // [reply text, whether each tensor file existed when the reply was handed to ZeroMQ]
const sock = {
  closed: false,
  send(frames) {
    sent.push([String(frames[2]), ["a", "b", "c"].map((k) => fs.existsSync(path(k)))]);
    return Promise.resolve();
  },
};
const server = new Server({ durable: state }, sock, []);
const seen = { grouped: state.grouped };
// a reply queued, then its request's change staged (a handler's order may be either): it waits for the commit
server.send(Buffer.from("p"), ["PWIRE/1", "ok a"]);
state.saveTensor(owner, "a", f32(3), [], false, 0);
server.send(Buffer.from("q"), ["PWIRE/1", "ok b"]);
state.saveTensor(owner, "b", f32(2), [], false, 0);
seen.before = [sent.length, state.dirty, fs.existsSync(path("a"))];
await new Promise((r) => setImmediate(r));
seen.turn = [state.dirty, sent];
// a change with no reply: the server's end-of-turn step commits it (no hook of the directory's own)
state.saveTensor(owner, "c", f32(1), [], false, 0);
seen.late = [state.dirty, server.scheduled];
await new Promise((r) => setImmediate(r));
seen.alone = [state.dirty, fs.existsSync(path("c")), sent.length];
state.close();
console.log(JSON.stringify(seen));
"""


def test_node_server_commits_a_turns_changes_before_its_replies_leave(tmp_path):
    script = tmp_path / "commit.mjs"
    script.write_text(_SCRIPT.replace("SRC", str(NODE_DIR / "src")))
    done = subprocess.run(["node", str(script), str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["grouped"] is True
    assert seen["before"] == [0, True, False]  # nothing sent, nothing renamed yet
    dirty, sent = seen["turn"]
    assert not dirty
    # both replies, in order, each handed over only once both files were in place
    assert sent == [["ok a", [True, True, False]], ["ok b", [True, True, False]]]
    assert seen["late"] == [True, True]  # staged: the server's step is scheduled
    assert seen["alone"] == [False, True, 2]
